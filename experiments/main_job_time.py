"""How long the README's main job takes, and what ``--eval-samples`` trades for that time.

Runs the README's main job exactly (``pyrovae train --data-dir D --out OUT/run``: every default,
K = 5000), timing the whole command and reading its training and evaluation seconds from
``metrics.json``; then evaluates the same checkpoint again with K = each of ``--eval-samples``
(``pyrovae evaluate --eval-samples K``) and records, for every K, the evaluation's seconds, the
test log p̂(x) with its Monte Carlo standard error and the ELBO. First, a floor on the K = 5000
evaluation: the rate of this machine's float32 matrix product at the shape of the decoder's output
layer on one chunk (10,000 rows of 400 → 784), and the seconds that product alone takes for every
image and draw (``gemm_floor_k5000`` in the results). The machine should be free of other jobs (the run record names
it). Writes ``--docs/results.json`` and ``run.json``::

    python experiments/main_job_time.py --data-dir ../shared/data --out runs/main_job_time --docs docs/main_job_time
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Optional

from studies.provenance import write_run_record
from studies.sweep import setup

KEYS = ("test_log_likelihood", "test_log_likelihood_se", "test_elbo", "test_elbo_se", "test_ess", "eval_seconds")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="folder holding MNIST/raw (else $PYROVAE_DATA)")
    parser.add_argument("--out", default="runs/main_job_time", help="the main job's run folder goes in OUT/run")
    parser.add_argument("--docs", default="docs/main_job_time", help="results.json and run.json")
    parser.add_argument("--eval-samples", type=int, nargs="*", default=[1000, 2000], help="the other K to evaluate at")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, as the CLI)")
    parser.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                        help="more `pyrovae train` flags (the tests shrink the job with these)")
    return parser.parse_args(argv)


def gemm_floor(num_test: int = 10000, k: int = 5000, hidden: int = 400, x_dim: int = 784, repeats: int = 5) -> dict[str, Any]:
    """The decoder's output layer as one matrix product per chunk of 100 images × 100 draws: its
    best rate of ``repeats`` here, and the seconds ``num_test × k`` rows of it take at that rate."""
    import torch
    from studies.speed import count_macs, interleaved_timings

    rows = 10000
    h, w, b = torch.randn(rows, hidden), torch.randn(x_dim, hidden), torch.randn(x_dim)
    timing = interleaved_timings({"addmm": lambda: torch.addmm(b, h, w.t())}, repeats=repeats, calls=1, warmup=1)
    best = min(timing.seconds["addmm"])
    flops = 2 * rows * count_macs([hidden, x_dim])
    total = 2 * num_test * k * count_macs([hidden, x_dim])
    return {"gflops": flops / best / 1e9, "total_flops": total, "seconds": total / (flops / best),
            "rows": rows, "shape": [hidden, x_dim], "threads": torch.get_num_threads()}


def row_of(metrics: dict[str, Any], k: int) -> dict[str, Any]:
    return {"eval_samples": k, **{key: metrics[key] for key in KEYS}}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup(args)
    from pyrovae.app.cli import main as cli

    floor = gemm_floor()
    folder = Path(args.out) / "run"
    command = ["train", "--out", str(folder), "--no-progress", "--overwrite", *args.train_args]
    if args.data_dir is not None:
        command[1:1] = ["--data-dir", args.data_dir]
    start = time.perf_counter()
    if cli(command) != 0:
        raise SystemExit(f"pyrovae {' '.join(command)} failed")
    wall = time.perf_counter() - start
    metrics = json.loads((folder / "metrics.json").read_text())
    rows = [row_of(metrics, metrics["eval_samples"])]
    for k in args.eval_samples:
        out = Path(args.out) / f"evaluate_k{k}.json"
        evaluate = ["evaluate", "--checkpoint", str(folder / "checkpoint.pt"), "--eval-samples", str(k), "--out", str(out), "--no-progress"]
        if args.data_dir is not None:
            evaluate[1:1] = ["--data-dir", args.data_dir]
        if cli(evaluate) != 0:
            raise SystemExit(f"pyrovae {' '.join(evaluate)} failed")
        rows.append(row_of(json.loads(out.read_text()), k))
    rows.sort(key=lambda r: r["eval_samples"])
    summary = {
        "command": "pyrovae " + " ".join(command),
        "wall_seconds": wall,
        "train_seconds": metrics["train_seconds"],
        "eval_seconds": metrics["eval_seconds"],
        "num_test": metrics["num_test"],
        "epochs": metrics["epochs"],
        "torch_threads": metrics["torch_threads"],
        "rows": rows,
        "gemm_floor_k5000": floor,
        # the time the job would take at each K: its training plus that K's evaluation
        "job_seconds_at_k": {str(r["eval_samples"]): metrics["train_seconds"] + r["eval_seconds"] for r in rows},
    }
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_run_record(docs, args, configs={"main_job": metrics["config"]})
    for r in rows:
        print(f"K = {r['eval_samples']:5d}: log p̂ {r['test_log_likelihood']:.3f} ± {r['test_log_likelihood_se']:.4f}, "
              f"ELBO {r['test_elbo']:.3f}, evaluation {r['eval_seconds']:.0f} s")
    print(f"the output layer's matrix products alone, K = 5000: {floor['seconds']:.0f} s at {floor['gflops']:.0f} GFLOP/s")
    print(f"the main job: {wall:.0f} s wall-clock ({metrics['train_seconds']:.0f} s training, "
          f"{metrics['eval_seconds']:.0f} s evaluation)")
    return summary


if __name__ == "__main__":
    main()
