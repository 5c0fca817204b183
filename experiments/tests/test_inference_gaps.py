"""Smoke run (tiny settings) of experiments/inference_gaps.py: Cremer et al.'s Table 2 columns."""

from __future__ import annotations

import math
from pathlib import Path


def test_inference_gaps_smoke(load_experiment, tmp_path: Path, mnist_root: Path, drawn, saved_json) -> None:  # type: ignore[no-untyped-def]
    script = load_experiment("experiments/inference_gaps.py")
    argv = [
        "--epochs", "1", "--num-train", "200", "--num-points", "20", "--elbo-draws", "20", "--is-samples", "40",
        "--local-steps", "100", "--local-particles", "2", "--flow-steps", "30", "--flow-chunk", "7", "--data-dir", str(mnist_root),
        "--docs", str(tmp_path / "docs"),
    ]
    summary = script.main([*argv, "--out", str(tmp_path / "runs")])
    assert set(summary["columns"]) == {"ffg", "flow"}
    for name, column in summary["columns"].items():
        table = column["table"]
        assert column["qstar_family"] == ("elbo_qstar_flow" if name == "flow" else "elbo_qstar_ffg")
        # The gaps split the inference gap exactly, and log p̂ (log-mean-exp of the weights) is at
        # least the ELBO of the same draws (their mean): Jensen, draw by draw.
        assert math.isclose(table["approximation_gap"] + table["amortization_gap"], table["inference_gap"],
                            rel_tol=1e-5, abs_tol=1e-4)
        assert table["log_px"] >= table["elbo_qstar_flow"]
        assert all(math.isfinite(v) for v in table.values())
        assert column["num_points"] == 20
    saved_json(tmp_path / "docs" / "results.json", summary)
    drawn(tmp_path / "docs" / "gaps.png")
    # A fresh checkout (the docs folder, no run folders): the kept training metrics and columns are
    # read back, nothing is trained or measured again.
    again = script.main([*argv, "--out", str(tmp_path / "fresh")])
    assert again["columns"] == summary["columns"]
    assert not (tmp_path / "fresh").exists()
    for kept in ("training", "columns"):  # each kept part says which process made it
        assert (tmp_path / "docs" / kept / "run.json").exists()
