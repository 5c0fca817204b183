"""Tests of the gradient-estimator study (``experiments/studies/gradients.py``, experiments/gradient_estimators.py).

- The analytic ELBO of the linear-Gaussian model equals log p(x) - KL(q ‖ p(z|x)) (exact), and its
  autograd gradient equals the gradient derived by hand.
- Every estimator (pathwise, score function without and with a baseline) is unbiased against that
  exact gradient, per coordinate within 5 standard errors from R independent replicates, with
  enough replicates that a bias the size of the gradient would show (power > 10 SE).
- The baseline lowers the variance of the guide's gradient: the log variance ratio is more than
  5 SEs above 0 (SEs from the spread of per-replicate squared deviations, which reduces to the
  F-test for Gaussian gradients and stays valid for heavier tails); the decoder's gradient, which
  no estimator changes, has the same variance under all three (within 5 SE).
- The script runs end to end with tiny flags and writes every promised key and figure.

The linear-Gaussian tests run in float64; the MNIST smoke run in float32, as MNIST is.
The score-function objective's choice of baseline, a library matter, is tested in
``tests/test_gradient_estimators.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pyro
import pytest
import torch
from studies import gradients as study
from torch.distributions import MultivariateNormal, kl_divergence

from pyrovae.models.linear_gaussian import (
    linear_gaussian_log_marginal,
    linear_gaussian_posterior,
)

SCRIPT = Path(__file__).resolve().parents[1] / "gradient_estimators.py"
Z_MAX = 5.0
X_DIM, NOISE_SCALE, REPLICATES = 6, 0.5, 20000


@pytest.fixture
def float64() -> Iterator[None]:
    with study.default_dtype(torch.float64):
        yield


def problem(z_dim: int, num_points: int = 1, seed: int = 3) -> study.LinearGaussianProblem:
    return study.LinearGaussianProblem.make(z_dim, X_DIM, num_points, NOISE_SCALE, seed=seed)


# ------------------------------------------------------------------------------------------------
# closed forms


@pytest.mark.usefixtures("float64")
def test_analytic_elbo_is_log_marginal_minus_kl() -> None:
    """ELBO(q) = log p(x) - KL(q ‖ p(z|x)) exactly, for a diagonal q and the full-covariance
    posterior of the linear-Gaussian model."""
    p = problem(z_dim=3, num_points=5)
    elbo = study.analytic_elbo(p.x, p.loc, p.scale.log(), p.weight, p.bias, p.noise_scale)
    log_px = linear_gaussian_log_marginal(p.x, p.weight, p.bias, p.noise_scale)
    q = MultivariateNormal(p.loc, scale_tril=torch.diag_embed(p.scale))
    kl = kl_divergence(q, linear_gaussian_posterior(p.x, p.weight, p.bias, p.noise_scale))
    assert elbo.shape == (5,)
    torch.testing.assert_close(elbo, log_px - kl, rtol=1e-10, atol=1e-10)
    assert torch.all(kl > 0.1)  # the guide really is mis-fit


@pytest.mark.usefixtures("float64")
def test_exact_gradient_matches_hand_formulas() -> None:
    r"""With r = x - W m - b, for the per-point ELBO (1/P) Σ_p ELBO_p:

        ∂/∂m_p        = (Wᵀ r_p / σ² - m_p) / P
        ∂/∂log s_pj   = (1 - s_pj² - s_pj² ‖W_{:,j}‖² / σ²) / P
        ∂/∂W          = Σ_p (r_p m_pᵀ - W diag(s_p²)) / (σ² P)
        ∂/∂b          = Σ_p r_p / (σ² P)
    """
    p = problem(z_dim=3, num_points=4)
    grads = p.exact_gradients()
    n, sigma2 = p.num_points, p.noise_scale**2
    resid = p.x - p.loc @ p.weight.T - p.bias
    d_loc = (resid @ p.weight / sigma2 - p.loc) / n
    s2 = p.scale**2
    d_log_scale = (1 - s2 - s2 * (p.weight**2).sum(0) / sigma2) / n
    d_weight = (resid.T @ p.loc - p.weight * s2.sum(0)) / (sigma2 * n)
    d_bias = resid.sum(0) / (sigma2 * n)
    torch.testing.assert_close(grads["guide loc"], d_loc.reshape(-1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads["guide log-scale"], d_log_scale.reshape(-1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads["decoder"], torch.cat([d_weight.reshape(-1), d_bias]), rtol=1e-10, atol=1e-10)
    # one coordinate written out in full: ∂ELBO/∂m_{0,0} for P = 1
    single = problem(z_dim=3, num_points=1)
    w0 = single.weight[:, 0]
    by_hand = (w0 * (single.x[0] - single.weight @ single.loc[0] - single.bias)).sum() / sigma2 - single.loc[0, 0]
    assert single.exact_gradients()["guide loc"][0].item() == pytest.approx(by_hand.item(), rel=1e-12)


@pytest.mark.usefixtures("float64")
def test_replicated_linear_is_one_linear_map_per_copy() -> None:
    weight, bias = torch.randn(5, 3), torch.randn(5)
    layer = study.ReplicatedLinear(weight, bias, num_replicates=4, points_per_replicate=2)
    with torch.no_grad():
        layer.weight[2] += 1.0  # copies are independent parameters
    z = torch.randn(7, 8, 3)  # (K, R·P, d)
    out = layer(z)
    assert out.shape == (7, 8, 5)
    for r in range(4):
        rows = slice(2 * r, 2 * r + 2)
        torch.testing.assert_close(out[:, rows], z[:, rows] @ layer.weight[r].T + bias)


@pytest.mark.usefixtures("float64")
def test_gradient_statistics_on_known_gaussian() -> None:
    """Gradients g ~ N(μ, diag v): the reported variance is within 5 SE of mean(v), the z
    statistics against μ are those of an unbiased estimator, and the debiased SNR is close to
    mean(|μ| / sqrt(v))."""
    mu = torch.tensor([0.0, 1.0, -2.0, 3.0])
    sd = torch.tensor([1.0, 2.0, 0.5, 3.0])
    grads = mu + sd * torch.randn(4000, 4)
    stats, mean, se = study.gradient_statistics(grads, exact=mu)
    assert abs(stats["variance"] - (sd**2).mean().item()) < Z_MAX * stats["variance_se"]
    assert stats["max_abs_z"] < Z_MAX
    assert stats["snr"] == pytest.approx((mu.abs() / sd).mean().item(), rel=0.05)
    debiased, _, _ = study.gradient_statistics(grads)
    assert debiased["snr"] == pytest.approx(stats["snr"], abs=0.05)
    shifted, _, _ = study.gradient_statistics(grads + 0.2, exact=mu)
    assert shifted["max_abs_z"] > Z_MAX  # a bias of 0.1-0.4 sd is caught


# ------------------------------------------------------------------------------------------------
# unbiasedness and variance reduction


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("z_dim, num_particles", [(2, 1), (4, 4)])
@pytest.mark.parametrize("estimator", list(study.ESTIMATORS))
def test_every_estimator_is_unbiased(estimator: str, z_dim: int, num_particles: int) -> None:
    """Mean of R = 20000 independent draws vs the exact gradient, per coordinate of every group:
    |z| < 5, while the largest true coordinate is more than 10 SE from 0 (the check has power)."""
    p = problem(z_dim)
    exact = p.exact_gradients()
    grads = study.linear_gaussian_gradients(p, estimator, num_particles, REPLICATES)
    for group in study.LINEAR_GROUPS:
        assert grads[group].shape == (REPLICATES, exact[group].numel())
        stats, _, _ = study.gradient_statistics(grads[group], exact[group])
        assert stats["max_abs_z"] < Z_MAX, (group, stats)
        assert stats["power"] > 2 * Z_MAX, (group, stats)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("z_dim, num_particles", [(4, 1), (4, 4)], ids=["moving-average", "leave-one-out"])
def test_baseline_reduces_variance(z_dim: int, num_particles: int) -> None:
    """Var(score) / Var(score + baseline) > 1 by more than 5 SE of the log ratio for the guide's
    loc and log-scale; the decoder gradient (no log-derivative term) has equal variance under all
    three estimators. Independent draws for each estimator."""
    p = problem(z_dim)
    stats = {}
    for seed, estimator in enumerate(study.ESTIMATORS):
        pyro.set_rng_seed(seed)
        grads = study.linear_gaussian_gradients(p, estimator, num_particles, REPLICATES)
        stats[estimator] = {g: study.gradient_statistics(v)[0] for g, v in grads.items()}
    for group in ("guide loc", "guide log-scale"):
        log_ratio, z = study.log_variance_ratio(stats["score"][group], stats["score-baseline"][group])
        assert z > Z_MAX, (group, math.exp(log_ratio), z)
    for estimator in ("score", "score-baseline"):
        _, z = study.log_variance_ratio(stats[estimator]["decoder"], stats["reparameterized"]["decoder"])
        assert abs(z) < Z_MAX, (estimator, z)


# ------------------------------------------------------------------------------------------------
# the script


def load_script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gradient_estimators_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_smoke(tmp_path: Path, mnist_root: Path) -> None:
    """experiments/gradient_estimators.py with tiny flags writes results.json with every section
    and the four figures."""
    script = load_script()
    out = tmp_path / "out"
    args = script.build_parser().parse_args(
        [
            "--out", str(out), "--data-dir", str(mnist_root), "--seed", "1",
            "--dims", "1", "2", "--particles", "1", "2", "--replicates", "50", "--x-dim", "4",
            "--num-train", "300", "--num-test", "50", "--z-dim", "2", "--hidden", "8",
            "--batch-size", "20", "--pretrain-steps", "3", "--mnist-particles", "1", "2",
            "--mnist-replicates", "4", "--train-seconds", "0.3", "--eval-every", "0.1",
            "--train-runs", "reparameterized:1", "score-baseline:2:0.01", "--train-seeds", "1",
            "--final-eval-samples", "2",
        ]
    )
    threads = torch.get_num_threads()
    try:
        script.main(args)
    finally:
        torch.set_num_threads(threads)  # main() sets --threads for the whole process
    results = json.loads((out / "results.json").read_text())
    assert {"question", "estimators", "config", "linear_gaussian", "mnist", "seconds"} <= set(results)
    runs = results["linear_gaussian"]["runs"]
    assert len(runs) == 2 * 2 * len(study.ESTIMATORS)
    for run in runs:
        assert set(run["groups"]) == set(study.LINEAR_GROUPS)
        for stats in run["groups"].values():
            assert {"variance", "variance_se", "snr", "max_abs_z", "relative_bias", "power"} <= set(stats)
    mnist = results["mnist"]
    assert len(mnist["variance"]["runs"]) == 2 * len(study.ESTIMATORS)
    for run in mnist["variance"]["runs"]:
        assert set(run["groups"]) == set(study.VAE_GROUPS)
    training = mnist["training"]["runs"]
    assert [(r["estimator"], r["num_particles"], r["lr"]) for r in training] == [
        ("reparameterized", 1, 1e-3), ("score-baseline", 2, 0.01)
    ]
    for run in training:
        assert run["cpu_seconds"] >= 0.3 and math.isfinite(run["final_test_elbo"])
        assert len(run["history"]["test_elbo"]) == len(run["history"]["seconds"]) >= 2
    figures = ("variance_vs_dim.png", "snr_vs_dim.png", "mnist_gradients.png", "training_curves.png")
    for name in figures:
        assert (out / name).stat().st_size > 1000, name
    # the derived ratios the page prints: score+baseline over pathwise, per group, d and K
    ratio = results["variance_ratios"]["guide loc"]["d=1 K=1"]
    by = {(r["estimator"], r["num_particles"], r["z_dim"]): r["groups"]["guide loc"]["variance"] for r in runs}
    assert ratio["baseline_over_pathwise"] == by[("score-baseline", 1, 1)] / by[("reparameterized", 1, 1)]
    # --replot redraws every figure from results.json alone, and writes the results with their run record
    replot = tmp_path / "replot"
    script.main(script.build_parser().parse_args(["--replot", str(out / "results.json"), "--out", str(replot)]))
    assert sorted(p.name for p in replot.iterdir()) == sorted([*figures, "results.json", "run.json"])
    assert json.loads((replot / "results.json").read_text())["variance_ratios"] == results["variance_ratios"]
    assert json.loads((replot / "run.json").read_text())["role"].startswith("replot")


def test_script_flags_have_type_and_help() -> None:
    parser = load_script().build_parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, action.dest
        assert action.type is not None, action.dest
        assert all(s.startswith("--") and "_" not in s for s in action.option_strings), action.option_strings
    for bad in ("pathwise:1", "score:0", "score:2:-1", "score:2:fast", "score:2:0.1:3"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--train-runs", bad])
    assert parser.parse_args(["--train-runs", "score:2:1e-4"]).train_runs == [("score", 2, 1e-4)]
    assert isinstance(parser.parse_args([]), argparse.Namespace)


def test_training_trajectory_does_not_depend_on_evaluations() -> None:
    """Evaluations draw from a forked random stream: 12 steps with a test-ELBO record after every
    step end with the same weights as 12 steps without records."""
    from pyrovae.data import Dataset

    generator = torch.Generator().manual_seed(0)
    data = Dataset(
        name="toy", train=torch.rand(64, 10, generator=generator), test=torch.rand(16, 10, generator=generator),
        likelihood="bernoulli", binarize="dynamic",
    )
    x_test = torch.bernoulli(data.test, generator=generator)
    weights = []
    for eval_every in (0.0, float("inf")):
        model, guide = study.build_vae(10, 2, [8], seed=5)
        history = study.train_for(
            model, guide, data, x_test, study.make_estimator("score-baseline", 1),
            max_steps=12, batch_size=16, eval_every=eval_every, seed=5,
        )
        assert history["steps"][-1] == 12
        weights.append(torch.cat([p.detach().reshape(-1) for p in model.decoder.parameters()]))
    assert len(history["test_elbo"]) == 2  # start and end only, without intermediate records
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)
