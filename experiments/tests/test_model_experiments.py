"""Smoke runs (tiny settings) of the model-comparison experiments of issue 6:
experiments/beta_vae.py, experiments/gaussian_sigma.py and experiments/vq_models.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


def test_beta_vae_smoke(load_experiment, tmp_path: Path, mnist_root: Path, drawn, saved_json) -> None:  # type: ignore[no-untyped-def]
    script = load_experiment("experiments/beta_vae.py")
    summary = script.main([
        "--betas", "1", "4", "--epochs", "1", "--z-dim", "4", "--hidden-sizes", "32", "--eval-samples", "10",
        "--num-train", "200", "--num-test", "40", "--traversal-units", "3", "--data-dir", str(mnist_root),
        "--out", str(tmp_path / "runs"), "--docs", str(tmp_path / "docs"),
    ])
    assert [r["beta"] for r in summary["rows"]] == [1.0, 4.0]
    for row in summary["rows"]:
        assert row["rate"] > 0 and row["distortion"] > 0 and len(row["traversal_units"]) == 3
        assert math.isclose(row["test_elbo"], -(row["rate"] + row["distortion"]))
    saved_json(tmp_path / "docs" / "results.json", summary)
    figure = drawn(tmp_path / "docs" / "rate_distortion.png")
    # ... and it is the figure of these rows: drawing them again gives the same pixels.
    script.plot_rate_distortion(summary["rows"], tmp_path / "again.png")
    assert (drawn(tmp_path / "again.png") == figure).all()
    for name in ("traversals_beta_1.png", "traversals_beta_4.png"):
        drawn(tmp_path / "docs" / name, data=False)  # grey digits


def test_gaussian_sigma_smoke(load_experiment, tmp_path: Path, mnist_root: Path, drawn, saved_json) -> None:  # type: ignore[no-untyped-def]
    script = load_experiment("experiments/gaussian_sigma.py")
    summary = script.main([
        "--fixed", "0.1", "1.0", "--epochs", "1", "--z-dim", "4", "--hidden-sizes", "32", "--eval-samples", "10",
        "--num-train", "200", "--num-test", "40", "--data-dir", str(mnist_root),
        "--out", str(tmp_path / "runs"), "--docs", str(tmp_path / "docs"),
    ])
    rows = {r["name"]: r for r in summary["rows"]}
    assert set(rows) == {"fixed_0.1", "fixed_1", "learned_shared", "learned_pixel"}
    assert math.isclose(rows["fixed_0.1"]["sigma_mean"], 0.1, rel_tol=1e-6) and rows["fixed_0.1"]["sigma_min"] == rows["fixed_0.1"]["sigma_max"]
    assert rows["learned_pixel"]["sigma_min"] < rows["learned_pixel"]["sigma_max"]
    saved_json(tmp_path / "docs" / "results.json", summary)
    drawn(tmp_path / "docs" / "sigma.png")
    drawn(tmp_path / "docs" / "sigma_map.png", data=False)  # a grey map of σ per pixel


def test_vq_models_smoke(load_experiment, tmp_path: Path, mnist_root: Path, drawn) -> None:  # type: ignore[no-untyped-def]
    script = load_experiment("experiments/vq_models.py")
    argv = [
        "--epochs", "1", "--num-codes", "8", "--num-codes-top", "4", "--code-dim", "4", "--prior-epochs", "1",
        "--prior-channels", "8", "--prior-layers", "1", "--num-samples", "4", "--num-train", "200",
        "--num-test", "30", "--data-dir", str(mnist_root), "--out", str(tmp_path / "runs"), "--docs", str(tmp_path / "docs"),
    ]
    summary = script.main(argv)
    rows = {r["model"]: r for r in summary["rows"]}
    assert set(rows) == {"vqvae", "vqvae-ema", "vqvae2"}
    for row in rows.values():
        # (That the fitted prior beats the uniform one is tested with adequate training in test_vqvae_study.py.)
        assert math.isfinite(row["log_prior_codes"]) and math.isfinite(row["bound_with_fitted_prior"])
        assert math.isclose(
            row["bound_uniform_prior"], row["test_reconstruction_log_lik"] - row["kl"], rel_tol=1e-6)
        drawn(tmp_path / "docs" / f"{row['model']}_samples.png", data=False)  # grey digits
    assert "perplexity_top" in rows["vqvae2"]
    again = script.main(argv)  # priors and runs are reused, not refitted
    assert again["rows"][0]["log_prior_codes"] == summary["rows"][0]["log_prior_codes"]


def test_nll_guides_smoke(load_experiment, tmp_path: Path, mnist_root: Path, drawn, saved_json) -> None:  # type: ignore[no-untyped-def]
    script = load_experiment("experiments/nll_guides.py")
    cells = ["ffg", "planar", "vamp", "miwae"]
    argv = [
        "--networks", "main", "burda", "--cells", *cells, "--objectives-on", "main", "--objective-draws", "8",
        "--epochs", "1", "--eval-samples", "8", "--flow-layers", "1", "--pseudo-inputs", "5", "--num-train", "200",
        "--num-test", "30", "--data-dir", str(mnist_root), "--docs", str(tmp_path / "docs"),
    ]
    summary = script.main([*argv, "--out", str(tmp_path / "runs")])
    # the objective cells on the --objectives-on networks only
    assert [(r["network"], r["cell"]) for r in summary["rows"]] == [("main", c) for c in cells] + [("burda", c) for c in cells[:3]]
    config = summary["config"]
    assert config["main_planar"]["guide"] == "planar" and config["main_planar"]["flow_layers"] == 1
    assert config["main_vamp"]["prior"] == "vamp" and config["main_vamp"]["num_pseudo_inputs"] == 5
    assert (config["main_miwae"]["objective"], config["main_miwae"]["num_groups"], config["main_miwae"]["num_particles"]) == ("miwae", 4, 2)
    for row in summary["rows"]:
        assert math.isclose(row["test_nll"], -row["test_log_likelihood"])
        assert row["test_log_likelihood"] >= row["test_elbo"] - 1e-3  # log-mean-exp ≥ mean of the same draws
    saved_json(tmp_path / "docs" / "results.json", summary)
    drawn(tmp_path / "docs" / "nll.png")
    # A fresh checkout has the docs folder but not the run folders: the kept cells are read back,
    # nothing is trained again.
    again = script.main([*argv, "--out", str(tmp_path / "fresh")])
    assert again["rows"] == summary["rows"]
    assert not (tmp_path / "fresh").exists()
    kept = json.loads((tmp_path / "docs" / "cells" / "main_ffg.json").read_text())
    assert set(kept["kept_by"]) == {"git", "command"}  # the process that trained it, not the one that read it back
    record = json.loads((tmp_path / "docs" / "cells" / "run.json").read_text())
    assert record["kept"] and len(record["earlier_runs"]) == len(summary["rows"]) - 1  # one record per kept cell
    before = (tmp_path / "docs" / "cells" / "main_ffg.json").read_bytes()
    script.main([*argv, "--out", str(tmp_path / "runs")])  # the run folders are there too: the kept copy wins, untouched
    assert (tmp_path / "docs" / "cells" / "main_ffg.json").read_bytes() == before
    with pytest.raises(SystemExit):
        script.main([*argv, "--out", str(tmp_path / "runs"), "--objective-draws", "6"])
