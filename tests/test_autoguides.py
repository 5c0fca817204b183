"""pyrovae's evaluation with a user's own Pyro model and Pyro's autoguides.

The model is a plain function (``pyro.module("net", net)``, ``pyro.plate(name, N, subsample=index)``)
and the guide ``AutoNormal(model, create_plates=...)``. AutoNormal samples an auxiliary site
``z_unconstrained`` the model lacks and puts z at a ``Delta`` whose ``log_density`` carries the
Jacobian of the transform: both count in log q.

Exact answers: a linear-Gaussian model whose W has orthogonal columns has a diagonal Gaussian
posterior, so AutoNormal can hold it exactly; then every importance weight equals p(x) and the
estimators have zero variance. With another AutoNormal, pyrovae's ELBO and KL are compared with
their closed forms and its log p̂ with an independent importance sampler, within 5 standard
errors of replicates. A positive latent (LogNormal, so AutoNormal's transform is exp) checks the
Jacobian term.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Callable, Optional

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoDelta, AutoDiagonalNormal, AutoNormal
from torch import nn
from torch.distributions import kl_divergence

import pyrovae
from pyrovae.infer.evaluate import posterior_means

X_DIM, Z_DIM, NUM_DATA, SIGMA = 4, 2, 30, 0.5
Z_MAX = 5.0


@pytest.fixture(autouse=True)
def float64() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.clear_param_store()
    yield
    torch.set_default_dtype(old)


class LinearGaussianProblem:
    """pyrovae.LinearGaussian as the truth, with W = Q diag(2, 0.7) (orthogonal columns), and the
    same model written as a user would write it."""

    def __init__(self, plate: str = "data") -> None:
        g = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(X_DIM, Z_DIM, generator=g))
        self.weight = q * torch.tensor([2.0, 0.7])
        self.bias = torch.randn(X_DIM, generator=g)
        self.truth = pyrovae.LinearGaussian(X_DIM, Z_DIM, SIGMA, weight=self.weight, bias=self.bias)
        z = torch.randn(NUM_DATA, Z_DIM, generator=g)
        self.x = z @ self.weight.T + self.bias + SIGMA * torch.randn(NUM_DATA, X_DIM, generator=g)
        with torch.no_grad():
            self.log_px = self.truth.log_marginal(self.x)
            posterior = self.truth.posterior(self.x)
        self.post_loc = posterior.loc
        self.post_scale = posterior.covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt()
        off_diagonal = posterior.covariance_matrix[0, 0, 1]
        assert abs(off_diagonal) < 1e-12  # the posterior is diagonal: AutoNormal can hold it
        net = nn.Linear(Z_DIM, X_DIM)
        with torch.no_grad():
            net.weight.copy_(self.weight)
            net.bias.copy_(self.bias)
        self.plate = plate

        def model(x: Optional[torch.Tensor], index: Optional[torch.Tensor] = None,
                  num_data: Optional[int] = None) -> None:
            pyro.module("net", net)
            with pyro.plate(plate, num_data, subsample=index):
                z = pyro.sample("z", dist.Normal(torch.zeros(len(index), Z_DIM), 1.0).to_event(1))
                pyro.sample("x", dist.Normal(net(z), SIGMA).to_event(1), obs=x)

        self.model = model

    def create_plates(self, x: Optional[torch.Tensor], index: Optional[torch.Tensor] = None,
                      num_data: Optional[int] = None) -> pyro.plate:
        return pyro.plate(self.plate, num_data, subsample=index)

    def autonormal(self, loc: torch.Tensor, scale: torch.Tensor) -> AutoNormal:
        guide = AutoNormal(self.model, create_plates=self.create_plates)
        guide(self.x, torch.arange(NUM_DATA), NUM_DATA)  # set up its params
        store = pyro.get_param_store()
        store["AutoNormal.locs.z"] = loc
        store["AutoNormal.scales.z"] = scale
        return guide

    def misfit(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.post_loc + 0.6 * self.post_scale, 1.3 * self.post_scale


def test_autonormal_at_the_exact_posterior_gives_log_px_for_every_draw() -> None:
    problem = LinearGaussianProblem()
    guide = problem.autonormal(problem.post_loc, problem.post_scale)
    index = torch.arange(4, 15)
    est = pyrovae.importance_sampling(
        problem.model, guide, problem.x[index], index, NUM_DATA, num_samples=40, chunk_size=15
    )
    torch.testing.assert_close(est.log_likelihood, problem.log_px[index], rtol=0, atol=1e-10)
    torch.testing.assert_close(est.elbo, problem.log_px[index], rtol=0, atol=1e-10)
    torch.testing.assert_close(est.ess, torch.full_like(est.ess, 40.0), rtol=1e-10, atol=0)
    ll = pyrovae.log_likelihood(problem.model, guide, problem.x[index], index, NUM_DATA, num_samples=7)
    torch.testing.assert_close(ll, problem.log_px[index], rtol=0, atol=1e-10)

    result = pyrovae.evaluate_dataset(problem.model, guide, problem.x, num_samples=20, batch_size=7, kl_samples=5)
    torch.testing.assert_close(result.log_likelihood, problem.log_px, rtol=0, atol=1e-10)
    torch.testing.assert_close(result.gap, torch.zeros(NUM_DATA), rtol=0, atol=1e-10)
    assert result.active_units == {"z": 2}
    assert torch.isfinite(result.kl).all()


def test_autonormal_misfit_matches_closed_forms_and_an_independent_importance_sampler() -> None:
    problem = LinearGaussianProblem()
    loc, scale = problem.misfit()
    guide = problem.autonormal(loc, scale)
    index = torch.arange(3, 9)
    x = problem.x[index]
    q = dist.Normal(loc[index], scale[index]).to_event(1)
    prior = dist.Normal(torch.zeros(Z_DIM), 1.0).to_event(1)
    kl = kl_divergence(q, prior)
    residual = x - loc[index] @ problem.weight.T - problem.bias
    trace_term = (problem.weight**2 @ (scale[index] ** 2).T).T.sum(-1)
    expected_log_lik = -0.5 * X_DIM * math.log(2 * math.pi * SIGMA**2) - (
        (residual**2).sum(-1) + trace_term
    ) / (2 * SIGMA**2)
    elbo = expected_log_lik - kl

    def by_hand(k: int) -> torch.Tensor:
        z = q.sample((k,))
        log_w = prior.log_prob(z) + dist.Normal(z @ problem.weight.T + problem.bias, SIGMA).to_event(1).log_prob(x) - q.log_prob(z)
        return torch.logsumexp(log_w, 0) - math.log(k)

    replicates, k = 40, 25
    pyro.set_rng_seed(3)
    ours = [pyrovae.importance_sampling(problem.model, guide, x, index, NUM_DATA, num_samples=k, chunk_size=10)
            for _ in range(replicates)]
    kls = torch.stack([pyrovae.kl_to_prior(problem.model, guide, x, index, NUM_DATA, num_samples=k)
                       for _ in range(replicates)])
    hand = torch.stack([by_hand(k) for _ in range(replicates)])

    def check(values: torch.Tensor, target: torch.Tensor, target_se: torch.Tensor | float = 0.0) -> None:
        se = torch.sqrt(values.var(0) / replicates + torch.as_tensor(target_se) ** 2)
        z = (values.mean(0) - target) / se
        assert z.abs().max() < Z_MAX, (values.mean(0), target, se)

    check(torch.stack([e.elbo for e in ours]), elbo)
    check(kls, kl)
    check(torch.stack([e.log_likelihood for e in ours]), hand.mean(0), hand.std(0) / math.sqrt(replicates))
    # the misfit is visible: the ELBO is well below log p(x)
    assert (problem.log_px[index] - elbo).min() > 0.1


def test_autonormal_transform_jacobian_counts_in_log_q() -> None:
    """u ~ LogNormal(0, 1), x | u ~ N(log u, σ²): AutoNormal's unconstrained site is log u, whose
    posterior N(x / (1 + σ²), σ² / (1 + σ²)) it holds exactly; u = exp(log u) is a Delta with the
    log-Jacobian as its log_density. log p(x) = log N(x; 0, 1 + σ²)."""
    x = torch.linspace(-2.0, 2.5, 12).unsqueeze(-1)
    num_data = len(x)

    def model(x: torch.Tensor, index: torch.Tensor, num_data: int) -> None:
        with pyro.plate("data", num_data, subsample=index):
            u = pyro.sample("u", dist.LogNormal(torch.zeros(len(index), 1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(u.log(), SIGMA).to_event(1), obs=x)

    guide = AutoNormal(model, create_plates=lambda x, index, num_data: pyro.plate("data", num_data, subsample=index))
    index = torch.arange(num_data)
    guide(x, index, num_data)
    store = pyro.get_param_store()
    store["AutoNormal.locs.u"] = x / (1 + SIGMA**2)
    store["AutoNormal.scales.u"] = torch.full_like(x, SIGMA / math.sqrt(1 + SIGMA**2))
    log_px = dist.Normal(0.0, math.sqrt(1 + SIGMA**2)).log_prob(x).squeeze(-1)
    est = pyrovae.importance_sampling(model, guide, x, index, num_data, num_samples=30)
    torch.testing.assert_close(est.log_likelihood, log_px, rtol=0, atol=1e-10)
    torch.testing.assert_close(est.elbo, log_px, rtol=0, atol=1e-10)
    result = pyrovae.evaluate_dataset(model, guide, x, num_samples=10, batch_size=5)
    torch.testing.assert_close(result.log_likelihood, log_px, rtol=0, atol=1e-10)


def test_posterior_means_of_an_autonormal_are_its_transformed_means() -> None:
    """E_q[z] of AutoNormal's z (a Delta at a transformed draw) is the mean of the underlying
    Normal for an identity transform: the locs of the batch's rows, not one draw."""
    problem = LinearGaussianProblem()
    loc, scale = problem.misfit()
    guide = problem.autonormal(loc, scale)
    index = torch.arange(5, 17)
    means = posterior_means(guide, problem.x[index], index, NUM_DATA, num_samples=4000)
    assert set(means) == {"z"}  # the auxiliary site is not a latent of the model
    se = scale[index] / math.sqrt(4000)
    assert ((means["z"] - loc[index]) / se).abs().max() < Z_MAX


def test_plate_name_lets_a_differently_named_data_plate_evaluate() -> None:
    problem = LinearGaussianProblem(plate="batch")
    guide = problem.autonormal(problem.post_loc, problem.post_scale)
    with pytest.raises(ValueError, match="plate_name='batch'"):
        pyrovae.evaluate_dataset(problem.model, guide, problem.x, num_samples=5)
    result = pyrovae.evaluate_dataset(
        problem.model, guide, problem.x, num_samples=5, batch_size=11, plate_name="batch"
    )
    torch.testing.assert_close(result.log_likelihood, problem.log_px, rtol=0, atol=1e-10)
    # active units from the exact posterior means, computed independently
    assert result.active_units == {"z": int((problem.post_loc.var(0) > 0.01).sum())}
    index = torch.arange(NUM_DATA)
    kl = pyrovae.kl_to_prior(problem.model, guide, problem.x, index, NUM_DATA, num_samples=3, plate_name="batch")
    assert kl.shape == (NUM_DATA,)


def test_plate_name_with_pyrovae_guides_and_nested_plates() -> None:
    """A user model whose data plate is "batch" (dim -2) with a nested plate over features, and a
    hand-written Gaussian guide: log p̂, KL and posterior means per data point."""
    problem = LinearGaussianProblem()
    loc, scale = problem.post_loc, problem.post_scale

    def model(x: torch.Tensor, index: torch.Tensor, num_data: int) -> None:
        with pyro.plate("batch", num_data, subsample=index, dim=-2):
            with pyro.plate("latent", Z_DIM, dim=-1):
                z = pyro.sample("z", dist.Normal(torch.zeros(len(index), Z_DIM), 1.0))
            mean = (z @ problem.weight.T + problem.bias).unsqueeze(-2)
            pyro.sample("x", dist.Normal(mean, SIGMA).to_event(1), obs=x.unsqueeze(-2))

    def guide(x: torch.Tensor, index: torch.Tensor, num_data: int) -> None:
        with pyro.plate("batch", num_data, subsample=index, dim=-2):
            with pyro.plate("latent", Z_DIM, dim=-1):
                pyro.sample("z", dist.Normal(loc[index], scale[index]))

    result = pyrovae.evaluate_dataset(model, guide, problem.x, num_samples=6, batch_size=8, plate_name="batch")
    torch.testing.assert_close(result.log_likelihood, problem.log_px, rtol=0, atol=1e-10)
    kl = kl_divergence(dist.Normal(loc, scale), dist.Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(result.kl, kl, rtol=1e-10, atol=1e-10)  # closed form here
    means = posterior_means(guide, problem.x[:5], torch.arange(5), NUM_DATA, plate_name="batch")
    torch.testing.assert_close(means["z"], loc[:5])
    assert result.active_units == {"z": int((loc.var(0) > 0.01).sum())}


def test_autodelta_is_refused_as_a_proposal() -> None:
    problem = LinearGaussianProblem()
    guide = AutoDelta(problem.model, create_plates=problem.create_plates)
    index = torch.arange(5)
    guide(problem.x[index], index, NUM_DATA)
    for run in (
        lambda: pyrovae.log_likelihood(problem.model, guide, problem.x[index], index, NUM_DATA, num_samples=3),
        lambda: pyrovae.evaluate_dataset(problem.model, guide, problem.x, num_samples=3),
        lambda: pyrovae.kl_to_prior(problem.model, guide, problem.x[index], index, NUM_DATA, num_samples=3),
    ):
        with pytest.raises(ValueError, match="point mass.*AutoNormal"):
            run()


def test_joint_autoguides_are_refused_with_the_fix() -> None:
    """AutoDiagonalNormal draws all points' latents as one vector outside the data plate: there
    is no per-data-point proposal."""
    problem = LinearGaussianProblem()
    guide = AutoDiagonalNormal(problem.model)
    index = torch.arange(NUM_DATA)
    guide(problem.x, index, NUM_DATA)
    with pytest.raises(ValueError, match="_AutoDiagonalNormal_latent.*jointly.*AutoNormal.*create_plates"):
        pyrovae.log_likelihood(problem.model, guide, problem.x, index, NUM_DATA, num_samples=3)


def test_an_autoguide_without_create_plates_is_refused() -> None:
    """Without create_plates AutoNormal's plate draws its own random subsample, which is not the
    model's ``index``: the weights would pair x_i with another point's q."""
    problem = LinearGaussianProblem()
    guide = AutoNormal(problem.model)
    index = torch.arange(5, 12)
    guide(problem.x[index], index, NUM_DATA)
    with pytest.raises(ValueError, match="create_plates"):
        pyrovae.log_likelihood(problem.model, guide, problem.x[index], index, NUM_DATA, num_samples=3)
