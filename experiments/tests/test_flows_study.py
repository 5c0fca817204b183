"""experiments/gap_closes.py (``experiments/studies/flows.py``) with tiny settings: what it writes
obeys the identities it rests on, whatever the training reached."""

from __future__ import annotations

import math

import torch
from studies.flows import Banana


def test_gap_closes_smoke(load_experiment, tmp_path) -> None:  # type: ignore[no-untyped-def]
    script = load_experiment("experiments/gap_closes.py")
    results = script.main(["--out", str(tmp_path), "--guides", "diagonal", "full-cov", "planar", "--steps", "40",
                           "--draws", "200", "--num-points", "12", "--flow-layers", "1", "--hidden", "8",
                           "--train-epochs", "2", "--train-eval-samples", "20"])
    for name in ("results.json", "gaps.png", "banana_posteriors.png", "train_full_cov/metrics.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    linear = results["linear"]
    for row in linear["rows"]:
        if row["kl_closed_form"] is not None:
            # For a Gaussian q the gap *is* KL(q ‖ p(z|x)) (closed form): 5 MC SEs.
            assert abs(row["gap"] - row["kl_closed_form"]) < 5 * row["gap_se"] + 1e-6, row
            # and no diagonal q beats the least KL of the diagonal family
            if row["guide"] == "diagonal":
                assert row["kl_closed_form"] >= linear["diagonal_floor"] - 1e-9
    for study in (linear, results["banana"]):
        assert all(row["gap"] > -5 * row["gap_se"] for row in study["rows"])  # ELBO ≤ log p(x)
    train = results["train_full_cov"]
    assert train["gap"] == train["test_log_likelihood_exact"] - train["test_elbo"]
    assert train["test_elbo_se"] > 0 and math.isfinite(train["gap_in_se"])


def test_banana_quadrature_is_the_marginal() -> None:
    # log p(x) by the grid equals an importance-sampling estimate with the prior as proposal
    # (unbiased in p, here with 200,000 draws: within 5 of its standard errors).
    model = Banana()
    x = model.sample(3, torch.Generator().manual_seed(1)).double()
    exact = model.log_marginal(x.float()).double()
    z = torch.randn(200_000, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    log_w = torch.distributions.Normal(model.mean(z).unsqueeze(1), model.noise_scale).log_prob(x).sum(-1)  # (S, 3)
    estimate = torch.logsumexp(log_w, 0) - math.log(len(z))
    w = (log_w - log_w.max(0).values).exp()
    se = (w.std(0) / w.mean(0) / math.sqrt(len(z)))
    assert ((estimate - exact).abs() < 5 * se + 1e-4).all(), (estimate, exact, se)
