"""Reliability of experiment sweeps (``experiments/studies/sweep.py``, issue 7): a sweep refuses a
run that another process is training into, or with ``skip_busy`` leaves it alone and runs the
others, so two copies of one sweep share its runs. The other process is real (a subprocess holding
the run folder's lock, as a second ``pyrovae train`` or sweep would); the output-folder lock itself
is tested in ``tests/test_reliability.py``.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys

import pytest
from studies.sweep import run_configs

import pyrovae
from pyrovae import TrainConfig
from pyrovae.app.run import OutputBusyError

# What a second sweep does while it trains run "a": hold a's folder lock (train_and_evaluate's).
_HOLD_LOCK = """
import sys
from pyrovae.app.run import lock_output
with lock_output(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()  # until killed
"""


@pytest.mark.skipif(sys.platform == "win32", reason="no flock on Windows")
def test_sweep_processes_share_runs_without_touching_a_busy_one(tmp_path):
    config = TrainConfig(dataset="gmm", batch_size=500, eval_samples=5, epochs=1)
    configs = {"a": config, "b": dataclasses.replace(config, seed=1)}
    # the subprocess imports the same pyrovae as this test
    package_root = str(pathlib.Path(pyrovae.__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp_path / "a")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputBusyError, match="another process is training into"):
            run_configs(configs, tmp_path)
        assert list((tmp_path / "a").iterdir()) == []
        results = run_configs(configs, tmp_path, skip_busy=True)
        assert set(results) == {"b"} and (tmp_path / "b" / "metrics.json").is_file()
        assert list((tmp_path / "a").iterdir()) == [], "the sweep wrote into the run another process holds"
        assert holder.poll() is None  # the lock was held throughout
    finally:
        holder.kill()
        holder.wait(timeout=60)
    results = run_configs(configs, tmp_path, skip_busy=True)  # a is free now; b is finished and skipped
    assert set(results) == {"a", "b"} and results["a"]["config"]["seed"] == 0
    assert (tmp_path / "a" / "metrics.json").is_file()
