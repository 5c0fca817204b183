"""The gap closes (Concept 11.15): guides of growing flexibility against exact posteriors.

(a) Linear-Gaussian model held at the truth: each guide's gap log p(x) − ELBO (± MC SE) beside the
    least KL a diagonal Gaussian reaches and, for the Gaussian guides, the closed-form
    KL(q ‖ p(z|x)) of the trained q.
(b) Banana model (curved posterior, log p(x) by quadrature): only flows can close the gap.
(c) `pyrovae train --dataset linear --guide full-cov` end to end (the model learned too): its
    metrics.json test ELBO against the exact test log-likelihood, with the MC SE.

Writes results.json, gaps.png and banana_posteriors.png under --out (and the training run under
OUT/train_full_cov).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from studies.flows import GUIDES, StudySettings, banana_study, linear_study, plot_banana, plot_gaps
from studies.provenance import write_run_record

from pyrovae.app.cli import main as pyrovae_main
from pyrovae.app.run import write_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=str, default="docs/gap_closes", help="output folder")
    parser.add_argument("--guides", nargs="+", default=list(GUIDES), choices=list(GUIDES), help="guides compared")
    parser.add_argument("--steps", type=int, default=3000, help="Adam steps per guide (full batch)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.03, 0.01],
                        help="initial step sizes tried per guide (each decays to 1 %% of itself); the best ELBO is kept")
    parser.add_argument("--particles", type=int, default=8, help="draws per point in the training ELBO")
    parser.add_argument("--draws", type=int, default=4000, help="draws per point in the reported ELBO")
    parser.add_argument("--flow-layers", type=int, default=4, help="layers of each flow")
    parser.add_argument("--hidden", type=int, nargs="*", default=[32], help="encoder widths of the flow guides (and banana)")
    parser.add_argument("--num-points", type=int, default=64, help="data points of each model")
    parser.add_argument("--train-epochs", type=int, default=300, help="(c): epochs of the pyrovae train run (0: skip it)")
    parser.add_argument("--train-eval-samples", type=int, default=5000, help="(c): K of its test log p̂(x)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the banana data and every guide's init")
    return parser.parse_args(argv)


def train_full_cov(out: Path, epochs: int, eval_samples: int) -> dict:
    argv = ["train", "--dataset", "linear", "--guide", "full-cov", "--hidden-sizes", "--objective", "elbo-stl",
            "--epochs", str(epochs), "--lr", "0.02", "--lr-decay", "0.985", "--batch-size", "200",
            "--eval-samples", str(eval_samples),
            "--out", str(out), "--overwrite", "--no-progress"]
    code = pyrovae_main(argv)
    if code != 0:
        raise SystemExit(code)
    metrics = json.loads((out / "metrics.json").read_text())
    write_run_record(out, {"argv": argv}, seed=metrics["config"]["seed"], configs=metrics["config"],
                     role="(c) of experiments/gap_closes.py: this pyrovae train run, started by it")
    gap = metrics["test_log_likelihood_exact"] - metrics["test_elbo"]
    return {"command": "pyrovae " + " ".join(argv), "test_elbo": metrics["test_elbo"],
            "test_elbo_se": metrics["test_elbo_se"], "test_log_likelihood_exact": metrics["test_log_likelihood_exact"],
            "gap": gap, "gap_in_se": gap / metrics["test_elbo_se"], "train_seconds": metrics["train_seconds"]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_default_dtype(torch.float64)
    try:
        settings = StudySettings(steps=args.steps, lrs=tuple(args.lrs), particles=args.particles, draws=args.draws,
                                 flow_layers=args.flow_layers, hidden=tuple(args.hidden))
        linear = linear_study(settings, num_points=args.num_points, guides=args.guides)
        banana, trained = banana_study(settings, num_points=args.num_points, seed=args.seed, guides=args.guides)
    finally:
        torch.set_default_dtype(torch.float32)
    results = {"args": vars(args), "linear": linear, "banana": banana}
    if args.train_epochs > 0:
        results["train_full_cov"] = train_full_cov(out / "train_full_cov", args.train_epochs, args.train_eval_samples)
    torch.set_default_dtype(torch.float64)
    try:
        plot_gaps(linear, banana, out / "gaps.png")
        plot_banana(trained["model"], trained["x"], trained["guides"], banana["rows"], out / "banana_posteriors.png")
    finally:
        torch.set_default_dtype(torch.float32)
    write_json(out / "results.json", results)
    write_run_record(out, args, seed=args.seed)
    for study in ("linear", "banana"):
        for row in results[study]["rows"]:
            print(f"{study:7s} {row['guide']:10s} gap {row['gap']:.5f} ± {row['gap_se']:.5f}")
    if "train_full_cov" in results:
        print("pyrovae train full-cov: gap", results["train_full_cov"]["gap"], "SE", results["train_full_cov"]["test_elbo_se"])
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
