"""Smoke run of experiments/gradient_snr.py (``experiments/studies/snr.py``): the SNR of the IWAE,
IWAE-STL, IWAE-DReG, MIWAE, PIWAE and CIWAE gradients for a briefly trained VAE, with tiny settings. The estimators
themselves are tested in ``test_pathwise_estimators.py`` and ``tests/test_pathwise.py``.
"""

from __future__ import annotations

import torch
from studies import gradients as study


def test_gradient_snr_experiment_smoke(load_experiment, tmp_path, mnist_root, drawn, saved_json) -> None:  # type: ignore[no-untyped-def]
    from pyrovae import TrainConfig
    from pyrovae.app.run import train_and_evaluate

    with study.default_dtype(torch.float32):
        config = TrainConfig(z_dim=3, hidden_sizes=(16,), epochs=1, num_train=200, num_test=40, eval_samples=5)
        train_and_evaluate(config, tmp_path / "run", data_dir=str(mnist_root), progress=False)
        script = load_experiment("experiments/gradient_snr.py")
        results = script.main([
            "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--data-dir", str(mnist_root),
            "--out", str(tmp_path / "out"), "--ks", "1", "4", "--points", "3", "--replicates", "5",
        ])
    drawn(tmp_path / "out" / "snr.png")
    saved_json(tmp_path / "out" / "results.json", results)
    names = ("iwae", "iwae-stl", "iwae-dreg", "miwae", "piwae", "ciwae")
    assert {(r["estimator"], r["k"]) for r in results["rows"]} == {(e, k) for e in names for k in (1, 4)}
    # MIWAE and PIWAE draw M = 4 groups of K; the others K.
    assert all(r["draws_per_point"] == (4 if r["estimator"] in ("miwae", "piwae") else 1) * r["k"] for r in results["rows"])
    for row in results["rows"]:
        assert row["encoder"]["snr"] >= 0 and row["decoder"]["variance"] > 0
    # K = 1: DReG and STL are the same estimator (w̃ = 1).
    assert set(results["encoder_snr_log_slope"]) == set(names)
