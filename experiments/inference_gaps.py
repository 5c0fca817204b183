"""Cremer, Li & Duvenaud (2018), Table 2 on MNIST: the approximation and amortization gaps of a VAE
trained with a fully factorised Gaussian (FFG) guide and of one trained with a flow guide.

Two `pyrovae train` runs (resumable, in --out/<cell>) share the decoder architecture: 784-200-200-50
with tanh units, Glorot initialisation, Bernoulli pixels, dynamically binarized MNIST, Adam at 1e-3,
batch 100, --epochs passes, seed 0.

- **ffg**: the amortized diagonal Gaussian encoder (`--guide amortized`).
- **flow**: an amortized Householder Sylvester flow (`--guide sylvester --flow-layers 4
  --flow-hidden-sizes 100`) on the encoder's Gaussian.

Then, for each trained decoder and the first --num-points test images (one fixed binarization
draw), with the decoder fixed:

- **L[q]**: the trained encoder's ELBO (--elbo-draws draws per point).
- **L[q*_FFG]**: a per-datapoint diagonal Gaussian fitted to each point (`optimize_local_guide`,
  started at the trained guide's base Gaussian, its stopping rule, at most --local-steps steps).
- **L[q*_Flow]**: a per-datapoint Sylvester flow of the trained guide's depth
  (`PerDatapointFlowGuide`), its base started at q*_FFG, fitted by --flow-steps full-batch Adam
  steps with --local-particles draws per point.
- **log p̂(x)**: importance sampling with K = --is-samples draws from q*_Flow.

q*_Flow is fitted and evaluated --flow-chunk points at a time (each point's fit is independent
of the others': the chunks change only the random draws and the memory).

approximation gap = log p̂(x) − L[q*] and amortization gap = L[q*] − L[q], with q* in the family of
the guide the decoder was trained with. Writes --docs/results.json, gaps.png and run.json; each
cell's training metrics and measured column are kept in --docs/training/ and --docs/columns/, so a
finished part is not redone after a fresh checkout.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from studies import inference_gaps as study
from studies.provenance import write_run_record
from studies.sweep import add_common_args, run_configs, setup

from pyrovae.app.config import TrainConfig
from pyrovae.app.run import write_json

#: The two training cells: name -> the guide options of its run.
CELLS: dict[str, dict[str, object]] = {
    "ffg": dict(guide="amortized"),
    "flow": dict(guide="sylvester", flow_layers=4, flow_hidden_sizes=(100,)),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    parser.add_argument("--out", default="runs/inference_gaps", help="one run folder per cell (checkpoints)")
    parser.add_argument("--docs", default="docs/inference_gaps", help="results.json and figures")
    parser.add_argument("--num-points", type=int, default=1000, help="first test images studied")
    parser.add_argument("--elbo-draws", type=int, default=1000, help="draws of each ELBO per point")
    parser.add_argument("--is-samples", type=int, default=5000, help="K of log p̂(x), drawn from q*_Flow")
    parser.add_argument("--local-steps", type=int, default=3000, help="most Adam steps of each q* fit")
    parser.add_argument("--local-particles", type=int, default=2, help="draws per point per step of the q*_Flow fit")
    parser.add_argument("--flow-steps", type=int, default=1000, help="Adam steps of the q*_Flow fit")
    parser.add_argument("--flow-lr", type=float, default=3e-3, help="initial step size of the q*_Flow fit (decays to 1 %%)")
    parser.add_argument("--flow-chunk", type=int, default=250,
                        help="points per q*_Flow fit (memory; each point's fit is independent of the others')")
    parser.add_argument("--train-only", action="store_true", help="train the cells, skip the study")
    add_common_args(parser, epochs=100)
    return parser.parse_args(argv)


def configs(args: argparse.Namespace) -> dict[str, TrainConfig]:
    return {
        name: TrainConfig(hidden_sizes=(200, 200), activation="tanh", weight_init="glorot", z_dim=50,
                          epochs=args.epochs, num_train=args.num_train, num_test=args.num_points,
                          eval_samples=args.elbo_draws, device=args.device, seed=args.seed, **CELLS[name])  # type: ignore[arg-type]
        for name in args.cells
    }


def column_of(folder: Path, keep: Path, name: str, settings: "study.Settings", data_dir: str | None,
              flow_chunk: int = 250) -> dict:
    """The cell's column (from the run in ``folder``), measured once per settings and kept in
    ``keep/<name>.json`` (so the two columns can be measured by separate processes, or in separate
    sessions: ``keep`` is committed with the results)."""
    path = keep / f"{name}.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("settings") == settings.to_dict():
            logging.info("%s: gaps measured earlier, read from %s", name, path)
            return saved["column"]
    flow_layers = int(CELLS["flow"]["flow_layers"])  # type: ignore[call-overload]
    column = study.gaps_of_run(folder / "checkpoint.pt", name, settings, flow_layers, data_dir=data_dir,
                               flow_chunk=flow_chunk)
    write_json(path, {"settings": settings.to_dict(), "column": column})
    write_run_record(keep, settings=settings.to_dict(), seed=settings.seed, kept=name)
    return column


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    setup(args)
    cells = configs(args)
    docs = Path(args.docs)
    trained = run_configs(cells, Path(args.out), data_dir=args.data_dir, keep=docs / "training")
    if args.train_only:
        return {"trained": trained}
    settings = study.Settings(num_points=args.num_points, elbo_draws=args.elbo_draws, is_samples=args.is_samples,
                              local_steps=args.local_steps, local_particles=args.local_particles, flow_steps=args.flow_steps,
                              flow_lr=args.flow_lr, seed=args.seed)
    docs.mkdir(parents=True, exist_ok=True)
    columns = {name: column_of(Path(args.out) / name, docs / "columns", name, settings, args.data_dir,
                                 args.flow_chunk) for name in cells}
    for name, column in columns.items():
        column["training"] = {k: trained[name][k] for k in ("epochs", "train_seconds", "test_elbo", "test_log_likelihood")}
        # how much the per-image flow gains on the per-image Gaussian: small when the decoder's
        # posteriors are close to diagonal Gaussians (Cremer et al.: the decoder adapts to its guide)
        column["qstar_flow_gain"] = column["table"]["elbo_qstar_flow"] - column["table"]["elbo_qstar_ffg"]
        logging.info("%s: %s", name, {k: round(v, 2) for k, v in column["table"].items()})
    summary = {"columns": columns, "settings": settings.to_dict(), "config": {k: v.to_dict() for k, v in cells.items()}}
    write_json(docs / "results.json", summary)
    study.plot_gaps(columns, docs / "gaps.png")
    write_run_record(docs, args, configs=summary["config"], device=args.device)
    return summary


if __name__ == "__main__":
    main()
