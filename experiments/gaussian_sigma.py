"""A Gaussian decoder on continuous MNIST: how does σ weigh reconstruction against the KL?

With p(x|z) = N(f_θ(z), σ² I), the ELBO is −‖x − f(z)‖² / (2σ²) − D log σ − KL + const: a fixed σ
is a β-VAE in disguise (β = 2σ² against a unit-variance reconstruction term), so small σ buys
reconstructions with rate, large σ lets the posterior collapse to the prior. Learning σ (one
shared, or one per pixel) lets the model pick the trade-off by maximum likelihood.

Trains the 784-400-50 VAE on the (non-binarized) MNIST intensities with fixed σ ∈ --fixed, a learned
shared σ and a learned per-pixel σ, and reports for the test set: rate (KL), distortion
(−E_q log p(x|z)), squared reconstruction error of the decoder mean at the posterior mean, active
units, the test ELBO and log-likelihood (densities, nats), and the learned σ. Writes --docs/results.json,
sigma.png and (per-pixel run) sigma_map.png.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pyro
import torch
from studies.provenance import write_run_record
from studies.sweep import add_common_args, run_configs, setup

from pyrovae.app.config import TrainConfig
from pyrovae.app.plots import save_image_grid
from pyrovae.app.run import restore, write_json
from pyrovae.infer.evaluate import posterior_means
from pyrovae.train import evaluation_data


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixed", type=float, nargs="+", default=[0.05, 0.1, 0.3, 1.0], help="fixed σ values")
    parser.add_argument("--out", default="runs/gaussian_sigma")
    parser.add_argument("--docs", default="docs/gaussian_sigma")
    parser.add_argument("--z-dim", type=int, default=50)
    parser.add_argument("--hidden-sizes", type=int, nargs="+", default=[400])
    parser.add_argument("--eval-samples", type=int, default=1000)
    add_common_args(parser)
    return parser.parse_args(argv)


def configs_for(args: argparse.Namespace) -> dict[str, TrainConfig]:
    common = dict(likelihood="gaussian", binarize="none", epochs=args.epochs, z_dim=args.z_dim,
                  hidden_sizes=tuple(args.hidden_sizes), eval_samples=args.eval_samples, num_train=args.num_train,
                  num_test=args.num_test, device=args.device, seed=args.seed)
    configs = {f"fixed_{s:g}": TrainConfig(x_scale=s, learn_x_scale=False, **common) for s in args.fixed}
    configs["learned_shared"] = TrainConfig(x_scale=0.3, learn_x_scale=True, **common)
    configs["learned_pixel"] = TrainConfig(x_scale=0.3, learn_x_scale=True, x_scale_shape="pixel", **common)
    return configs


@torch.no_grad()
def reconstruction_stats(checkpoint: Path, data_dir: str | None) -> dict[str, object]:
    config, dataset, model, guide, _ = restore(checkpoint, data_dir=data_dir)
    x = evaluation_data(dataset, "test", config.seed)
    index = torch.arange(x.shape[0], device=x.device)
    z = torch.cat([posterior_means(guide, x[i], i, x.shape[0])["z"] for i in index.split(1000)])
    squared = (model.decode(z) - x).pow(2).sum(-1)
    sigma = model.x_scale(x.device, x.dtype, x.shape[-1]).detach().cpu()
    out: dict[str, object] = {"squared_error": squared.mean().item(), "sigma_mean": sigma.mean().item(),
                              "sigma_min": sigma.min().item(), "sigma_max": sigma.max().item()}
    if sigma.numel() > 1:
        out["sigma_map"] = sigma
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for r in rows:
        marker = "o" if r["name"].startswith("fixed") else "*"
        axes[0].scatter(r["rate"], r["squared_error"], marker=marker, s=60)
        axes[0].annotate(r["label"], (r["rate"], r["squared_error"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axes[1].scatter(r["sigma_mean"], r["active_units"], marker=marker, s=60)
        axes[1].annotate(r["label"], (r["sigma_mean"], r["active_units"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axes[2].scatter(r["sigma_mean"], r["test_log_likelihood"], marker=marker, s=60)
        axes[2].annotate(r["label"], (r["sigma_mean"], r["test_log_likelihood"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes[0].set_xlabel("rate KL(q ‖ p(z)) (nats)")
    axes[0].set_ylabel("squared reconstruction error ‖x − f(E_q z)‖²")
    for ax in axes[1:]:
        ax.set_xscale("log")
        ax.set_xlabel("σ (mean over pixels if per pixel)")
    axes[1].set_ylabel("active units")
    axes[2].set_ylabel("test log-likelihood (nats, density)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    setup(args)
    configs = configs_for(args)
    results = run_configs(configs, Path(args.out), data_dir=args.data_dir)
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, m in results.items():
        pyro.clear_param_store()
        stats = reconstruction_stats(Path(args.out) / name / "checkpoint.pt", args.data_dir)
        sigma_map = stats.pop("sigma_map", None)
        if sigma_map is not None:
            scaled = (sigma_map - sigma_map.min()) / (sigma_map.max() - sigma_map.min() + 1e-12)
            save_image_grid(scaled.reshape(1, -1), docs / "sigma_map.png", (1, 28, 28), nrow=1)
        label = name.replace("fixed_", "σ=").replace("learned_shared", "learned σ").replace("learned_pixel", "σ per pixel")
        rows.append({"name": name, "label": label, "rate": m["kl"], "distortion": -(m["test_elbo"] + m["kl"]),
                     "test_elbo": m["test_elbo"], "test_log_likelihood": m["test_log_likelihood"],
                     "active_units": m["active_units"], **stats})
        logging.info("%s: rate %.1f, squared error %.2f, %d active units, σ %.3g, test log-lik %.1f", name,
                     m["kl"], stats["squared_error"], m["active_units"], stats["sigma_mean"], m["test_log_likelihood"])
    plot(rows, docs / "sigma.png")
    summary = {"rows": rows, "eval_samples": args.eval_samples}
    write_json(docs / "results.json", summary)
    write_run_record(docs, args, configs={k: v.to_dict() for k, v in configs.items()}, device=args.device)
    return summary


if __name__ == "__main__":
    main()
