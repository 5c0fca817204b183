"""Smoke run of experiments/main_job_time.py on a tiny job (no wall-clock is asserted)."""

from __future__ import annotations

import json


def test_main_job_time_smoke(load_experiment, tmp_path):
    script = load_experiment("experiments/main_job_time.py")
    summary = script.main(["--out", str(tmp_path / "runs"), "--docs", str(tmp_path / "docs"), "--eval-samples", "10", "50",
                           "--train-args", "--dataset", "gmm", "--epochs", "1", "--eval-samples", "200"])
    assert [r["eval_samples"] for r in summary["rows"]] == [10, 50, 200]
    # the same model at every K: the estimates rise with K (Jensen) within their errors, and the
    # K of the training run's own evaluation is the one it was asked for
    lp = [r["test_log_likelihood"] for r in summary["rows"]]
    se = [r["test_log_likelihood_se"] for r in summary["rows"]]
    assert lp[0] <= lp[2] + 3 * (se[0] + se[2])
    assert summary["job_seconds_at_k"]["200"] == summary["train_seconds"] + summary["eval_seconds"]
    saved = json.loads((tmp_path / "docs" / "results.json").read_text())
    assert saved["command"].startswith("pyrovae train") and "--eval-samples 200" in saved["command"]
    assert saved["gemm_floor_k5000"]["seconds"] > 0 and saved["gemm_floor_k5000"]["total_flops"] == 2 * 10000 * 5000 * 400 * 784
    assert (tmp_path / "docs" / "run.json").exists()
