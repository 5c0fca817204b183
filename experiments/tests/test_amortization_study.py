"""Smoke run of experiments/amortization_gap.py (the amortization-gap study,
``experiments/studies/amortization.py``) with tiny settings: every result file is written, every
part reports its gaps, and a second run reuses the saved decoders. The library pieces it uses
(semi-amortized guides, ``optimize_local_guide``, the diagnostics) are tested in
``tests/test_amortization.py``.
"""

from __future__ import annotations

import math


def test_amortization_gap_experiment_smoke(load_experiment, tmp_path, mnist_root):
    from pyrovae import TrainConfig
    from pyrovae.app.run import train_and_evaluate

    config = TrainConfig(z_dim=3, hidden_sizes=(16,), epochs=1, num_train=200, num_test=40, eval_samples=5, eval_batch=40)
    train_and_evaluate(config, tmp_path / "a", data_dir=str(mnist_root), progress=False)
    script = load_experiment("experiments/amortization_gap.py")
    args = script.parse_args([
        "--checkpoint", str(tmp_path / "a" / "checkpoint.pt"), "--data-dir", str(mnist_root),
        "--pd-checkpoint", str(tmp_path / "pd.pt"), "--sa-checkpoint", str(tmp_path / "sa.pt"),
        "--train-epochs", "1", "--num-train", "200", "--local-steps", "2", "--sa-steps", "2",
        "--num-test", "30", "--eval-samples", "40", "--diag-samples", "20", "--khat-samples", "20",
        "--eval-batch", "15", "--curve-points", "10", "--curve-steps", "20", "--curve-check-every", "5",
        "--opt-max-steps", "30", "--opt-check-every", "10", "--opt-particles", "1", "--train-points", "20",
        "--idata-points", "3", "--idata-draws", "8", "--out", str(tmp_path / "out"),
    ])
    results = script.main(args)
    out = tmp_path / "out"
    for name in ("results.json", "gaps.png", "khat.png", "convergence.png", "marginals.png",
                 "inference_data.nc", "az_summary.csv"):
        assert (out / name).exists(), name
    parts = results["parts"]
    assert set(parts) == {"amortized", "per-datapoint", "semi-amortized"}
    for part in ("amortized", "semi-amortized"):
        gaps = parts[part]["gaps"]
        assert math.isfinite(gaps["approximation"]["mean"]) and math.isfinite(gaps["encoder"]["below_best"])
    assert "prior" in parts["per-datapoint"]["routes"]
    for part in parts.values():
        assert part["train_points"]["num_points"] == 20
    assert (tmp_path / "pd.pt").exists() and (tmp_path / "sa.pt").exists()
    # The saved decoders are reused on a second run.
    args.parts = ["per-datapoint"]
    assert script.main(args)["parts"]["per-datapoint"]["decoder"]["checkpoint"] == str(tmp_path / "pd.pt")
