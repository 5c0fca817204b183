"""SIGKILL at random moments, run by ``tests/test_reliability.py`` as
``python tests/_kill_worker.py OUT MIN_KILLS MAX_KILLS SEED``.

The driver imports pyrovae once, then repeatedly forks a child that runs
``pyrovae train --resume`` into OUT (a tiny data set, so the child spends most of its time writing
its per-epoch checkpoint), waits until the child has written at least one new checkpoint, sleeps a
random time and kills the child with SIGKILL. After each kill the checkpoint must load. A kill that
left a temporary file behind struck while a checkpoint was being written ("mid-write"). The driver
stops after MIN_KILLS kills once at least 3 were mid-write (at most MAX_KILLS), lets a last child
finish the run, and prints a JSON report on stdout.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import sys
import time

import torch

torch.set_num_threads(1)  # no thread pool in the parent: forking it is then safe

from pyrovae.app import cli, run  # noqa: E402  (imported before forking, so children start fast)
from pyrovae.runtime.checkpoint import load_checkpoint  # noqa: E402

ARGS = ["train", "--dataset", "linear", "--num-train", "40", "--num-test", "8", "--batch-size", "40",
        "--z-dim", "1", "--hidden-sizes", "4", "--eval-samples", "2", "--no-progress", "--resume",
        # Eager steps: a resumed child's first steps would otherwise trace its step (pyrovae.infer.replay),
        # and the random kills are meant to land in checkpoint writes, not in traces.
        "--fast-path", "eager"]


def child(out: pathlib.Path, epochs: int) -> None:
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    code = 1
    try:
        code = cli.main(ARGS + ["--out", str(out), "--epochs", str(epochs)])
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    finally:
        os._exit(code)


def main(out: pathlib.Path, min_kills: int, max_kills: int, seed: int) -> dict:
    rng = random.Random(seed)
    checkpoint = out / run.CHECKPOINT
    report: dict = {"kills": 0, "mid_write": 0, "epochs": [], "load_errors": [], "child_failures": []}
    while report["kills"] < max_kills and (report["kills"] < min_kills or report["mid_write"] < 3):
        before = checkpoint.stat().st_mtime_ns if checkpoint.exists() else None
        pid = os.fork()
        if pid == 0:
            child(out, 10**6)
        deadline = time.monotonic() + 60
        while not checkpoint.exists() or checkpoint.stat().st_mtime_ns == before:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done or time.monotonic() > deadline:  # it could not resume, or hangs
                if not done:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                report["child_failures"].append(os.waitstatus_to_exitcode(status) if done else "hung")
                return report
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        report["kills"] += 1
        if list(out.glob(f".{run.CHECKPOINT}.*.tmp")):
            report["mid_write"] += 1
        try:
            report["epochs"].append(load_checkpoint(checkpoint)["epoch"])
        except Exception as error:  # the test fails on any
            report["load_errors"].append(f"{type(error).__name__}: {error}")
    # The killed run resumes and finishes: two more epochs, then evaluation and metrics.json.
    pid = os.fork()
    if pid == 0:
        child(out, max(report["epochs"] or [0]) + 2)
    _, status = os.waitpid(pid, 0)
    report["final_exit"] = os.waitstatus_to_exitcode(status)
    report["final_epoch"] = load_checkpoint(checkpoint)["epoch"]
    report["leftover_temporaries"] = len(list(out.glob(f".{run.CHECKPOINT}.*.tmp")))
    return report


if __name__ == "__main__":
    out_dir = pathlib.Path(sys.argv[1])
    print(json.dumps(main(out_dir, int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))
