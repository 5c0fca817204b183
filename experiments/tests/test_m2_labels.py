"""Smoke run (300 digits, 20 labels, one epoch, tiny networks) of experiments/m2_labels.py: every
cell trains with the y treatment it names, the gradient study measures every estimator on the
trained model, the style grid is drawn, and a second call with the kept docs and no run folders
reads everything back instead of training or measuring again."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


def canonical(value):  # type: ignore[no-untyped-def]
    return json.dumps(json.loads(json.dumps(value)), sort_keys=True)


def test_m2_labels_smoke(load_experiment, tmp_path: Path, mnist_root: Path, drawn, saved_json) -> None:  # type: ignore[no-untyped-def]
    script = load_experiment("experiments/m2_labels.py")
    argv = ["--epochs", "1", "--labels", "20", "--num-train", "300", "--num-test", "100", "--eval-samples", "4",
            "--hidden-sizes", "32", "--z-dim", "4", "--labelled-per-epoch", "60", "--vimco-particles", "3",
            "--replicates", "5", "--grad-batch", "30", "--style-images", "3", "--extra-alphas", "7.5", "--data-dir", str(mnist_root),
            "--docs", str(tmp_path / "docs")]
    summary = script.main([*argv, "--out", str(tmp_path / "runs")])
    rows = summary["rows"]
    assert [r["cell"] for r in rows] == ["l20_enum", "l20_enum-a7.5", "l20_score-elbo", "l20_score-vimco", "l20_gumbel"]
    expected = {"enum": ("enum", "elbo-enum", 3), "enum-a7.5": ("enum", "elbo-enum", 3), "score-elbo": ("score", "elbo", 3),
                "score-vimco": ("score", "iwae", 1), "gumbel": ("gumbel", "elbo", 3)}
    for row in rows:
        assert (row["y_mode"], row["objective"], row["labelled_copies"]) == expected[row["treatment"]]
        assert 0 <= row["test_error"] <= 1
        assert math.isfinite(row["test_elbo_enumerated"]) and row["test_elbo_enumerated"] < 0
        assert row["test_elbo_enumerated_se"] > 0
        assert len(row["seconds_per_epoch"]) == 1 and row["mean_seconds_per_epoch"] > 0
        # 300 points, the 20 labelled ones held `copies` times
        assert row["train_rows_per_epoch"] == 300 + (row["labelled_copies"] - 1) * 20
        assert row["test_error_se"] == pytest.approx((row["test_error"] * (1 - row["test_error"]) / 100) ** 0.5)
        metrics = json.loads((tmp_path / "runs" / row["cell"] / "metrics.json").read_text())
        assert metrics["test_error"] == row["test_error"] and metrics["labels"] == 20
        assert metrics["config"]["num_particles"] == (3 if row["treatment"] == "score-vimco" else 1)
    # Kingma et al.'s α per labelled point, 0.1 N / labels, and the extra cell's own
    assert [r["m2_alpha"] for r in rows[:2]] == [pytest.approx(0.1 * 300 / 20), 7.5]
    assert rows[0]["kingma_m2_error_quoted"] is None  # Kingma et al. have no 20-label cell
    assert summary["epochs"] == 1 and summary["config"]["l20_enum"]["labelled_copies"] == 3  # round(60 / 20)

    grads = summary["gradients"]
    assert grads["source"] == "trained" and grads["cell"] == "l20_enum" and grads["batch"] == 30
    names = [r["name"] for r in grads["rows"]]
    assert names == ["enum", "score", "vimco-k3", "gumbel-t0.5", "gumbel-t1"]
    # the classifier of 784-32-10: every coordinate of its gradient, R = 5 replicates each
    num_coords = 784 * 32 + 32 + 32 * 10 + 10
    for r in grads["rows"]:
        assert r["grad_shape"] == [5, num_coords] and r["num_coords"] == num_coords
        assert r["all_finite"] and math.isfinite(r["variance"]) and r["variance"] > 0
        assert r["trace"] == pytest.approx(r["variance"] * num_coords)
        if r["name"] != "enum":
            assert math.isfinite(r["max_abs_z_vs_reference"]) and r["relative_bias"] >= 0
            assert r["variance_ratio_to_enum"] == pytest.approx(r["variance"] / grads["rows"][0]["variance"])
    by_name = {r["name"]: r for r in grads["rows"]}
    # no baseline and a 10-way discrete draw: the score estimator is far noisier than summing y out
    assert by_name["score"]["variance"] > 10 * by_name["enum"]["variance"]

    saved_json(tmp_path / "docs" / "results.json", summary)
    assert (tmp_path / "docs" / "results.md").read_text().startswith(script.table(rows))
    drawn(tmp_path / "docs" / "error.png")
    style = drawn(tmp_path / "docs" / "style.png", data=False)
    # 3 test digits in rows; the input and 10 classes in columns, 28-pixel digits with 2-pixel padding
    assert style.shape[:2] == (2 + 3 * 30, 2 + 11 * 30)
    assert summary["style"]["rows"] == 3 and summary["style"]["columns"] == 11
    assert (tmp_path / "docs" / "run.json").is_file() and (tmp_path / "docs" / "gradients" / "run.json").is_file()

    # a fresh checkout (the docs folder, no run folders): the kept cells, gradients and style are
    # read back; nothing is trained or measured again
    again = script.main([*argv, "--out", str(tmp_path / "fresh")])
    assert not (tmp_path / "fresh").exists()
    assert canonical(again["rows"]) == canonical(rows)
    assert canonical(again["gradients"]) == canonical(grads)
    assert again["style"] == summary["style"]
