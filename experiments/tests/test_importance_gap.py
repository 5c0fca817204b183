"""Tests of studies.importance and studies.gap, and smoke runs of
experiments/why_importance_sampling.py and experiments/gap_is_kl.py.

Exactness claims are checked to ~1e-6 (in float64 they hold to ~1e-12); every stochastic claim
is checked against its Monte Carlo standard error with |z| < 5 (or z > 5 for "larger than").
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from studies.gap import linear_gaussian_gap
from studies.importance import (
    Proposal,
    float64,
    log_abs_expm1,
    log_weight_moment,
    make_guide,
    relative_variance_from_replicates,
    replicated_importance_sampling,
)
from torch.distributions import MultivariateNormal

from pyrovae.guides import ExactPosteriorGuide
from pyrovae.models import LinearGaussian

ROOT = Path(__file__).resolve().parents[2]
Z_MAX = 5.0
PRIOR = Proposal("prior", prior=True)
SHIFTED = Proposal("shifted", shift=0.5, scale=1.2)



def test_log_weight_moment_closed_forms():
    with float64():
        # 1-D: E_q[(p/q)²] = s² / sqrt(2s² - 1) for p = N(0, 1), q = N(0, s²), infinite for s² <= 1/2.
        p = MultivariateNormal(torch.zeros(1), torch.eye(1))
        for s in (0.8, 1.0, 1.5):
            q = MultivariateNormal(torch.zeros(1), s**2 * torch.eye(1))
            expected = math.log(s**2 / math.sqrt(2 * s**2 - 1))
            assert float(log_weight_moment(p, q, 2.0)) == pytest.approx(expected, abs=1e-12)
        q = MultivariateNormal(torch.zeros(1), 0.49 * torch.eye(1))
        assert math.isinf(float(log_weight_moment(p, q, 2.0)))
        # A mean shift m with equal unit variances: E_q[(p/q)^α] = exp(α(α-1) m²/2).
        q = MultivariateNormal(torch.full((1,), 0.7), torch.eye(1))
        assert float(log_weight_moment(p, q, 3.0)) == pytest.approx(3 * 2 * 0.49 / 2, abs=1e-12)
        assert float(log_abs_expm1(torch.tensor(800.0))) == pytest.approx(800.0)
        assert float(log_abs_expm1(torch.tensor(-1e-9))) == pytest.approx(math.log(1e-9), rel=1e-6)


@pytest.mark.parametrize("through_proposal", [False, True])
def test_exact_posterior_gives_zero_variance(through_proposal):
    with float64(), torch.no_grad():
        model, x = LinearGaussian.random(3, 6, num_points=4, seed=1)
        guide = make_guide(model, Proposal("exact")) if through_proposal else ExactPosteriorGuide(model)
        log_px = model.log_marginal(x)
        for k in (1, 10):
            ll, elbo, ess = replicated_importance_sampling(model, guide, x, k, replicates=50)
            assert (ll - log_px[:, None]).abs().max() < 1e-6
            assert (elbo - log_px[:, None]).abs().max() < 1e-6
            assert (ess / k - 1).abs().max() < 1e-6
            log_relvar, _ = relative_variance_from_replicates(ll - log_px[:, None])
            assert log_relvar.max() < math.log(1e-10)


@pytest.mark.parametrize("proposal", [PRIOR, SHIFTED], ids=["prior", "shifted"])
@pytest.mark.parametrize("z_dim", [1, 4])
def test_relative_variance_matches_closed_form(proposal, z_dim):
    """The replicate estimate of Var[p̂]/p² agrees with exp(D_2) - 1 within 5 SE; the SE is
    valid because the weights' fourth moment is finite (checked in closed form)."""
    replicates = 10_000
    with float64(), torch.no_grad():
        model, x = LinearGaussian.random(z_dim, 2 * z_dim, num_points=2, seed=3)
        posterior = model.posterior(x)
        q = proposal.distribution(posterior)
        assert torch.isfinite(log_weight_moment(posterior, q, 4.0)).all()
        exact = torch.expm1(log_weight_moment(posterior, q, 2.0))
        ll, _, _ = replicated_importance_sampling(model, make_guide(model, proposal), x, 1, replicates)
        log_v, log_se = relative_variance_from_replicates(ll - model.log_marginal(x)[:, None])
        z = (log_v.exp() - exact) / log_se.exp()
        assert z.abs().max() < Z_MAX, (log_v.exp(), exact, log_se.exp())


def test_prior_relative_variance_increases_with_dimension():
    """Closed form: increasing over d = 1..64. Replicates: the mean over 4 points at d = 4 exceeds
    the one at d = 1 by more than 5 standard errors of the difference."""
    with float64(), torch.no_grad():
        exact = []
        for d in (1, 2, 4, 8, 16, 32, 64):
            model, x = LinearGaussian.random(d, 2 * d, num_points=4, seed=5)
            posterior = model.posterior(x)
            exact.append(float(log_weight_moment(posterior, PRIOR.distribution(posterior), 2.0).mean()))
        assert all(b > a for a, b in zip(exact, exact[1:])), exact
        means, ses = [], []
        for d in (1, 4):
            model, x = LinearGaussian.random(d, 2 * d, num_points=4, seed=5)
            ll, _, _ = replicated_importance_sampling(model, make_guide(model, PRIOR), x, 1, 20_000)
            log_v, log_se = relative_variance_from_replicates(ll - model.log_marginal(x)[:, None])
            means.append(float(log_v.exp().mean()))
            ses.append(float(log_se.mul(2).exp().sum().sqrt()) / 4)
        z = (means[1] - means[0]) / math.hypot(*ses)
        assert z > Z_MAX, (means, ses)


def test_gap_is_kl_and_iwae_closes_it():
    results = linear_gaussian_gap(
        z_dim=3, x_dim=6, num_points=4, ks=(1, 5, 50), samples_per_k=2000, min_replicates=100, seed=2
    )
    for row in results["rows"]:
        by_k = row["by_k"]
        if row["proposal"]["shift"] == 0 and row["proposal"]["scale"] == 1 and not row["proposal"]["mean_field"]:
            assert row["kl_closed_form"] == pytest.approx(0.0, abs=1e-9)
            assert max(b["max_abs_gap"] for b in by_k) < 1e-6
            continue
        # log p(x) - ELBO = KL(q || p(z|x)), to Monte Carlo error.
        z = (row["elbo_gap"] - row["kl_closed_form"]) / row["elbo_gap_se"]
        assert abs(z) < Z_MAX, (row["guide"], row["elbo_gap"], row["kl_closed_form"], row["elbo_gap_se"])
        for b in by_k:  # IWAE_K <= log p(x)
            assert b["gap"] > -Z_MAX * b["gap_se"], (row["guide"], b)
        for a, b in zip(by_k, by_k[1:]):  # IWAE_K increasing in K
            assert a["gap"] - b["gap"] > -Z_MAX * math.hypot(a["gap_se"], b["gap_se"]), (row["guide"], a, b)
        first, last = by_k[0], by_k[-1]
        assert first["gap"] - last["gap"] > Z_MAX * math.hypot(first["gap_se"], last["gap_se"]), row["guide"]


def test_why_importance_sampling_script_smoke(load_experiment, tmp_path, drawn):
    script = load_experiment("experiments/why_importance_sampling.py")
    args = script.parse_args([
        "--dims", "1", "3", "--num-points", "2", "--num-samples", "5", "--replicates", "10",
        "--one-sample-replicates", "50", "--seed", "1", "--out", str(tmp_path),
    ])
    script.main(args)
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"settings", "rows", "seconds", "exact_posterior_max_abs_log_error"} <= set(results)
    assert len(results["rows"]) == 2 * 4
    for row in results["rows"]:
        assert {"z_dim", "proposal", "one_sample", "k_sample", "weights_variance_finite"} <= set(row)
        assert {"log10_relvar", "log10_relvar_exact", "rmse_log", "ess_over_k"} <= set(row["k_sample"])
    assert results["exact_posterior_max_abs_log_error"] < 1e-8
    drawn(tmp_path / "why_importance_sampling.png")


def test_gap_is_kl_script_smoke(load_experiment, tmp_path, mnist_root, drawn):
    script = load_experiment("experiments/gap_is_kl.py")
    args = script.parse_args([
        "--z-dim", "2", "--x-dim", "4", "--num-points", "2", "--ks", "1", "5",
        "--samples-per-k", "50", "--min-replicates", "10",
        "--data-dir", str(mnist_root), "--train-epochs", "1", "--num-train", "200",
        "--vae-z-dim", "4", "--vae-hidden", "16", "--num-test", "20", "--eval-samples", "20",
        "--seed", "1", "--out", str(tmp_path),
    ])
    script.main(args)
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"linear_gaussian", "mnist", "seconds"} <= set(results)
    assert len(results["linear_gaussian"]["rows"]) == 5
    mnist = results["mnist"]
    assert mnist["num_points"] == 20 and mnist["num_samples"] == 20
    keys = ("gap_mean", "gap_median", "gap_quantiles", "kl_prior_mean", "gap_over_kl_prior", "per_point_gap", "by_label")
    for key in keys:
        assert key in mnist
    for name in ("gap_vs_k.png", "mnist_gap_histogram.png", "mnist_gap_vs_kl.png"):
        drawn(tmp_path / name)
