"""Kingma et al.'s (2014) semi-supervised M2 on MNIST with 100, 600, 1000 and 3000 labels, and three
ways to treat the unknown label y: summed out exactly, sampled with score-function gradients, or
sampled by straight-through Gumbel-softmax (issue 20, M2 half).

**Cells.** One `pyrovae train --model m2` run per cell (resumable, in --out/<cell>; each finished
cell's metrics kept in --docs/cells/ and read back instead of retraining), on dynamically binarized
MNIST, Bernoulli decoder, Kingma et al.'s networks (one hidden layer of 500 softplus units in the
classifier, the encoder and the decoder; z of dimension 50), α = 0.1 N / labels per labelled point (their
α = 0.1 N on the mean over the labelled points: in their code, dpkingma/nips14-ssl learn_yz_x_ss.py, each
labelled point's log q(y|x) is scaled by ``alpha * n_tot / n_labeled`` with alpha = 0.1), Adam at --lr, batch 100, --epochs passes, seed --seed; the labels
balanced (labels/10 per class) and fixed by the seed, the rest of the 60,000 unlabelled:

- ``l<n>_enum`` for each n of --labels: y enumerated (``--y-mode enum --objective elbo-enum``);
- for the smallest n, ``l<n>_enum-a<α>`` for each α of --extra-alphas: the same with that α per labelled
  point (the default 6000 = 0.1 N: the weight if their expectation over the labelled points were a sum);
- for the smallest n (100 by default) also ``l<n>_score-elbo`` (y sampled, ``--objective elbo``: the
  log-derivative trick with each point's ELBO as its signal, no baseline), ``l<n>_score-vimco`` (y
  sampled, ``--objective iwae --num-particles K``: VIMCO's leave-one-out signal; the IWAE bound of K
  draws) and ``l<n>_gumbel`` (``--y-mode gumbel --gumbel-temperature τ``, ``--objective elbo``).

Each labelled point is held ``copies = max(1, round(--labelled-per-epoch / n))`` times with its terms
weighted 1/copies (``--labelled-copies``: the same objective, with labelled points in more
minibatches), except in the VIMCO cell, where pyrovae refuses copies (they would temper IWAE's
weights): there copies = 1. Per cell: the test error of q(y|x)'s argmax, the test ELBO with y summed
out (one z per class), the importance-sampled test log-likelihood (K = --eval-samples, y and z drawn
from the guide), and the seconds per epoch (the training steps of each epoch, from metrics.json).

**Gradients.** On the --gradient-cell model (default the smallest-labels enum cell; its checkpoint
in --out, or an untrained model of the same config when there is none: results.json says which),
on a fixed minibatch of the first --grad-batch training points (labels joined as in training), R =
--replicates independent gradients of the classifier q(y|x)'s parameters for enum, score, VIMCO (K)
and Gumbel at each of --grad-temperatures (:mod:`studies.m2`): per-coordinate variance, trace of the
covariance, SNR and the bias against enum in units of its standard error. Kept in
--docs/gradients/gradients.json (read back when measured for the same settings and model).

**Style.** From the gradient cell's trained model: --style-images test digits (rows), each one's z
the mean of q(z|x, ŷ) at its predicted class ŷ, decoded with every class y = 0..9 (columns; column 0
the input): style.png.

Writes --docs/results.json (every number), results.md (the table), error.png (test error against the
number of labels), style.png, run.json.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Optional

from studies.provenance import write_run_record
from studies.sweep import add_common_args, run_configs, setup

from pyrovae.app.config import TrainConfig
from pyrovae.app.run import write_json

#: The number of classes of MNIST.
NUM_CLASSES = 10

#: Kingma et al. (2014), Table 1, M2 test error (%) by number of labels (quoted, unverified here).
KINGMA_M2 = {100: 11.97, 600: 4.94, 1000: 3.60, 3000: 3.92}

#: Kingma et al.'s networks: one hidden layer of 500 softplus units each, z of dimension 50.
NETWORK = dict(hidden_sizes=(500,), activation="softplus", z_dim=50)

#: What the table reports of each run's metrics.json.
KEYS = ("test_error", "test_elbo_enumerated", "test_elbo_enumerated_se", "test_log_likelihood",
        "test_log_likelihood_se", "test_elbo", "m2_alpha", "epochs", "train_seconds", "eval_seconds", "num_test",
        "eval_samples")

#: The y treatments of the small-label cells beside enum.
SAMPLED = ("score-elbo", "score-vimco", "gumbel")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", type=int, nargs="+", default=[100, 600, 1000, 3000],
                        help="numbers of labelled training points (multiples of 10), one enum cell each")
    parser.add_argument("--sampled", nargs="*", default=list(SAMPLED), choices=list(SAMPLED),
                        help="the sampled-y cells, run with the smallest --labels")
    parser.add_argument("--extra-alphas", type=float, nargs="*", default=[6000.0],
                        help="α per labelled point beside Kingma et al.'s 0.1 N / labels, one more enum cell each at "
                             "the smallest --labels (6000 = 0.1 N: the weight if their expectation were a sum)")
    parser.add_argument("--gumbel-temperature", type=float, default=0.5, help="τ of the Gumbel cell")
    parser.add_argument("--vimco-particles", type=int, default=5, help="K of the VIMCO cell and estimator")
    parser.add_argument("--labelled-per-epoch", type=int, default=6000,
                        help="labelled points per epoch: each labelled point held round(this / labels) times "
                             "(at least once), its terms weighted by the inverse (0: once)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's step size")
    parser.add_argument("--eval-samples", type=int, default=100, help="K of the importance-sampled test log-likelihood")
    parser.add_argument("--hidden-sizes", type=int, nargs="+", default=list(NETWORK["hidden_sizes"]),
                        help="hidden widths of every network (Kingma et al.: 500)")
    parser.add_argument("--z-dim", type=int, default=NETWORK["z_dim"], help="latent dimension (Kingma et al.: 50)")
    parser.add_argument("--gradient-cell", default=None, help="the cell whose model the gradient study uses "
                                                               "(default: the enum cell of the smallest --labels)")
    parser.add_argument("--replicates", type=int, default=200, help="R gradients per estimator")
    parser.add_argument("--grad-batch", type=int, default=100, help="points of the fixed minibatch")
    parser.add_argument("--grad-temperatures", type=float, nargs="+", default=[0.5, 1.0], help="τ of the Gumbel estimators")
    parser.add_argument("--style-images", type=int, default=8, help="test digits (rows) of style.png")
    parser.add_argument("--out", default="runs/m2_labels", help="one run folder per cell")
    parser.add_argument("--docs", default="docs/m2_labels", help="results.json, results.md, error.png, style.png")
    parser.add_argument("--skip-busy", action="store_true",
                        help="leave out cells another process is training (to split the work over processes)")
    parser.add_argument("--train-only", action="store_true", help="train the cells, measure nothing else")
    add_common_args(parser, epochs=20)
    args = parser.parse_args(argv)
    for n in args.labels:
        if n < NUM_CLASSES or n % NUM_CLASSES:
            parser.error(f"--labels must be positive multiples of {NUM_CLASSES}, got {n}")
    for name in ("epochs", "eval_samples", "z_dim", "grad_batch", "style_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for alpha in args.extra_alphas:
        if not alpha > 0:
            parser.error(f"--extra-alphas must be positive, got {alpha:g}")
    args.extra_alphas = sorted(set(args.extra_alphas))
    if args.replicates < 3:
        parser.error(f"--replicates must be at least 3, got {args.replicates}")
    if args.vimco_particles < 2:
        parser.error(f"--vimco-particles must be at least 2 (K = 1 is the ELBO), got {args.vimco_particles}")
    args.labels = sorted(set(args.labels))
    if args.gradient_cell is None:
        args.gradient_cell = cell_name(args.labels[0], "enum")
    return args


def cell_name(labels: int, treatment: str) -> str:
    return f"l{labels}_{treatment}"


def copies_for(labels: int, per_epoch: int) -> int:
    """How many times each labelled point is held: ``per_epoch`` labelled points per epoch, at least once."""
    return max(1, round(per_epoch / labels))


def alpha_treatment(alpha: float) -> str:
    """The treatment name of an enum cell with its own α."""
    return f"enum-a{alpha:g}"


def cells_of(args: argparse.Namespace) -> list[tuple[int, str]]:
    """The (labels, treatment) pairs, in table order."""
    return ([(n, "enum") for n in args.labels] + [(args.labels[0], alpha_treatment(a)) for a in args.extra_alphas]
            + [(args.labels[0], t) for t in args.sampled])


def configs(args: argparse.Namespace) -> dict[str, TrainConfig]:
    out = {}
    for n, treatment in cells_of(args):
        options: dict[str, Any] = {"y_mode": "enum", "objective": "elbo-enum"}
        copies = copies_for(n, args.labelled_per_epoch)
        alphas = {alpha_treatment(a): a for a in args.extra_alphas}
        if treatment in alphas:
            options["m2_alpha"] = alphas[treatment]
        elif treatment == "score-elbo":
            options = {"y_mode": "score", "objective": "elbo"}
        elif treatment == "score-vimco":
            options = {"y_mode": "score", "objective": "iwae", "num_particles": args.vimco_particles}
            copies = 1  # copies weight a labelled point by 1/copies, which inside IWAE's log-mean-exp tempers it
        elif treatment == "gumbel":
            options = {"y_mode": "gumbel", "objective": "elbo", "gumbel_temperature": args.gumbel_temperature}
        out[cell_name(n, treatment)] = TrainConfig(
            model="m2", labels=n, labelled_copies=copies, epochs=args.epochs, lr=args.lr, batch_size=100,
            hidden_sizes=tuple(args.hidden_sizes), activation="softplus", z_dim=args.z_dim,
            eval_samples=args.eval_samples, num_train=args.num_train, num_test=args.num_test, device=args.device,
            seed=args.seed, **options)
    return out


def row_of(labels: int, treatment: str, metrics: dict[str, Any]) -> dict[str, Any]:
    config = metrics["config"]
    seconds = list(metrics["seconds_per_epoch"])
    row = {"cell": cell_name(labels, treatment), "labels": labels, "treatment": treatment,
           "y_mode": config["y_mode"], "objective": config["objective"], "num_particles": config["num_particles"],
           "gumbel_temperature": config["gumbel_temperature"] if config["y_mode"] == "gumbel" else None,
           "labelled_copies": config["labelled_copies"], **{k: metrics.get(k) for k in KEYS}}
    num_test = metrics.get("num_test") or 10000
    row["test_error_se"] = (row["test_error"] * (1 - row["test_error"]) / num_test) ** 0.5  # binomial, over test points
    num_train = config["num_train"] or 60000
    row["train_rows_per_epoch"] = num_train + (config["labelled_copies"] - 1) * labels
    row["seconds_per_epoch"] = seconds
    row["mean_seconds_per_epoch"] = sum(seconds) / len(seconds)
    row["train_seconds"] = sum(seconds)  # every part of a resumed run
    row["kingma_m2_error_quoted"] = KINGMA_M2.get(labels) if treatment == "enum" else None
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """The results as a Markdown table."""
    lines = ["| labels | y | objective | α | test error (%) | Kingma et al. M2 (%, quoted) | test ELBO, y summed (nats) "
             "| test log p̂ (nats) | s / epoch |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        y = r["y_mode"] + (f" τ={r['gumbel_temperature']:g}" if r["gumbel_temperature"] is not None else "")
        objective = r["objective"] + (f" K={r['num_particles']}" if r["objective"] == "iwae" else "")
        quoted = r["kingma_m2_error_quoted"]
        quoted_text = f"{quoted:.2f} <!-- quoted: {quoted:.2f} -->" if quoted is not None else ""
        lines.append(
            f"| {r['labels']} | {y} | {objective} | {r['m2_alpha']:g} | {100 * r['test_error']:.2f} ± {100 * r['test_error_se']:.2f} | {quoted_text} | "
            f"{r['test_elbo_enumerated']:.2f} ± {r['test_elbo_enumerated_se']:.2f} | "
            f"{r['test_log_likelihood']:.2f} ± {r['test_log_likelihood_se']:.2f} | {r['mean_seconds_per_epoch']:.1f} |")
    return "\n".join(lines) + "\n"


def gradient_table(study: dict[str, Any]) -> str:
    lines = [f"Classifier q(y|x) gradient on {study['source']} model ({study['cell']}), batch {study['batch']} "
             f"({study['labelled_in_batch']} labelled), R = {study['replicates']}, {study['num_coords']} coordinates", "",
             "| estimator | objective | mean variance per coordinate | ÷ enum | SNR, mean over coordinates | SNR, pooled "
             "| ‖mean − enum's mean‖ / ‖enum's mean‖ | mean abs z vs enum | frac abs z > 3 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in study["rows"]:
        versus = (f"{r['variance_ratio_to_enum']:.3g} | {r['snr']:.3g} | {r['snr_pooled']:.3g} | {r['relative_bias']:.3f} | "
                  f"{r['mean_abs_z_vs_reference']:.2f} | {r['frac_abs_z_gt_3_vs_reference']:.4f}"
                  if "relative_bias" in r else f"1 | {r['snr']:.3g} | {r['snr_pooled']:.3g} | (reference) | | ")
        lines.append(f"| {r['name']} | {r['objective']} | {r['variance']:.4g} ± {r['variance_se']:.2g} | {versus} |")
    return "\n".join(lines) + "\n"


def plot_error(rows: list[dict[str, Any]], path: Path) -> None:
    """Test error against the number of labels (log axis): the enum cells, the sampled cells at their
    labels, and Kingma et al.'s M2 (quoted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.8))
    enum = [r for r in rows if r["treatment"] == "enum"]
    ax.plot([r["labels"] for r in enum], [100 * r["test_error"] for r in enum], "o-", color="#4477aa",
            label="pyrovae M2, y enumerated")
    quoted = [(n, e) for n, e in KINGMA_M2.items() if n in {r["labels"] for r in enum}]
    if quoted:
        ax.plot([n for n, _ in quoted], [e for _, e in quoted], "s--", color="#bbbbbb", label="Kingma et al. 2014 M2 (quoted)")
    styles = {"score-elbo": ("^", "#ee6677"), "score-vimco": ("v", "#228833"), "gumbel": ("D", "#ccbb44")}
    for r in rows:
        if r["treatment"] == "enum":
            continue
        marker, color = styles.get(r["treatment"], ("*", "#aa3377"))
        ax.plot([r["labels"]], [100 * r["test_error"]], marker, color=color, label=f"y {r['treatment']}")
    ax.set_xscale("log")
    ax.set_xlabel("labelled training points")
    ax.set_ylabel("test error (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_cell(args: argparse.Namespace, name: str, config: TrainConfig) -> tuple[Any, Any, Any, str]:
    """``(model, guide, dataset, source)`` of a cell: its trained run from --out (``source="trained"``),
    or an untrained pair of its config (``"untrained"``, seeded with --seed) when the run folder is absent."""
    import pyro

    from pyrovae.app.run import build, load_data, load_run

    folder = Path(args.out) / name
    if (folder / "checkpoint.pt").is_file():
        run = load_run(folder, data_dir=args.data_dir)
        return run.model, run.guide, run.dataset, "trained"
    logging.warning("%s: no checkpoint in %s, the gradient study uses an untrained model of its config", name, folder)
    dataset = load_data(config, args.data_dir)
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    model, guide = build(config, dataset)
    return model, guide, dataset, "untrained"


def gradient_settings(args: argparse.Namespace, config: TrainConfig) -> dict[str, Any]:
    return {"cell": args.gradient_cell, "config": config.to_dict(), "replicates": args.replicates,
            "batch": args.grad_batch, "temperatures": list(args.grad_temperatures),
            "vimco_particles": args.vimco_particles, "seed": args.seed}


def measure_gradients(args: argparse.Namespace, config: TrainConfig, keep: Path) -> dict[str, Any]:
    """The gradient study, read from ``keep/gradients.json`` when it was measured for the same settings
    on a model at least as trained as the one at hand (a trained one beats an untrained one)."""
    from studies import m2 as study

    from pyrovae.train import evaluation_data

    settings = gradient_settings(args, config)
    path = keep / "gradients.json"
    have_checkpoint = (Path(args.out) / args.gradient_cell / "checkpoint.pt").is_file()
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("settings") == settings and (saved["source"] == "trained" or not have_checkpoint):
            logging.info("gradients: measured earlier (%s model), read from %s", saved["source"], path)
            return saved
    model, guide, dataset, source = load_cell(args, args.gradient_cell, config)
    x = evaluation_data(dataset, "train", config.seed)[: args.grad_batch]
    specs = study.estimator_specs(args.grad_temperatures, args.vimco_particles)
    result = study.gradient_study(model, guide, x, len(dataset.train), specs, args.replicates, seed=args.seed,
                                  progress=lambda message: logging.info("gradients: %s", message))
    result = {"settings": settings, "source": source, "cell": args.gradient_cell, **result}
    keep.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    write_run_record(keep, settings=settings, seed=args.seed, source=source)
    return result


def save_style(args: argparse.Namespace, path: Path) -> Optional[dict[str, Any]]:
    """style.png from the gradient cell's trained run; ``None`` (an earlier figure left as it is) when
    its run folder is absent."""
    import torch

    from studies import m2 as study

    from pyrovae.app import plots
    from pyrovae.app.run import load_run
    from pyrovae.train import evaluation_data

    folder = Path(args.out) / args.gradient_cell
    if not (folder / "checkpoint.pt").is_file():
        logging.warning("%s: no run folder, style.png not redrawn", args.gradient_cell)
        return None
    run = load_run(folder, data_dir=args.data_dir)
    x = evaluation_data(run.dataset, "test", run.config.seed)[: args.style_images]
    images, predicted = study.style_grid(run.model, run.guide, x, NUM_CLASSES)
    plots.save_image_grid(images.reshape(-1, images.shape[-1]).cpu(), path, (1, 28, 28), nrow=images.shape[1])
    truth = run.dataset.test_labels[: args.style_images]
    return {"cell": args.gradient_cell, "rows": int(images.shape[0]), "columns": int(images.shape[1]),
            "predicted": predicted.tolist(), "true": truth.tolist(),
            "correct": int((predicted.cpu() == torch.as_tensor(truth).cpu()).sum())}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup(args)
    cells = configs(args)
    if args.gradient_cell not in cells:
        raise SystemExit(f"--gradient-cell {args.gradient_cell!r} is none of the cells {sorted(cells)}")
    logging.info("cells %s, %d epochs each", sorted(cells), args.epochs)
    docs = Path(args.docs)
    results = run_configs(cells, Path(args.out), data_dir=args.data_dir, skip_busy=args.skip_busy, keep=docs / "cells")
    rows = []
    for n, treatment in cells_of(args):
        metrics = results.get(cell_name(n, treatment))
        if metrics is None:
            continue
        rows.append(row_of(n, treatment, metrics))
        logging.info("%s: test error %.4f, enumerated test ELBO %.2f, %.1f s/epoch", rows[-1]["cell"],
                     rows[-1]["test_error"], rows[-1]["test_elbo_enumerated"], rows[-1]["mean_seconds_per_epoch"])
    summary: dict[str, Any] = {"epochs": args.epochs, "rows": rows, "kingma_2014_table1_m2_error_percent_quoted": {
        str(k): v for k, v in KINGMA_M2.items()}, "config": {k: v.to_dict() for k, v in cells.items()}}
    docs.mkdir(parents=True, exist_ok=True)
    if not args.train_only:
        summary["gradients"] = measure_gradients(args, cells[args.gradient_cell], docs / "gradients")
        style = save_style(args, docs / "style.png")
        if style is not None:
            write_json(docs / "style.json", style)
        elif (docs / "style.json").exists():
            style = json.loads((docs / "style.json").read_text())
        summary["style"] = style
    write_json(docs / "results.json", summary)
    text = table(rows)
    if "gradients" in summary:
        text += "\n" + gradient_table(summary["gradients"])
    (docs / "results.md").write_text(text)
    if rows:
        plot_error(rows, docs / "error.png")
    write_run_record(docs, args, configs=summary["config"], device=args.device)
    return summary


if __name__ == "__main__":
    main()
