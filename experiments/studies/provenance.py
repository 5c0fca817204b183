"""The run record beside every result folder: ``run.json``.

Every experiment script calls :func:`write_run_record` when it writes its results, so each folder
under ``docs/`` says how its numbers were made: the exact command, the resolved arguments (and the
configs of the training runs), the seed, the git commit (and whether the tree had uncommitted
changes) *when the script started*, with the state at the end beside it if a commit or an edit
happened while it ran (``git_at_end``), the machine (:func:`pyrovae.runtime.perf.machine_info`, the one machine description of the
project) and when. A folder written in several runs (``benchmark_speed.py --merge``, the parts of
``amortization_gap.py``, a re-plot) keeps every earlier record under ``"earlier_runs"``, newest last,
so the record of the run that measured a number is never replaced by the one that re-plotted it.

Records written afterwards from what is known (a result produced before this module existed) carry
``"recorded": "reconstructed"`` and name their source in ``"reconstructed_from"``; records written by
a run carry ``"recorded": "at run time"``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from pyrovae.app.run import write_json
from pyrovae.runtime.perf import machine_info

REPO = Path(__file__).resolve().parents[2]
RUN_FILE = "run.json"
ENVIRONMENT = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYROVAE_DATA", "CUDA_VISIBLE_DEVICES")


def git_state(repo: Path = REPO) -> dict[str, Any]:
    """The commit checked out in ``repo`` and the files that differ from it (``None`` outside git)."""
    def git(*cmd: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(repo), *cmd], capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    changed = [line[3:] for line in status.splitlines()] if status else []
    return {"commit": git("rev-parse", "HEAD"), "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "uncommitted_changes": changed}


#: The git state when this module was first imported: at the start of the script that imports it
#: (the code that ran), which a commit made while a long run goes on would otherwise misreport.
_AT_START: dict[str, Any] | None = None
_STARTED_AT: str | None = None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def mark_start() -> None:
    """Take the git state now (done on import; call it again to start a new run in one process)."""
    global _AT_START, _STARTED_AT
    _AT_START, _STARTED_AT = git_state(), _now()


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed from the repository root: ``python experiments/x.py --flag value``."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve() if argv else Path("?")
    try:
        script_text = str(script.relative_to(REPO))
    except ValueError:
        script_text = argv[0] if argv else "?"
    return shlex.join(["python", script_text, *argv[1:]])


def jsonable(value: Any) -> Any:
    """``value`` with namespaces, dataclasses, paths and tuples turned into JSON types."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def run_record(args: Any = None, *, seed: int | None = None, configs: Any = None, device: str = "cpu",
               argv: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """What :func:`write_run_record` writes: command, arguments, configs, seed, git state, machine, time."""
    arguments = jsonable(args) if args is not None else None
    if seed is None and isinstance(arguments, dict):
        seed = arguments.get("seed")
    record = {
        "recorded": "at run time",
        "command": command_line(argv),
        "cwd": os.getcwd(),
        "args": arguments,
        "seed": seed,
        "git": _AT_START if _AT_START is not None else git_state(),
        "machine": machine_info(device),
        "environment": {name: os.environ[name] for name in ENVIRONMENT if name in os.environ},
        "started_at": _STARTED_AT,
        "finished_at": _now(),
    }
    end = git_state()
    if end != record["git"]:  # committed or edited while it ran: say so, keep both
        record["git_at_end"] = end
    if configs is not None:
        record["configs"] = jsonable(configs)
    record.update(jsonable(extra))
    return record


def write_run_record(folder: str | os.PathLike, args: Any = None, **kwargs: Any) -> dict[str, Any]:
    """Write ``folder/run.json`` for this run, keeping the folder's earlier records (see module doc)."""
    path = Path(folder) / RUN_FILE
    record = run_record(args, **kwargs)
    if path.exists():
        earlier = json.loads(path.read_text())
        history = earlier.pop("earlier_runs", [])
        record["earlier_runs"] = history + [earlier]
    write_json(path, record)
    return record


def rederive(folder: str | os.PathLike, args: Any, update: Any, role: str, **extra: Any) -> dict[str, Any]:
    """Recompute the derived numbers of ``folder/results.json`` from what it holds, measuring
    nothing (the ``--summarize-only`` step of the scripts): ``update`` maps the stored results to the
    new ones, which are written back, with a run record saying ``role``."""
    path = Path(folder) / "results.json"
    results = update(json.loads(path.read_text()))
    write_json(path, results)
    write_run_record(folder, args, role=role, **extra)
    return results


def read_run_record(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ``run.json`` in ``folder``, or ``None``."""
    path = Path(folder) / RUN_FILE
    return json.loads(path.read_text()) if path.exists() else None


def reconstructed_record(*, commit: str, command: str | None, args: Any = None, configs: Any = None,
                         seed: int | None = None, machine: Any = None, sources: dict[str, str],
                         notes: str = "", **extra: Any) -> dict[str, Any]:
    """A ``run.json`` written after the fact for a result produced before run records existed.

    ``sources`` names where each field came from (e.g. ``{"commit": "git log --follow docs/x/results.json"}``);
    a field nobody recorded is ``None`` and named in ``"not_recorded"``. Nothing here claims to have
    been recorded at run time.
    """
    record = {
        "recorded": "reconstructed",
        "reconstructed_from": sources,
        "command": command,
        "args": jsonable(args),
        "seed": seed,
        "git": {"commit": commit, "note": "the commit that added the result files (git log --follow); "
                                          "the code that ran was at or before it"},
        "machine": jsonable(machine),
        "notes": notes,
        "not_recorded": sorted(k for k, v in {"command": command, "args": args, "seed": seed,
                                               "machine": machine}.items() if v is None),
    }
    if configs is not None:
        record["configs"] = jsonable(configs)
    record.update(jsonable(extra))
    return record


mark_start()
