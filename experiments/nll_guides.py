"""Test NLL on MNIST with richer guides, a VampPrior and the tighter-bound objectives (issue 19,
experiment 3).

Every cell is a `pyrovae train` run (resumable, in --out/<network>_<cell>) on dynamically binarized
MNIST with a Bernoulli decoder, 50 latent dimensions, batch 100, Adam at 1e-3, --epochs passes
(the main job's budget: 20) and seed 0, on two networks:

- **main**: the main job's 784-400-50 ReLU MLPs, torch initialisation;
- **burda**: Burda et al.'s one-stochastic-layer net, 784-200-200-50 tanh MLPs, Glorot
  initialisation.

The cells (:data:`CELLS`) change one thing against **ffg** (the amortized diagonal Gaussian, N(0, I)
prior, Trace_ELBO):

- guides: **full-cov**, **iaf**, **planar** (--flow-layers layers);
- prior: **vamp** (VampPrior, --pseudo-inputs pseudo-inputs);
- objectives, all with --objective-draws draws per point (default 64, Rainforth et al.'s): **iwae**
  (K = 64), **miwae** (M = 4 groups of K = 16), **piwae** (M = 4, K = 16), **ciwae** (K = 64,
  β = 0.5); on the networks --objectives-on names (default both).

Each cell's test log-likelihood is importance-sampled with K = --eval-samples draws from its guide,
over the full test set (one fixed binarization draw). Writes --docs/results.json and nll.png, and
each finished cell's metrics to --docs/cells/ (read back instead of retraining, so the sweep
survives a fresh checkout without its run folders).
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

#: The two networks: name -> model options.
NETWORKS: dict[str, dict[str, Any]] = {
    "main": dict(hidden_sizes=(400,), activation="relu", weight_init="torch"),
    "burda": dict(hidden_sizes=(200, 200), activation="tanh", weight_init="glorot"),
}

#: MIWAE's and PIWAE's number of groups M (Rainforth et al. 2018 use M = 4 of K = 16).
GROUPS = 4

#: The cells: name -> the options it changes against ffg (flow_layers and the VampPrior's size
#: come from the flags).
CELLS: dict[str, dict[str, Any]] = {
    "ffg": {},
    "full-cov": dict(guide="full-cov"),
    "iaf": dict(guide="iaf"),
    "planar": dict(guide="planar"),
    "vamp": dict(prior="vamp"),
    "iwae": dict(objective="iwae"),
    "miwae": dict(objective="miwae", num_groups=GROUPS),
    "piwae": dict(objective="piwae", num_groups=GROUPS),
    "ciwae": dict(objective="ciwae", ciwae_beta=0.5),
}

#: The objective cells, which draw --objective-draws per point per step (M = GROUPS groups of
#: --objective-draws / M for MIWAE and PIWAE).
OBJECTIVE_CELLS = ("iwae", "miwae", "piwae", "ciwae")

#: What the table reports of each run's metrics.json.
KEYS = ("test_log_likelihood", "test_log_likelihood_se", "test_nll", "test_elbo", "test_elbo_se", "kl",
        "active_units", "train_seconds", "eval_seconds", "epochs")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    parser.add_argument("--out", default="runs/nll_guides", help="one run folder per network and cell")
    parser.add_argument("--docs", default="docs/nll_guides", help="results.json and nll.png")
    parser.add_argument("--eval-samples", type=int, default=5000, help="K of the test log-likelihood")
    parser.add_argument("--flow-layers", type=int, default=4, help="layers of the iaf and planar guides")
    parser.add_argument("--pseudo-inputs", type=int, default=500, help="the VampPrior's pseudo-inputs")
    parser.add_argument("--objective-draws", type=int, default=64,
                        help=f"draws per point of the objective cells (a multiple of {GROUPS})")
    parser.add_argument("--objectives-on", nargs="+", default=None, choices=list(NETWORKS),
                        help="the networks that get the objective cells (default: every one of --networks)")
    parser.add_argument("--skip-busy", action="store_true",
                        help="leave out cells another process is training (to split the work over processes)")
    add_common_args(parser, epochs=20)
    args = parser.parse_args(argv)
    if args.objective_draws < GROUPS or args.objective_draws % GROUPS:
        parser.error(f"--objective-draws must be a positive multiple of {GROUPS} (MIWAE's groups), got {args.objective_draws}")
    return args


def cell_name(network: str, cell: str) -> str:
    return f"{network}_{cell}"


def cells_of(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The (network, cell) pairs the flags ask for, in table order."""
    objectives_on = args.networks if args.objectives_on is None else args.objectives_on
    return [(network, cell) for network in args.networks for cell in args.cells
            if cell not in OBJECTIVE_CELLS or network in objectives_on]


def configs(args: argparse.Namespace) -> dict[str, TrainConfig]:
    out = {}
    for network, cell in cells_of(args):
        options = dict(CELLS[cell])
        if options.get("guide") in ("iaf", "planar"):
            options["flow_layers"] = args.flow_layers
        if options.get("prior") == "vamp":
            options["num_pseudo_inputs"] = args.pseudo_inputs
        if cell in OBJECTIVE_CELLS:
            grouped = cell in ("miwae", "piwae")
            options["num_particles"] = args.objective_draws // GROUPS if grouped else args.objective_draws
        out[cell_name(network, cell)] = TrainConfig(
            z_dim=50, epochs=args.epochs, eval_samples=args.eval_samples, num_train=args.num_train,
            num_test=args.num_test, device=args.device, seed=args.seed, **NETWORKS[network], **options)
    return out


def plot_nll(rows: list[dict[str, Any]], path: Path) -> None:
    """Test NLL of every cell, one panel per network, with ±2 standard errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    networks = sorted({r["network"] for r in rows}, key=list(NETWORKS).index)
    fig, axes = plt.subplots(1, len(networks), figsize=(4.5 * len(networks), 3.6), squeeze=False)
    for ax, network in zip(axes[0], networks):
        mine = [r for r in rows if r["network"] == network]
        ax.errorbar(range(len(mine)), [r["test_nll"] for r in mine],
                    yerr=[2 * r["test_log_likelihood_se"] for r in mine], fmt="o", color="#4477aa")
        ax.set_xticks(range(len(mine)), [r["cell"] for r in mine], rotation=45, ha="right")
        ax.set_title(network)
        ax.set_ylabel("test NLL (nats), K-sample IS")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup(args)
    cells = configs(args)
    docs = Path(args.docs)
    results = run_configs(cells, Path(args.out), data_dir=args.data_dir, skip_busy=args.skip_busy, keep=docs / "cells")
    rows = []
    for network, cell in cells_of(args):
        metrics = results.get(cell_name(network, cell))
        if metrics is None:
            continue
        row = {"network": network, "cell": cell, **{k: metrics.get(k) for k in KEYS}}
        row["train_seconds"] = sum(metrics["seconds_per_epoch"])  # every part of a resumed run
        rows.append(row)
        logging.info("%s %s: NLL %.2f ± %.2f, ELBO %.2f", network, cell, row["test_nll"],
                     row["test_log_likelihood_se"], row["test_elbo"])
    docs.mkdir(parents=True, exist_ok=True)
    summary = {"rows": rows, "config": {k: v.to_dict() for k, v in cells.items()}}
    write_json(docs / "results.json", summary)
    plot_nll(rows, docs / "nll.png")
    write_run_record(docs, args, configs=summary["config"], device=args.device)
    return summary


if __name__ == "__main__":
    main()
