"""Smoke run (a few hundred digits, one epoch) of experiments/cvae_quadrants.py: every quadrant count
trains the baseline and the CVAE, the table and figures are those of the runs, and a second call
reads the finished cells back instead of training again."""

from __future__ import annotations

import json
import math
from pathlib import Path


def test_cvae_quadrants_smoke(load_experiment, tmp_path: Path, mnist_root: Path, drawn, saved_json) -> None:  # type: ignore[no-untyped-def]
    script = load_experiment("experiments/cvae_quadrants.py")
    argv = ["--epochs", "1", "--eval-samples", "10", "--z-dim", "4", "--hidden-sizes", "32", "--num-train", "300",
            "--num-test", "40", "--data-dir", str(mnist_root), "--out", str(tmp_path / "runs"),
            "--docs", str(tmp_path / "docs")]
    summary = script.main(argv)
    rows = summary["rows"]
    assert [r["quadrants"] for r in rows] == [1, 2, 3]
    for row in rows:
        config = summary["config"][f"q{row['quadrants']}"]
        assert (config["model"], config["quadrants"], config["cvae_baseline_epochs"]) == ("cvae", row["quadrants"], 1)
        assert row["eval_samples"] == 10 and row["num_test"] == 40
        assert row["test_conditional_nll_se"] > 0 and row["baseline_test_nll_data_se"] > 0
        gain = row["baseline_test_nll"] - row["test_conditional_nll"]
        assert math.isclose(row["cvae_gain_over_baseline"], gain, abs_tol=1e-4)
        metrics = json.loads((tmp_path / "runs" / f"q{row['quadrants']}" / "metrics.json").read_text())
        assert math.isclose(metrics["test_nll"], row["test_conditional_nll"], rel_tol=1e-6)
    # fewer unobserved pixels, fewer nats: 3 observed quadrants leave a quarter of the digit to predict
    assert rows[0]["baseline_test_nll"] > rows[2]["baseline_test_nll"]
    saved_json(tmp_path / "docs" / "results.json", summary)
    assert (tmp_path / "docs" / "results.md").read_text() == script.table(rows)
    figure = drawn(tmp_path / "docs" / "nll.png")
    script.plot_nll(rows, tmp_path / "again.png")
    assert (drawn(tmp_path / "again.png") == figure).all()
    completions = drawn(tmp_path / "docs" / "completions.png", data=False)
    # 3 quadrant counts x (observed, baseline, SAMPLES CVAE samples, the digit) rows of 28-pixel digits, 2-pixel padding
    assert completions.shape[0] == 2 + 3 * (script.SAMPLES + 3) * 30
    assert (tmp_path / "docs" / "run.json").is_file()
    # the kept cells are read back: nothing trains again, the same numbers come out
    again = script.main(argv)
    assert again["rows"] == rows
