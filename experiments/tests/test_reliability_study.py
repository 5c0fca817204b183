"""Reliability of experiment sweeps (``experiments/studies/sweep.py``, issue 7): a sweep refuses a
run that another process is training into, or with ``skip_busy`` leaves it alone and runs the
others, so two copies of one sweep share its runs. The output-folder lock itself is tested in
``tests/test_reliability.py``.
"""

from __future__ import annotations

import dataclasses
import sys

import pytest
from studies.sweep import run_configs

from pyrovae import TrainConfig
from pyrovae.app.run import OutputBusyError, lock_output


@pytest.mark.skipif(sys.platform == "win32", reason="no flock on Windows")
def test_sweep_processes_share_runs_without_touching_a_busy_one(tmp_path):
    config = TrainConfig(dataset="gmm", batch_size=500, eval_samples=5, epochs=1)
    configs = {"a": config, "b": dataclasses.replace(config, seed=1)}
    with lock_output(tmp_path / "a"):  # another process "is training" a
        with pytest.raises(OutputBusyError, match="another process is training into"):
            run_configs(configs, tmp_path)
        results = run_configs(configs, tmp_path, skip_busy=True)
        assert set(results) == {"b"} and list((tmp_path / "a").iterdir()) == []
    results = run_configs(configs, tmp_path, skip_busy=True)  # a is free now; b is finished and skipped
    assert set(results) == {"a", "b"} and results["a"]["config"]["seed"] == 0
