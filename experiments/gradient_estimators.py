"""Reparameterization vs the log-derivative trick: how biased, how noisy, and how fast do they train?

Three estimators of ∇ELBO — reparameterized (pathwise), score function without a baseline, score
function with a baseline (leave-one-out over the K particles for K >= 2, a moving average of past
batch means of f for K = 1) — compared

1. on the linear-Gaussian model with a fixed, mis-fit diagonal Gaussian guide, where the exact
   gradient is known: bias (z statistics against it), variance and signal-to-noise ratio per
   parameter group (guide loc, guide log-scale, decoder) as functions of the latent dimension d and
   the number of particles K;
2. on MNIST, at a fixed, briefly trained VAE: variance and SNR of the encoder and decoder gradients;
3. on MNIST, training from the same initialization for the same time budget: the test ELBO
   reached. The budget is process CPU time by default (``--clock cpu``; on one thread that is the
   wall-clock time on an idle core), so that other jobs on a shared machine do not decide the race;
   ``--clock wall`` budgets wall-clock time.

Writes ``results.json``, ``variance_vs_dim.png``, ``snr_vs_dim.png``, ``mnist_gradients.png`` and
``training_curves.png`` under ``--out``. The logic lives in :mod:`studies.gradients`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import pathlib
import sys
import time
from typing import Any, Optional

import pyro
import torch
from studies import gradients as study
from studies.provenance import write_run_record

from pyrovae.app.run import write_json
from pyrovae.data import Dataset, load_mnist
from pyrovae.train import evaluation_data


def parse_run(text: str) -> tuple[str, int, Optional[float]]:
    """``"estimator:K"`` or ``"estimator:K:LR"`` -> (estimator, K, LR or None for --lr)."""
    parts = text.split(":")
    estimator, k = parts[0], parts[1] if len(parts) > 1 else ""
    try:
        lr = float(parts[2]) if len(parts) == 3 else None
    except ValueError:
        lr = -1.0
    if (
        estimator not in study.ESTIMATORS or not k.isdigit() or int(k) < 1
        or len(parts) > 3 or (lr is not None and not lr > 0)
    ):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected ESTIMATOR:K or ESTIMATOR:K:LR with ESTIMATOR in "
            f"{sorted(study.ESTIMATORS)}, K >= 1 and LR > 0, e.g. score-baseline:4 or score-baseline:1:1e-4"
        )
    return estimator, int(k), lr


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--out", type=str, default="runs/gradient_estimators", help="folder for results.json and the PNGs")
    add("--seed", type=int, default=0, help="seed of data, guides, networks and every draw")
    add("--device", type=str, default="cpu", help="torch device, e.g. cpu or cuda")
    add("--replot", type=str, default=None,
        help="redraw the figures (and recompute variance_ratios) from this results.json into --out, measuring nothing")
    add("--threads", type=int, default=1, help="torch CPU threads (the wall-clock comparison is per thread count)")
    # linear-Gaussian
    add("--dims", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="latent dimensions d")
    add("--particles", type=int, nargs="+", default=[1, 4, 16], help="particle counts K")
    add("--replicates", type=int, default=10000, help="independent gradient draws per (d, K, estimator)")
    add("--x-dim", type=int, default=64, help="data dimension D of the linear-Gaussian model")
    add("--num-points", type=int, default=1, help="data points in the linear-Gaussian ELBO (the batch)")
    add("--noise-scale", type=float, default=0.5, help="observation noise sd σ of the linear-Gaussian model")
    # MNIST
    add("--data-dir", type=str, default=None, help="folder holding MNIST/raw (default: $PYROVAE_DATA)")
    add("--num-train", type=int, default=20000, help="MNIST training points used")
    add("--num-test", type=int, default=2000, help="MNIST test points used for the test ELBO")
    add("--z-dim", type=int, default=20, help="latent dimension of the MNIST VAE")
    add("--hidden", type=int, nargs="+", default=[200], help="hidden layer widths of encoder and decoder")
    add("--batch-size", type=int, default=100, help="minibatch size for training and the gradient batch")
    add("--lr", type=float, default=1e-3, help="Adam learning rate (every estimator)")
    add("--pretrain-steps", type=int, default=500, help="reparameterized Adam steps before measuring MNIST gradients")
    add("--mnist-particles", type=int, nargs="+", default=[1, 4, 16], help="K for the MNIST gradient study")
    add("--mnist-replicates", type=int, default=300, help="gradient draws per (K, estimator) on MNIST")
    add("--train-seconds", type=float, default=30.0, help="training time budget per MNIST run (see --clock)")
    add("--train-seeds", type=int, default=2, help="seeds (initialization and minibatch order) per training configuration")
    add("--clock", type=str, choices=["cpu", "wall"], default="cpu",
        help="what --train-seconds counts: process CPU time (fair on a shared machine) or wall-clock time")
    add("--eval-every", type=float, default=3.0, help="seconds of training between test-ELBO records")
    add("--train-runs", type=parse_run, nargs="+",
        default=[("reparameterized", 1, None), ("score-baseline", 1, None), ("score-baseline", 1, 1e-4),
                 ("score-baseline", 4, None)],
        help="MNIST training runs as ESTIMATOR:K or ESTIMATOR:K:LR (LR defaults to --lr)")
    add("--final-eval-samples", type=int, default=10, help="draws per test point for the final test ELBO")
    return parser


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_subset(args: argparse.Namespace) -> Dataset:
    full = load_mnist(args.data_dir, device=args.device, binarize="dynamic", seed=args.seed)
    return Dataset(
        name="mnist",
        train=full.train[: args.num_train],
        test=full.test[: args.num_test],
        likelihood="bernoulli",
        binarize="dynamic",
        image_shape=full.image_shape,
    )


def mnist_part(args: argparse.Namespace) -> dict[str, Any]:
    dataset = load_subset(args)
    x_test = evaluation_data(dataset, "test", args.seed)
    x_dim = dataset.x_dim

    # 2. gradients at a fixed, briefly trained point
    model, guide = study.build_vae(x_dim, args.z_dim, args.hidden, args.seed, args.device)
    start = time.perf_counter()
    pretrain = study.train_for(
        model, guide, dataset, x_test, study.make_estimator("reparameterized", 1),
        max_steps=args.pretrain_steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
    )
    log(f"pretrained {args.pretrain_steps} steps in {time.perf_counter() - start:.1f}s: "
        f"test ELBO {pretrain['test_elbo'][-1]:.2f}")
    generator = torch.Generator(device=x_test.device).manual_seed(args.seed)
    batch = torch.bernoulli(dataset.train[: args.batch_size], generator=generator)
    variance_runs = study.mnist_variance_study(
        model, guide, batch, args.mnist_particles, args.mnist_replicates, seed=args.seed, progress=log
    )

    # 3. training at equal wall clock, all from the same initialization
    training_runs = []
    for (estimator, num_particles, run_lr), offset in itertools.product(args.train_runs, range(args.train_seeds)):
        seed = args.seed + offset
        lr = args.lr if run_lr is None else run_lr
        model, guide = study.build_vae(x_dim, args.z_dim, args.hidden, seed, args.device)
        label = f"{study.run_label(estimator, num_particles)}, K={num_particles}, lr={lr:g}"
        history = study.train_for(
            model, guide, dataset, x_test, study.make_estimator(estimator, num_particles),
            seconds=args.train_seconds, batch_size=args.batch_size, lr=lr,
            eval_every=args.eval_every, seed=seed, clock=args.clock,
        )
        with pyro.validation_enabled(False):
            final, final_se = study.heldout_elbo(model, guide, x_test, num_samples=args.final_eval_samples)
        log(f"{label}, seed {seed}: {history['steps'][-1]} steps in {history['cpu_seconds'][-1]:.1f} CPU s "
            f"({history['seconds'][-1]:.1f} s wall), test ELBO {final:.2f} ± {final_se:.2f}")
        training_runs.append(
            {
                "label": label,
                "seed": seed,
                "estimator": estimator,
                "num_particles": num_particles,
                "lr": lr,
                "baseline": study.baseline_name(estimator, num_particles),
                "steps": history["steps"][-1],
                "seconds": history["seconds"][-1],
                "cpu_seconds": history["cpu_seconds"][-1],
                "final_test_elbo": final,
                "final_test_elbo_se": final_se,
                "history": history,
            }
        )
    return {
        "num_train": dataset.num_train,
        "num_test": dataset.num_test,
        "x_dim": x_dim,
        "z_dim": args.z_dim,
        "hidden": args.hidden,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "pretrain": {
            "steps": args.pretrain_steps,
            "seconds": pretrain["seconds"][-1],
            "test_elbo": pretrain["test_elbo"][-1],
        },
        "gradient_batch": "the first batch-size training images, binarized once with the seed",
        "variance": {"num_replicates": args.mnist_replicates, "runs": variance_runs},
        "training": {"seconds_budget": args.train_seconds, "clock": args.clock,
                     "final_eval_samples": args.final_eval_samples, "runs": training_runs},
    }


def save_figures(results: dict[str, Any], out: pathlib.Path) -> None:
    """Draw every figure from the results (so ``--replot`` can redraw them without recomputing)."""
    linear, mnist = results["linear_gaussian"], results["mnist"]
    suffix = f"linear-Gaussian, D = {linear['x_dim']}, σ = {linear['noise_scale']:g}, {linear['num_replicates']} draws"
    study.plot_linear_gaussian(linear, "variance", out / "variance_vs_dim.png",
                               "mean per-coordinate variance", f"Gradient variance ({suffix}; bars ±2 SE)")
    study.plot_linear_gaussian(linear, "snr", out / "snr_vs_dim.png",
                               "mean SNR |∇ELBO| / sd", f"Signal-to-noise ratio against the exact gradient ({suffix})")
    architecture = "-".join(map(str, [mnist["x_dim"], *mnist["hidden"], mnist["z_dim"]]))
    study.plot_mnist_variance(
        mnist["variance"]["runs"], out / "mnist_gradients.png",
        f"MNIST VAE ({architecture}) after {mnist['pretrain']['steps']} steps: ∇ of the mean ELBO of "
        f"{mnist['batch_size']} images, {mnist['variance']['num_replicates']} draws",
    )
    training = mnist["training"]
    threads = results["torch_threads"]
    study.plot_training(
        training["runs"], out / "training_curves.png",
        f"MNIST VAE, {training['seconds_budget']:g} s of {'CPU' if training['clock'] == 'cpu' else 'wall-clock'} "
        f"time each, same initialization per seed ({threads} thread{'s' if threads > 1 else ''}, "
        f"{mnist['num_train']} training images)",
        clock=training["clock"],
    )


def variance_ratios(results: dict[str, Any]) -> dict[str, Any]:
    """The page's ratio tables, from the linear-Gaussian runs: per group, d and K, the variance of the
    score estimator with a baseline over the pathwise one, and without a baseline over with one."""
    runs = results["linear_gaussian"]["runs"]
    variance = {(r["estimator"], r["z_dim"], r["num_particles"], group): g["variance"]
                for r in runs for group, g in r["groups"].items()}
    ratios: dict[str, Any] = {}
    for (estimator, d, k, group), value in variance.items():
        if estimator != "score-baseline":
            continue
        cell = ratios.setdefault(group, {}).setdefault(f"d={d} K={k}", {})
        if ("reparameterized", d, k, group) in variance:
            cell["baseline_over_pathwise"] = value / variance[("reparameterized", d, k, group)]
        if ("score", d, k, group) in variance:
            cell["none_over_baseline"] = variance[("score", d, k, group)] / value
    return ratios


def main(args: argparse.Namespace) -> dict[str, Any]:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot is not None:
        results = json.loads(pathlib.Path(args.replot).read_text())
        results["variance_ratios"] = variance_ratios(results)
        results["expected_frac_abs_z_gt_3"] = math.erfc(3 / math.sqrt(2))
        write_json(out / "results.json", results)
        write_run_record(out, args, role="replot: figures and variance_ratios recomputed from results.json, nothing measured")
        save_figures(results, out)
        return results
    logging.getLogger("pyro").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    # 1. linear-Gaussian: exact gradients
    linear = study.linear_gaussian_study(
        args.dims, args.particles, args.replicates, x_dim=args.x_dim, num_points=args.num_points,
        noise_scale=args.noise_scale, seed=args.seed, device=args.device, progress=log,
    )
    linear_seconds = time.perf_counter() - start

    mnist = mnist_part(args)
    results = {
        "question": __doc__.split("\n\n")[0],
        "estimators": study.ESTIMATORS,
        "config": {k: v for k, v in vars(args).items()},
        "linear_gaussian": linear,
        "mnist": mnist,
        "linear_gaussian_seconds": linear_seconds,
        "seconds": time.perf_counter() - start,
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "pyro": pyro.__version__},
    }
    results["variance_ratios"] = variance_ratios(results)
    results["expected_frac_abs_z_gt_3"] = math.erfc(3 / math.sqrt(2))  # P(|z| > 3) for an unbiased estimator
    write_json(out / "results.json", results)
    write_run_record(out, args, device=args.device)
    save_figures(results, out)
    log(f"wrote {out} in {results['seconds']:.0f}s")
    return results


if __name__ == "__main__":
    main(build_parser().parse_args())
