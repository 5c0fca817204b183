"""How much better than a deterministic baseline does a conditional VAE model the unobserved
quadrants of an MNIST digit, given 1, 2 or 3 observed ones? (Sohn, Lee & Yan 2015, Table 1; the
task of Pyro's ``examples/cvae``; issue 20.)

For each number of observed quadrants (--quadrants, default 1 2 3) one `pyrovae train --model cvae`
run (resumable, in --out/q<N>) on dynamically binarized MNIST: the baseline (a 784-500-500-784 ReLU
MLP predicting the unobserved pixels from x_obs, Bernoulli likelihood) trained by maximum likelihood
for --baseline-epochs, then the CVAE (prior, generation and recognition networks with the same
hidden widths, z_dim 200 as in Pyro's example; the prior network reads x_obs filled with the
baseline's prediction) for --epochs with Trace_ELBO, Adam 1e-3, batch 100.

Each run reports on the test set (one fixed binarization draw) the CVAE's negative conditional
log-likelihood -log p(y|x_obs), importance-sampled with K = --eval-samples draws of q(z|x_obs, y)
(with its Monte Carlo standard error), and the baseline's exact -log p(y|x_obs), with the standard
errors of the means over the test points and of their paired difference. Writes --docs/results.json,
results.md (the table), nll.png and completions.png (per quadrant count, columns: test digits;
rows: observed quadrants, baseline, three CVAE samples, the digit), with run.json; each finished
cell's metrics go to --docs/cells/ (read back instead of retraining).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from studies.provenance import write_run_record
from studies.sweep import add_common_args, run_configs, setup

from pyrovae.app.config import TrainConfig
from pyrovae.app.run import write_json

#: What the table reports of each run's metrics.json.
KEYS = ("test_conditional_nll", "test_conditional_nll_se", "test_conditional_nll_data_se", "baseline_test_nll",
        "baseline_test_nll_data_se", "cvae_gain_over_baseline", "cvae_gain_over_baseline_data_se", "test_elbo",
        "kl", "active_units", "eval_samples", "num_test", "epochs", "baseline_epochs", "eval_seconds")

#: Test digits shown per quadrant count in completions.png, and CVAE samples of each.
SHOWN, SAMPLES = 10, 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quadrants", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3],
                        help="numbers of observed quadrants, one run each")
    parser.add_argument("--baseline-epochs", type=int, default=None, help="epochs of the baseline (default: --epochs)")
    parser.add_argument("--eval-samples", type=int, default=100, help="K of the importance-sampled conditional NLL")
    parser.add_argument("--z-dim", type=int, default=200, help="latent dimension (Pyro's example: 200)")
    parser.add_argument("--hidden-sizes", type=int, nargs="+", default=[500, 500], help="hidden widths of every network")
    parser.add_argument("--out", type=str, default="runs/cvae_quadrants", help="one run folder per quadrant count")
    parser.add_argument("--docs", type=str, default="docs/cvae_quadrants",
                        help="results.json, results.md, nll.png, completions.png")
    parser.add_argument("--skip-busy", action="store_true",
                        help="leave out runs another process is training (to split the work over processes)")
    add_common_args(parser, epochs=20)
    args = parser.parse_args(argv)
    if args.baseline_epochs is None:
        args.baseline_epochs = args.epochs
    for name in ("epochs", "baseline_epochs", "eval_samples", "z_dim"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def cell_name(quadrants: int) -> str:
    return f"q{quadrants}"


def configs(args: argparse.Namespace) -> dict[str, TrainConfig]:
    return {
        cell_name(q): TrainConfig(
            model="cvae", quadrants=q, cvae_baseline_epochs=args.baseline_epochs, epochs=args.epochs,
            z_dim=args.z_dim, hidden_sizes=tuple(args.hidden_sizes), eval_samples=args.eval_samples,
            num_train=args.num_train, num_test=args.num_test, device=args.device, seed=args.seed)
        for q in args.quadrants
    }


def row_of(quadrants: int, metrics: dict[str, Any]) -> dict[str, Any]:
    row = {"quadrants": quadrants, **{k: metrics.get(k) for k in KEYS}}
    row["train_seconds"] = sum(metrics["seconds_per_epoch"])  # the CVAE's epochs, every part of a resumed run
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """The results as a Markdown table (nats per image, ± the Monte Carlo SE, [± the SE over test points])."""
    lines = ["| observed quadrants | baseline NLL | CVAE NLL (K-sample IS) | CVAE gain over baseline |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['quadrants']} | {r['baseline_test_nll']:.2f} [± {r['baseline_test_nll_data_se']:.2f}] | "
            f"{r['test_conditional_nll']:.2f} ± {r['test_conditional_nll_se']:.2f} [± {r['test_conditional_nll_data_se']:.2f}] | "
            f"{r['cvae_gain_over_baseline']:.2f} [± {r['cvae_gain_over_baseline_data_se']:.2f}] |")
    return "\n".join(lines) + "\n"


def plot_nll(rows: list[dict[str, Any]], path: Path) -> None:
    """Test NLL against the number of observed quadrants, baseline and CVAE, ±2 SE over test points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.6))
    q = [r["quadrants"] for r in rows]
    for key, label, color in (("baseline_test_nll", "baseline (exact)", "#ee6677"),
                              ("test_conditional_nll", "CVAE (importance sampled)", "#4477aa")):
        ax.errorbar(q, [r[key] for r in rows], yerr=[2 * r[f"{key}_data_se"] for r in rows], fmt="o-",
                    color=color, label=label, capsize=3)
    ax.set_xticks(q)
    ax.set_xlabel("observed quadrants")
    ax.set_ylabel("test NLL -log p(y|x_obs) (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_completions(args: argparse.Namespace, names: list[str], path: Path) -> bool:
    """completions.png from the runs' folders (reloaded with load_run); ``False`` when a run folder is
    missing (a fresh checkout with the kept cells only), leaving an earlier figure as it is."""
    import torch

    from pyrovae.app import plots
    from pyrovae.app.families.cvae import completion_rows
    from pyrovae.app.run import load_run
    from pyrovae.train import evaluation_data

    blocks = []
    for name in names:
        folder = Path(args.out) / name
        if not (folder / "checkpoint.pt").is_file():
            logging.warning("%s: no run folder, completions.png not redrawn", name)
            return False
        run = load_run(folder, data_dir=args.data_dir)
        x = evaluation_data(run.dataset, "test", run.config.seed)[:SHOWN]
        torch.manual_seed(args.seed)
        blocks.append(completion_rows(run.model, x, SAMPLES).cpu())
    images = torch.cat(blocks)  # (rows, SHOWN, D)
    plots.save_image_grid(images.reshape(-1, images.shape[-1]), path, run.dataset.image_shape, nrow=images.shape[1])
    return True


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup(args)
    cells = configs(args)
    docs = Path(args.docs)
    results = run_configs(cells, Path(args.out), data_dir=args.data_dir, skip_busy=args.skip_busy, keep=docs / "cells")
    rows = []
    for q in args.quadrants:
        metrics = results.get(cell_name(q))
        if metrics is None:
            continue
        rows.append(row_of(q, metrics))
        logging.info("%d quadrants: baseline NLL %.2f, CVAE NLL %.2f ± %.2f", q, rows[-1]["baseline_test_nll"],
                     rows[-1]["test_conditional_nll"], rows[-1]["test_conditional_nll_se"])
    docs.mkdir(parents=True, exist_ok=True)
    summary = {"rows": rows, "config": {k: v.to_dict() for k, v in cells.items()}}
    write_json(docs / "results.json", summary)
    (docs / "results.md").write_text(table(rows))
    plot_nll(rows, docs / "nll.png")
    save_completions(args, [cell_name(r["quadrants"]) for r in rows], docs / "completions.png")
    write_run_record(docs, args, configs=summary["config"], device=args.device)
    return summary


if __name__ == "__main__":
    main()
