"""Smoke run of experiments/benchmark_tracking.py (tiny sizes; no wall-clock is asserted)."""

from __future__ import annotations

import pytest


def test_benchmark_tracking_smoke(load_experiment, tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    script = load_experiment("experiments/benchmark_tracking.py")
    results = script.main(["--out", str(tmp_path), "--rounds", "2", "--epochs", "2", "--num-train", "300"])
    assert set(results["step_ratio_vs_none"]) == {"none", "tensorboard", "mlflow"}
    assert results["step_ratio_vs_none"]["none"] == 1.0
    # per run, 6 steps (3 per epoch) give 5 intervals, one of them across the epoch end; 2 rounds
    assert results["steps_timed"] == {"none": 8, "tensorboard": 8, "mlflow": 8}
    assert set(results["epoch_end_step_ms_mean"]) == {"none", "tensorboard", "mlflow"}
    assert (tmp_path / "run.json").exists()
