"""Burda, Grosse & Salakhutdinov (2016), Table 1 (MNIST, one and two stochastic layers) on a CPU budget.

Trains the 784-200-200-50 tanh VAE (and the two-layer 200-200 → 100 → 100-100 → 50 model, cells 2l-*) with the K-sample ELBO ("VAE") and with the IWAE bound,
K ∈ {1, 5, 50}, every cell under the same schedule (--epochs passes, batch --batch-size, Adam from
--lr decayed geometrically to --lr × --final-lr-factor), then evaluates the test NLL with 5000
importance samples and counts active units. Each cell is a `pyrovae train` run in --out/<cell>, so
an interrupted run (Ctrl-C, a lost session) continues where it stopped when started again; cells
already finished are not redone. Cells can run in separate processes to use more cores: give each
its own --cells, or start the same command twice (a cell that another process is training is
skipped, so each takes the next free one).

Writes --docs/results.json (our table beside the paper's, the orderings, convergence of each cell,
the budget), --docs/run.json (the command, the cells' configs, the commit and the machine of this
run) and --docs/curves.png (test bound per epoch).

Example (the committed run, two processes):
    python experiments/iwae_table.py --cells iwae-k50 k1 iwae-k5 &
    python experiments/iwae_table.py --cells vae-k50 vae-k5 &
    wait; python experiments/iwae_table.py --report-only
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from studies import burda
from studies.provenance import write_run_record
from studies.sweep import run_configs

from pyrovae.app.run import write_json
from pyrovae.runtime.interrupt import TrainingInterrupted
from pyrovae.runtime.perf import tune_malloc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", nargs="+", choices=list(burda.CELLS), default=list(burda.TABLE_CELLS),
                        help="which cells to train and evaluate (k1 is VAE = IWAE at K=1)")
    parser.add_argument("--out", default="runs/iwae_table", help="one run folder per cell (checkpoints)")
    parser.add_argument("--docs", default="docs/iwae_table", help="where results.json and curves.png go")
    parser.add_argument("--epochs", type=int, default=100, help="passes over the training set per cell")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3, help="initial Adam step size")
    parser.add_argument("--final-lr-factor", type=float, default=0.1, help="final step size / initial")
    parser.add_argument("--eval-samples", type=int, default=5000, help="K of the test log-likelihood")
    parser.add_argument("--num-train", type=int, default=None, help="first training points (default all)")
    parser.add_argument("--num-test", type=int, default=None, help="first test points (default all 10,000)")
    parser.add_argument("--data-dir", default=None, help="folder holding MNIST/raw (else $PYROVAE_DATA)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    parser.add_argument("--torch-init", action="store_true",
                        help="keep torch's default initialisation instead of the paper's (Glorot weights, "
                             "decoder output bias at the logit of the mean image); use its own --out")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report from finished cells")
    parser.add_argument("--summarize-only", action="store_true",
                        help="train and collect nothing: recompute the derived numbers of --docs/results.json "
                             "(margins, gaps) from its rows, and --docs/comparisons.json from the reports under --docs")
    parser.add_argument("--progress", action="store_true", help="progress bars")
    return parser.parse_args(argv)


def init_of(args: argparse.Namespace) -> str:
    """The start of every cell, named as in :data:`burda.INITS`."""
    return "torch" if args.torch_init else "paper"


def run_cells(args: argparse.Namespace, schedule: burda.Schedule) -> None:
    configs = {
        cell: burda.cell_config(cell, schedule, seed=args.seed, device=args.device, num_train=args.num_train,
                                num_test=args.num_test, eval_samples=args.eval_samples,
                                init=init_of(args))
        for cell in args.cells
    }
    run_configs(configs, Path(args.out), data_dir=args.data_dir, progress=args.progress, skip_busy=True,
                after=lambda cell, m: logging.info("%s: test NLL %.2f, active units %d", cell, m["test_nll"], m["active_units"]))


def report(args: argparse.Namespace, schedule: burda.Schedule) -> dict[str, object]:
    results = burda.collect(Path(args.out))
    rows = burda.table_rows(results)
    init = init_of(args)
    summary = {
        "schedule": burda.schedule_dict(schedule),
        "paper": {"epochs": burda.PAPER["epochs"], "batch_size": burda.PAPER["batch_size"]},
        "init": init,
        "cells_with_another_init": sorted(cell for cell, m in results.items() if burda.init_name(m["config"]) != init),
        "rows": rows,
        "ordering": burda.ordering_checks(rows),
        "estimators": burda.estimator_rows(results),
        "cells_missing": sorted(set(burda.TABLE_CELLS) - set(results)),
        "num_test": {cell: m["num_test"] for cell, m in results.items()},
    }
    summary["derived"] = burda.derived(summary)
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    write_json(docs / "results.json", summary)
    # The cells were trained by earlier commands (their own run folders); this run only collected them.
    write_run_record(docs, args, device=args.device, role="report" if args.report_only else "train and report",
                     configs={cell: m["config"] for cell, m in results.items()},
                     cells_trained_here=[] if args.report_only else list(args.cells))
    if results:
        plot_curves(results, docs / "curves.png")
    table = markdown_table(summary)
    (docs / "table.md").write_text(table)
    print(table)
    return summary


INIT_TEXT = {
    "paper": "as in the paper's code (Glorot-uniform weights, zero biases, decoder output bias at the logit of the mean image)",
    "torch": "torch's default (`--torch-init`)",
}


def markdown_table(summary: dict) -> str:
    """Our table beside the paper's, the orderings and the estimator cells, as Markdown."""
    def fmt(value: object, spec: str = ".2f") -> str:
        return "–" if value is None else format(value, spec)

    def units(row: dict) -> str:
        # A two-layer model's count is given per layer: z1's absolute count under a learned p(z1|z2)
        # is not comparable with anything, so a total would hide the number to read (z2's).
        by_site = row.get("active_units_by_site") or {}
        if len(by_site) > 1:
            return ", ".join(f"{site} {count}" for site, count in by_site.items())
        return fmt(row.get("active_units"), "d")

    lines = ["| layers | objective | K | test NLL, ours | paper | ours − paper | active units | epochs | "
             "test-bound gain in the last 10 % of epochs |", "|---|---|---|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        lines.append(
            f"| {row['layers']} | {row['objective']} | {row['k']} | {fmt(row.get('nll'))} | {row['paper_nll']:.2f} | "
            f"{fmt(row.get('difference'))} | {units(row)} | {fmt(row.get('epochs'), 'd')} | "
            f"{fmt(row.get('convergence_gain'), '.3f')} |"
        )
    lines += ["", "| ordering (paper's) | holds here |", "|---|---|"]
    lines += [f"| {name} | {'–' if ok is None else ('yes' if ok else '**no**')} |" for name, ok in summary["ordering"].items()]
    lines += ["", "| IWAE K=50, encoder gradient | test NLL | active units |", "|---|---|---|"]
    lines += [f"| {row['estimator']} | {fmt(row.get('nll'))} | {fmt(row.get('active_units'), 'd')} |"
              for row in summary["estimators"]]
    s = summary["schedule"]
    lines += ["", f"Budget per cell: {s['epochs']} epochs (the paper: {summary['paper']['epochs']}), batch "
              f"{s['batch_size']} (the paper: {summary['paper']['batch_size']}), Adam from {s['lr']:g} to {s['final_lr']:g} "
              f"(×{s['lr_decay_per_epoch']:.4f} per epoch). Initialisation: {INIT_TEXT[summary['init']]}. "
              f"Missing cells: {', '.join(summary['cells_missing']) or 'none'}."]
    if summary["cells_with_another_init"]:
        lines.append(f"**Cells started another way (not comparable): {', '.join(summary['cells_with_another_init'])}.**")
    return "\n".join(lines) + "\n"


def plot_curves(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    # Up to 12 cells: the default cycle's 10 colours would repeat, so take tab20's (its 10 dark
    # colours, then the 10 light ones) and draw the two-layer cells dashed.
    tab20 = plt.get_cmap("tab20").colors
    colors = tab20[0::2] + tab20[1::2]
    for i, (cell, metrics) in enumerate(sorted(results.items())):
        bounds = metrics["test_bound_per_epoch"]
        epochs = range(1, len(bounds) + 1)
        color = colors[i % len(colors)]
        ax.plot(epochs, [-b for b in bounds], color=color, ls="--" if cell.startswith("2l-") else "-",
                label=f"{cell}: {metrics['bound_name']}")
        ax.axhline(metrics["test_nll"], color=color, ls=":", lw=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test −bound (nats); dotted: final NLL, K=5000")
    lows = [m["test_nll"] for m in results.values()]
    ax.set_ylim(min(lows) - 1, min(lows) + 12)
    ax.set_title("Burda et al. Table 1 cells: test bound during training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


REPORTS = {"table": ".", "300_epochs": "300_epochs", "torch_init": "torch_init", "torch_init/seed1": "torch_init/seed1"}


def summarize_only(args: argparse.Namespace) -> dict[str, object]:
    """Recompute ``derived`` in --docs/results.json and write --docs/comparisons.json (see --summarize-only)."""
    docs = Path(args.docs)
    path = docs / "results.json"
    summary = json.loads(path.read_text())
    summary["derived"] = burda.derived(summary)
    write_json(path, summary)
    role = "summarize-only: derived numbers recomputed from results.json's rows; nothing trained or collected"
    write_run_record(docs, args, role=role)
    reports = {name: json.loads((docs / sub / "results.json").read_text())
               for name, sub in REPORTS.items() if (docs / sub / "results.json").exists()}
    if len(reports) > 1:
        write_json(docs / "comparisons.json", {"compared": {n: str(docs / REPORTS[n] / "results.json") for n in reports},
                                               **burda.compare(reports)})
    return summary


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    if args.summarize_only:
        return summarize_only(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tune_malloc()
    schedule = burda.Schedule(args.epochs, args.batch_size, args.lr, args.final_lr_factor)
    if not args.report_only:
        try:
            run_cells(args, schedule)
        except TrainingInterrupted as stop:
            logging.warning("%s; run the same command again to continue", stop)
            raise SystemExit(128 + stop.signum) from None
    return report(args, schedule)


if __name__ == "__main__":
    main()
