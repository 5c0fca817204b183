"""Is the gap log p(x) − ELBO the KL divergence KL(q(z|x) ‖ p(z|x)), and does IWAE_K close it?

(a) Linear-Gaussian model (exact log p(x) and p(z|x)): for the exact posterior and guides that
    miss it in known ways (shifted mean, over- and under-dispersed, KL-optimal mean-field), the
    Monte Carlo gap log p(x) − ELBO (± SE) beside the closed-form KL(q ‖ p(z|x)), and
    log p(x) − IWAE_K for K in --ks.
(b) MNIST: for a trained VAE (--checkpoint from `pyrovae train`, else a small VAE trained here
    for --train-epochs), the distribution over test points of log p̂(x) (K = --eval-samples)
    minus the ELBO, and how it relates to KL(q(z|x) ‖ p(z)).

Writes results.json, gap_vs_k.png, mnist_gap_histogram.png and mnist_gap_vs_kl.png under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from studies.gap import (
    linear_gaussian_gap,
    mnist_gap,
    plot_gap_vs_k,
    plot_gap_vs_kl,
    summarize_by_label,
    train_small_vae,
)
from studies.provenance import write_run_record

from pyrovae.app import plots
from pyrovae.app.run import restore, test_guide, write_json
from pyrovae.data import load_mnist
from pyrovae.train import evaluation_data


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    lin = parser.add_argument_group("(a) linear-Gaussian model")
    lin.add_argument("--z-dim", type=int, default=4, help="latent dimension d")
    lin.add_argument("--x-dim", type=int, default=8, help="data dimension")
    lin.add_argument("--signal", type=float, default=9.0, help="W_ij ~ N(0, signal / x_dim)")
    lin.add_argument("--noise-scale", type=float, default=1.0, help="observation noise σ")
    lin.add_argument("--num-points", type=int, default=20, help="data points x")
    lin.add_argument("--ks", type=int, nargs="+", default=[1, 5, 50, 500], help="K of the IWAE bounds (1 = ELBO)")
    lin.add_argument("--samples-per-k", type=int, default=20_000,
                     help="importance samples per point and K (replicates = this / K, at least --min-replicates)")
    lin.add_argument("--min-replicates", type=int, default=1000, help="fewest replicates per point and K")
    mn = parser.add_argument_group("(b) MNIST")
    mn.add_argument("--checkpoint", type=str, default=None,
                    help="checkpoint.pt written by `pyrovae train`; without it a small VAE is trained here")
    mn.add_argument("--data-dir", type=str, default=None, help="folder holding MNIST/raw (else $PYROVAE_DATA)")
    mn.add_argument("--train-epochs", type=int, default=5, help="epochs of the self-trained VAE")
    mn.add_argument("--num-train", type=int, default=None, help="training points of the self-trained VAE (default all)")
    mn.add_argument("--vae-z-dim", type=int, default=20, help="latent dimension of the self-trained VAE")
    mn.add_argument("--vae-hidden", type=int, default=200, help="hidden units of the self-trained VAE")
    mn.add_argument("--num-test", type=int, default=10_000, help="first test points to evaluate")
    mn.add_argument("--eval-samples", type=int, default=5000, help="K of the importance-sampled log p̂(x)")
    mn.add_argument("--eval-chunk", type=int, default=500, help="samples per vectorized pass")
    mn.add_argument("--eval-batch", type=int, default=100, help="test points per pass")
    mn.add_argument("--progress", type=int, choices=[0, 1], default=0, help="1: progress bar for the MNIST evaluation")
    parser.add_argument("--device", type=str, default="cpu", help="device of the MNIST part")
    parser.add_argument("--seed", type=int, default=0, help="seed of models, data and samples")
    parser.add_argument("--out", type=str, default="runs/gap_is_kl", help="output folder")
    parser.add_argument("--relabel", action="store_true",
                        help="compute nothing new: add the per-label breakdown, the quantiles of gap / KL and the coloured "
                             "scatter to --out/results.json from its stored per-point results and the MNIST test labels")
    return parser.parse_args(argv)


def run_linear(args: argparse.Namespace) -> dict:
    results = linear_gaussian_gap(
        z_dim=args.z_dim, x_dim=args.x_dim, signal=args.signal, noise_scale=args.noise_scale,
        num_points=args.num_points, ks=tuple(args.ks), samples_per_k=args.samples_per_k,
        min_replicates=args.min_replicates, seed=args.seed,
    )
    print(f"(a) linear-Gaussian d={args.z_dim}, x_dim={args.x_dim}, mean log p(x) = {results['log_px_mean']:.3f}")
    for row in results["rows"]:
        z = row["elbo_gap_z"]
        gaps = "  ".join(f"K={b['k']}: {b['gap']:.4f}±{b['gap_se']:.4f}" for b in row["by_k"])
        print(f"  {row['guide']:34s} KL {row['kl_closed_form']:.4f}  gap(ELBO) {row['elbo_gap']:.4f} ± "
              f"{row['elbo_gap_se']:.4f}  z = {'—' if z is None else f'{z:+.2f}'}  |  {gaps}")
    plot_gap_vs_k(results, f"{args.out}/gap_vs_k.png")
    return results


def run_mnist(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    if args.checkpoint:
        config, dataset, model, guide, state = restore(args.checkpoint, args.data_dir, device=args.device)
        source = {"checkpoint": args.checkpoint, "epoch": state["epoch"]}
    else:
        config, dataset, model, guide = train_small_vae(
            args.data_dir, args.train_epochs, args.num_train, args.vae_z_dim, args.vae_hidden,
            seed=args.seed, device=args.device,
        )
        source = {"trained_here": True, "epochs": args.train_epochs, "num_train": dataset.num_train}
    train_seconds = time.perf_counter() - start
    x = evaluation_data(dataset, "test", config.seed)[: args.num_test]
    guide = test_guide(config, model, guide, x)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    summary, per_point = mnist_gap(
        model, guide, x, num_samples=args.eval_samples, chunk_size=args.eval_chunk,
        batch_size=args.eval_batch, progress=bool(args.progress),
    )
    summary.update(source)
    summary["model"] = {"z_dim": config.z_dim, "hidden_sizes": list(config.hidden_sizes),
                        "objective": config.objective, "guide": config.guide}
    summary["eval_seconds"] = time.perf_counter() - start
    summary["load_or_train_seconds"] = train_seconds
    q = summary["gap_quantiles"]
    print(f"(b) MNIST, {summary['num_points']} test points, K = {args.eval_samples}: "
          f"log p̂ {summary['log_likelihood_mean']:.2f}, ELBO {summary['elbo_mean']:.2f}, "
          f"gap mean {summary['gap_mean']:.3f} ± {summary['gap_se'] or 0:.3f}, median {summary['gap_median']:.3f}, "
          f"5–95% [{q['0.05']:.3f}, {q['0.95']:.3f}], KL(q‖p(z)) {summary['kl_prior_mean']:.2f}, "
          f"gap/KL {summary['gap_over_kl_prior']:.3f}, corr(gap, KL) {summary['pearson_gap_kl_prior']}")
    labels = None if dataset.test_labels is None else dataset.test_labels[: args.num_test].cpu()
    if labels is not None:
        summary["by_label"] = summarize_by_label(per_point["gap"], per_point["kl_prior"], labels)
    label = f"{summary['num_points']} MNIST test points, K = {args.eval_samples}"
    plots.plot_histogram(per_point["gap"], f"{args.out}/mnist_gap_histogram.png",
                         xlabel="log p̂(x) − ELBO (nats) ≈ KL(q(z|x) ‖ p(z|x))",
                         title=f"Gap per point ({label})")
    plot_gap_vs_kl(per_point, f"{args.out}/mnist_gap_vs_kl.png",
                   title=f"Gap against KL(q ‖ p(z)) per point ({label})", labels=labels)
    summary["gap_over_kl_prior_quantiles"] = ratio_quantiles(per_point)
    summary["per_point_gap"] = [round(v, 5) for v in per_point["gap"].tolist()]
    summary["per_point_kl_prior"] = [round(v, 5) for v in per_point["kl_prior"].tolist()]
    return summary


def ratio_quantiles(per_point: dict[str, torch.Tensor]) -> dict[str, float]:
    """Quantiles over points of the per-point gap / KL(q ‖ p(z))."""
    ratio = (per_point["gap"].double() / per_point["kl_prior"].double())
    return {str(q): float(torch.quantile(ratio, q)) for q in (0.05, 0.5, 0.95)}


def relabel(args: argparse.Namespace) -> dict:
    """Re-aggregate a finished run: ``by_label`` and ``mnist_gap_vs_kl.png`` from ``results.json``'s
    ``per_point_gap`` / ``per_point_kl_prior`` and the labels of the first ``num_points`` test images."""
    path = Path(args.out) / "results.json"
    results = json.loads(path.read_text())
    mnist = results["mnist"]
    per_point = {"gap": torch.tensor(mnist["per_point_gap"]), "kl_prior": torch.tensor(mnist["per_point_kl_prior"])}
    labels = load_mnist(args.data_dir, binarize="none").test_labels[: mnist["num_points"]].cpu()
    mnist["by_label"] = summarize_by_label(per_point["gap"], per_point["kl_prior"], labels)
    mnist["gap_over_kl_prior_quantiles"] = ratio_quantiles(per_point)
    plot_gap_vs_kl(per_point, f"{args.out}/mnist_gap_vs_kl.png", labels=labels,
                   title=f"Gap against KL(q ‖ p(z)) per point ({mnist['num_points']} MNIST test points, "
                         f"K = {mnist['num_samples']})")
    write_json(path, results)
    write_run_record(args.out, args, role="relabel: re-aggregation of the stored per-point results")
    return results


def main(args: argparse.Namespace) -> dict:
    if args.relabel:
        return relabel(args)
    start = time.perf_counter()
    results = {"linear_gaussian": run_linear(args), "mnist": run_mnist(args)}
    results["seconds"] = time.perf_counter() - start
    results["args"] = vars(args)
    write_json(f"{args.out}/results.json", results)
    write_run_record(args.out, args, device=args.device)
    return results


if __name__ == "__main__":
    main(parse_args())
