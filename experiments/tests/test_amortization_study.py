"""Smoke run of experiments/amortization_gap.py (the amortization-gap study,
``experiments/studies/amortization.py``) with tiny settings: every result file is written, every
part reports its gaps, and a second run reuses the saved decoders. The library pieces it uses
(semi-amortized guides, ``optimize_local_guide``, the diagnostics) are tested in
``tests/test_amortization.py``.
"""

from __future__ import annotations

import math


def test_amortization_gap_experiment_smoke(load_experiment, tmp_path, mnist_root, drawn, saved_json):
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
    saved_json(out / "results.json", results)
    for name in ("gaps.png", "khat.png", "convergence.png", "marginals.png"):
        drawn(out / name)
    # --idata-points 3 --idata-draws 8 of the z_dim = 3 latents, for each of the four guides, and
    # the ArviZ summary is that of these draws.
    import arviz as az
    import numpy as np
    import pandas

    posterior = az.from_netcdf(str(out / "inference_data.nc")).posterior
    assert set(posterior.data_vars) == {"z_encoder", "z_semi_amortized", "z_optimised", "z_importance_resampled"}
    assert posterior.sizes["chain"] * posterior.sizes["draw"] == 8
    assert posterior.sizes["point"] == 3 and posterior.sizes["latent"] == 3
    table = pandas.read_csv(out / "az_summary.csv", index_col=0)
    assert len(table) == 4 * 3 * 3
    means = posterior["z_encoder"].mean(("chain", "draw")).values.ravel()
    names = [f"z_encoder[{p}, {u}]" for p in posterior["point"].values for u in posterior["latent"].values]
    rows = table.loc[names, "mean"].to_numpy()
    assert np.allclose(rows, means, rtol=0, atol=5.01e-4), (rows, means)  # az.summary rounds to 3 decimals
    parts = results["parts"]
    assert set(parts) == {"amortized", "per-datapoint", "semi-amortized"}
    for part in ("amortized", "semi-amortized"):
        gaps = parts[part]["gaps"]
        assert math.isfinite(gaps["approximation"]["mean"]) and math.isfinite(gaps["encoder"]["below_best"])
    assert "prior" in parts["per-datapoint"]["routes"]
    for part in parts.values():
        assert part["train_points"]["num_points"] == 20
    # The trained decoders are saved with what they were trained with: per-datapoint rows for
    # the 200 training points (moved from their N(0, I) start), one epoch of history.
    from pyrovae.runtime.checkpoint import load_checkpoint

    pd, sa = load_checkpoint(tmp_path / "pd.pt"), load_checkpoint(tmp_path / "sa.pt")
    assert set(pd["modules"]) == {"decoder"} and set(sa["modules"]) == {"decoder", "encoder"}
    assert {name: tuple(v.shape) for name, v in pd["params"].items()} == {"local.z_loc": (200, 3), "local.z_scale": (200, 3)}
    assert (pd["params"]["local.z_loc"] != 0).any(-1).all()
    for state in (pd, sa):
        assert len(state["history"]["train_elbo"]) == 1 and math.isfinite(state["history"]["train_elbo"][0])
    # The saved decoders are reused on a second run.
    args.parts = ["per-datapoint"]
    assert script.main(args)["parts"]["per-datapoint"]["decoder"]["checkpoint"] == str(tmp_path / "pd.pt")
