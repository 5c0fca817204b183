"""Publish a finished `pyrovae train` run folder as a results folder under docs/ (the main job's page).

Copies the run's ``metrics.json`` and figures (``curves.png``, ``samples.png``,
``reconstructions.png``, whichever exist) from RUN to DOCS, and writes DOCS/run.json: this copy
step's own record (command, commit, machine) with the training run's resolved config and seed
taken from its ``metrics.json``. Checkpoints are not copied.

Example (the README's main job):
    pyrovae train --data-dir ../shared/data --out runs/mnist
    python experiments/publish_run.py runs/mnist docs/mnist_main
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from studies.provenance import write_run_record

FILES = ("metrics.json", "curves.png", "samples.png", "reconstructions.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="the folder `pyrovae train --out` wrote (holds metrics.json)")
    parser.add_argument("docs", help="the results folder to write, e.g. docs/mnist_main")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    run, docs = Path(args.run), Path(args.docs)
    metrics_path = run / "metrics.json"
    if not metrics_path.exists():
        raise SystemExit(f"{metrics_path} does not exist: point RUN at a finished `pyrovae train --out` folder")
    metrics = json.loads(metrics_path.read_text())
    docs.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in FILES:
        if (run / name).exists():
            shutil.copy2(run / name, docs / name)
            copied.append(name)
    config = metrics.get("config", {})
    return write_run_record(docs, args, seed=config.get("seed"), configs=config, device=str(config.get("device", "cpu")),
                            role="publish: files copied from a pyrovae train run folder", source_run=str(run),
                            copied=copied)


if __name__ == "__main__":
    main()
