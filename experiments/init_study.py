"""How the networks' starting point shapes the first epochs of Burda et al.'s MNIST models.

Trains the one-layer (784-200-200-50) and two-layer (200-200 → 100 → 100-100 → 50) tanh models of
experiments/iwae_table.py with the ELBO (K = 1) for the first --epochs epochs of that study's
schedule, from four starts:

- ``torch``: torch's default initialisation, U(±1/√fan_in) weights and biases;
- ``glorot``: Glorot-uniform weights and zero biases (``--weight-init glorot``);
- ``data-bias``: torch's weights, with the decoder's output bias at the logit of the mean
  training image (``--data-bias``);
- ``glorot+data-bias``: both, as in the paper's code (the start iwae_table.py uses).

For each run: the test ELBO per epoch, the final test log-likelihood (K = --eval-samples), the KL
to the prior and the active units of every latent layer. Each run is a `pyrovae train` run in
--out/<model>-<start> (resumable). Writes --docs/results.json, table.md and curves.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Any

from studies import burda
from studies.provenance import rederive, write_run_record
from studies.sweep import add_common_args, run_configs, setup

from pyrovae.app.run import write_json

#: start -> (weight_init, data_bias)
STARTS: dict[str, tuple[str, bool]] = {
    "torch": ("torch", False),
    "glorot": ("glorot", False),
    "data-bias": ("torch", True),
    "glorot+data-bias": ("glorot", True),
}
#: model -> the Burda cell whose architecture it takes
MODELS = {"one-layer": "k1", "two-layer": "2l-k1"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/init_study", help="one run folder per model and start")
    parser.add_argument("--docs", default="docs/init_study", help="results.json, table.md and curves.png")
    parser.add_argument("--eval-samples", type=int, default=100, help="K of the final test log-likelihood")
    parser.add_argument("--study-epochs", type=int, default=100,
                        help="the length of the iwae_table.py schedule whose first --epochs epochs are run")
    parser.add_argument("--summarize-only", action="store_true",
                        help="train nothing: recompute the derived comparisons of --docs/results.json from its rows")
    add_common_args(parser, epochs=10)
    return parser.parse_args(argv)


def configs(args: argparse.Namespace) -> dict[str, Any]:
    """The runs: the K = 1 cells of the Burda study, cut to the first ``--epochs`` epochs of its
    schedule (the same learning rates), one per model and start."""
    full = burda.Schedule(epochs=args.study_epochs)
    schedule = dataclasses.replace(full, epochs=args.epochs, final_lr_factor=full.lr_decay**args.epochs)
    runs = {}
    for model, cell in MODELS.items():
        base = burda.cell_config(cell, schedule, seed=args.seed, device=args.device, num_train=args.num_train,
                                 num_test=args.num_test, eval_samples=args.eval_samples)
        for start, (weight_init, data_bias) in STARTS.items():
            runs[f"{model}-{start}"] = dataclasses.replace(base, weight_init=weight_init, data_bias=data_bias)
    return runs


def summarize(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for model, start in ((m, s) for m in MODELS for s in STARTS):
        name = f"{model}-{start}"
        if name not in results:
            continue
        metrics = results[name]
        rows.append({
            "run": name, "model": model, "start": start,
            "test_elbo_per_epoch": metrics["test_bound_per_epoch"],
            "test_elbo": metrics["test_elbo"], "test_nll": metrics["test_nll"], "kl": metrics["kl"],
            "active_units_by_site": metrics.get("active_units_by_site", {"z": metrics["active_units"]}),
            "train_seconds": metrics["train_seconds"],
        })
    return rows


def derived(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The page's comparisons, with the test ELBO at the last epoch (``test_elbo_per_epoch[-1]``) and
    the final test NLL: each start's gain over torch's start per model, what Glorot weights add to the
    data bias, and the two-layer model against the one-layer one for the same start."""
    by = {(r["model"], r["start"]): r for r in rows}

    def elbo(r: dict[str, Any]) -> float:
        return r["test_elbo_per_epoch"][-1]

    def gain(better: dict[str, Any], base: dict[str, Any]) -> dict[str, float]:
        return {"test_elbo_gain": elbo(better) - elbo(base), "test_nll_gain": base["test_nll"] - better["test_nll"]}

    gains = {f"{model} {start}": gain(r, by[(model, "torch")])
             for (model, start), r in by.items() if start != "torch" and (model, "torch") in by}
    glorot = {model: gain(by[(model, "glorot+data-bias")], by[(model, "data-bias")])
              for model in MODELS if (model, "glorot+data-bias") in by and (model, "data-bias") in by}
    layers = {start: gain(by[("two-layer", start)], by[("one-layer", start)])
              for start in STARTS if ("two-layer", start) in by and ("one-layer", start) in by}
    return {"gain_over_torch_start": gains, "glorot_over_data_bias": glorot, "two_layer_over_one_layer": layers}


def markdown_table(rows: list[dict[str, Any]], epochs: int, eval_samples: int) -> str:
    lines = [f"| model | start | test ELBO, epoch 1 | test ELBO, epoch {epochs} | test NLL (K = {eval_samples}) | "
             "KL | active units |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        units = ", ".join(f"{site} {n}" for site, n in r["active_units_by_site"].items())
        lines.append(f"| {r['model']} | {r['start']} | {r['test_elbo_per_epoch'][0]:.2f} | "
                     f"{r['test_elbo_per_epoch'][-1]:.2f} | {r['test_nll']:.2f} | {r['kl']:.2f} | {units} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MODELS), figsize=(10, 4), sharey=True)
    for ax, model in zip(axes, MODELS):
        for r in (r for r in rows if r["model"] == model):
            bounds = r["test_elbo_per_epoch"]
            ax.plot(range(1, len(bounds) + 1), bounds, marker="o", ms=3, label=r["start"])
        ax.set_title(f"{model} model")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("test ELBO (nats)")
    fig.suptitle("Burda et al.'s MNIST models: the first epochs from four starts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.summarize_only:
        return rederive(args.docs, args, lambda summary: {**summary, "derived": derived(summary["rows"])},
                        role="summarize-only: derived recomputed from results.json's rows; nothing trained")
    setup(args)
    runs = configs(args)
    results = run_configs(runs, Path(args.out), data_dir=args.data_dir,
                          after=lambda name, m: logging.info("%s: test ELBO %.2f", name, m["test_elbo"]))
    rows = summarize(results)
    summary = {"epochs": args.epochs, "study_epochs": args.study_epochs, "eval_samples": args.eval_samples,
               "rows": rows, "derived": derived(rows)}
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    write_json(docs / "results.json", summary)
    write_run_record(docs, args, configs={k: v.to_dict() for k, v in runs.items()}, device=args.device)
    table = markdown_table(rows, args.epochs, args.eval_samples)
    (docs / "table.md").write_text(table)
    plot(rows, docs / "curves.png")
    print(table)
    return summary


if __name__ == "__main__":
    main()
