"""STL and DReG gradient estimators (pyrovae.infer.objectives.pathwise) on the linear-Gaussian model.

- ELBO-STL is unbiased for the exact (closed-form) ELBO gradient; IWAE-DReG is unbiased for the
  IWAE gradient (its mean agrees with the standard pathwise IWAE estimator within Monte Carlo
  error); with the same draws the decoder's DReG gradient *is* the IWAE one.
- Zero variance where theory says so: with q the exact posterior every draw of the STL and DReG
  guide gradients is 0, while the standard pathwise estimators are not.
- IWAE-STL is biased for K > 1 (Tucker et al. 2019), and the test sees the bias.

The replicated gradients come from the gradient-estimator study's harness
(``experiments/studies/gradients.py``: the linear-Gaussian problem with its closed-form ELBO
gradient, replicated networks), which is why these tests live beside the experiments; what needs
no harness (refusals, the CLI) is in ``tests/test_pathwise.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyro
import pytest
import torch
from studies import gradients as study


Z_MAX = 5.0
X_DIM, NOISE_SCALE, REPLICATES = 6, 0.5, 20000


@pytest.fixture(autouse=True)
def float64() -> Iterator[None]:
    with study.default_dtype(torch.float64):
        yield


def _problem(z_dim: int, **kwargs) -> study.LinearGaussianProblem:  # type: ignore[no-untyped-def]
    return study.LinearGaussianProblem.make(z_dim, X_DIM, 1, NOISE_SCALE, seed=3, **kwargs)


def _grads(problem, estimator, k, seed=0, replicates=REPLICATES):  # type: ignore[no-untyped-def]
    pyro.set_rng_seed(seed)
    return study.linear_gaussian_gradients(problem, estimator, k, replicates)


@pytest.mark.parametrize("k", [1, 4])
def test_elbo_stl_is_unbiased(k: int) -> None:
    problem = _problem(3)
    exact = problem.exact_gradients()
    grads = _grads(problem, "elbo-stl", k)
    for group in study.LINEAR_GROUPS:
        stats, _, _ = study.gradient_statistics(grads[group], exact=exact[group])
        assert stats["max_abs_z"] < Z_MAX, (group, stats)
        assert stats["power"] > 10, (group, stats)


def test_iwae_dreg_is_unbiased_and_keeps_the_decoder_gradient() -> None:
    problem = _problem(2)
    # The IWAE gradient of the guide's log-scale is small (the bound wants q wider, not narrower):
    # 100,000 replicates give the check the power to see a bias of its size.
    standard = _grads(problem, "iwae", 5, seed=1, replicates=100_000)
    dreg = _grads(problem, "iwae-dreg", 5, seed=2, replicates=100_000)
    for group in study.LINEAR_GROUPS:
        _, mean, se = study.gradient_statistics(standard[group])
        stats, _, _ = study.gradient_statistics(dreg[group], reference=(mean, se))
        assert stats["max_abs_z_vs_reference"] < Z_MAX, (group, stats)
        assert (mean.abs() / se).max() > 10, group  # power: the gradient is many SEs from 0
    same_draws = _grads(problem, "iwae", 5, seed=2, replicates=50)
    dreg_same = _grads(problem, "iwae-dreg", 5, seed=2, replicates=50)
    torch.testing.assert_close(dreg_same["decoder"], same_draws["decoder"], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(dreg_same["guide loc"], same_draws["guide loc"])


def test_iwae_stl_is_biased_for_several_particles() -> None:
    problem = _problem(2)
    standard = _grads(problem, "iwae", 5, seed=1)
    stl = _grads(problem, "iwae-stl", 5, seed=2)
    _, mean, se = study.gradient_statistics(standard["guide log-scale"])
    stats, _, _ = study.gradient_statistics(stl["guide log-scale"], reference=(mean, se))
    assert stats["max_abs_z_vs_reference"] > Z_MAX, stats


@pytest.mark.parametrize("estimator,k", [("elbo-stl", 1), ("elbo-stl", 3), ("iwae-dreg", 5), ("iwae-stl", 5)])
def test_zero_variance_at_the_exact_posterior(estimator: str, k: int) -> None:
    # z_dim = 1: the exact posterior is a diagonal Gaussian, so the guide can equal it.
    problem = _problem(1, shift=0.0, widen=1.0)
    grads = _grads(problem, estimator, k, replicates=200)
    for group in ("guide loc", "guide log-scale"):
        assert grads[group].abs().max() < 1e-9, (estimator, group, grads[group].abs().max())
    standard = _grads(problem, "reparameterized" if estimator == "elbo-stl" else "iwae", k, replicates=200)
    assert standard["guide loc"].std() > 1e-3
    assert grads["decoder"].std(0).max() > 1e-3  # the decoder's gradient is still stochastic
