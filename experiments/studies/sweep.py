"""Run a set of named ``pyrovae train`` configurations, each in its own folder, resumably.

Experiments that compare a few trained models (the β-VAE sweep, fixed vs learned σ, the VQ models,
the Burda table) call :func:`run_configs`: a finished run (its ``metrics.json`` written for the
same config) is skipped, an unfinished one resumes from its checkpoint, so a long sweep can be
split across sessions or interrupted with Ctrl-C. With ``keep``, each finished run's metrics are
also copied to ``keep/<name>.json`` (a folder that is committed, unlike the run folders with their
checkpoints), and a run whose copy there matches its config is not trained again: a sweep's
finished cells survive a fresh checkout.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional

from studies.provenance import command_line, git_state, write_run_record

from pyrovae.app.config import TrainConfig, config_differences
from pyrovae.app.run import OutputBusyError, train_and_evaluate, write_json

__all__ = ["finished_metrics", "run_configs"]

logger = logging.getLogger(__name__)

#: Config fields that change how the evaluation is chunked, not what it estimates.
CHUNKING = frozenset({"eval_chunk", "eval_batch"})


def finished_metrics(path: Path, config: TrainConfig) -> Optional[dict[str, Any]]:
    """The metrics at ``path`` (a run folder's ``metrics.json``, or that file itself) if they were
    written for ``config`` (up to chunking)."""
    path = Path(path)
    if path.is_dir() or path.suffix != ".json":
        path = path / "metrics.json"
    if not path.exists():
        return None
    metrics = json.loads(path.read_text())
    if config_differences(metrics.get("config") or {}, config.resolved().to_dict(), CHUNKING):
        return None
    return metrics


def run_configs(
    configs: dict[str, TrainConfig],
    root: Path,
    *,
    data_dir: Optional[str] = None,
    progress: bool = False,
    after: Optional[Callable[[str, dict[str, Any]], None]] = None,
    skip_busy: bool = False,
    keep: Optional[Path] = None,
) -> dict[str, dict[str, Any]]:
    """Train and evaluate every config in ``root/<name>`` (skipping finished ones, resuming
    unfinished ones) and return ``{name: metrics}``.

    :param after: called with ``(name, metrics)`` after each run (finished earlier or now).
    :param skip_busy: leave out (and log) a run that another process is training, instead of
        raising :class:`~pyrovae.app.run.OutputBusyError`; then several processes started with the
        same configs share the work, and the result lacks the runs the others hold.
    :param keep: a folder for a copy of each finished run's metrics (``keep/<name>.json``, with
        ``kept_by``: the git state and command of the process that wrote it; ``keep/run.json`` holds
        the record of every process that kept a run there), read back (before ``root/<name>``)
        when it was written for the config.
    """
    results = {}
    for name, config in configs.items():
        folder = Path(root) / name
        # the kept copy first: it names the process that trained the run, and stays as it is
        metrics = finished_metrics(Path(keep) / f"{name}.json", config) if keep is not None else None
        kept = metrics is not None
        if metrics is None:
            metrics = finished_metrics(folder, config)
        if metrics is None:
            logger.info("%s: training", name)
            try:
                metrics = train_and_evaluate(config, folder, data_dir=data_dir, resume=True, progress=progress)
            except OutputBusyError:
                if not skip_busy:
                    raise
                logger.warning("%s: another process is training it; skipped", name)
                continue
        else:
            logger.info("%s: finished earlier, skipped", name)
        if keep is not None and not kept:  # kept by the process that has the run, with its commit
            metrics = {**metrics, "kept_by": {"git": git_state(), "command": command_line()}}
            write_json(Path(keep) / f"{name}.json", metrics)
            write_run_record(keep, configs={name: config.to_dict()}, device=config.device, seed=config.seed, kept=name)
        results[name] = metrics
        if after is not None:
            after(name, metrics)
    return results


def add_common_args(parser: Any, epochs: int = 20) -> None:
    """The flags every model-comparison experiment takes."""
    parser.add_argument("--epochs", type=int, default=epochs, help="epochs of every run")
    parser.add_argument("--num-train", type=int, default=None, help="first training points (default all)")
    parser.add_argument("--num-test", type=int, default=None, help="first test points (default all)")
    parser.add_argument("--data-dir", default=None, help="folder holding MNIST/raw (else $PYROVAE_DATA)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)


def setup(args: Any) -> None:
    """Logging, torch threads and the malloc tuning of an experiment's process."""
    import torch

    from pyrovae.runtime.perf import tune_malloc

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tune_malloc()
