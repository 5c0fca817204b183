"""The Gaussian mixture (``pyrovae/models/mixture.py``) and its discrete-z guides
(``pyrovae/guides/categorical.py``), against exact answers. The three-ways study's own tests
(``experiments/studies/mixture.py``, ``experiments/gmm_three_ways.py``) are in
``experiments/tests/test_mixture_study.py``.

Every tolerance below is either a floating-point one (exact identities, checked in float64) or
five Monte Carlo standard errors.
"""

from __future__ import annotations

import itertools
import math

import pyro
import pytest
import torch
from pyro.infer import TraceEnum_ELBO
from torch import nn

from pyrovae.data import gaussian_mixture
from pyrovae.guides import CategoricalGuide, MixturePriorGuide
from pyrovae.infer.evaluate import importance_sampling
from pyrovae.infer.objectives import IWAE
from pyrovae.models import GaussianMixture

TRUTH = gaussian_mixture(10, 10).truth


def empty_guide(x=None, index=None, num_data=None):  # type: ignore[no-untyped-def]
    """No latent sites: with ``TraceEnum_ELBO`` the model's enumerated z is summed out exactly."""


def truth_model(dtype: torch.dtype = torch.float32, prefix: str = "truth") -> GaussianMixture:
    model = GaussianMixture(3, 2, init_locs=TRUTH["locs"].to(dtype), prefix=prefix)
    model.set_params(*(TRUTH[k].to(dtype) for k in ("weights", "locs", "covariance_matrices")))
    return model


def random_params(dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(3, 2, 2, generator=generator, dtype=dtype)
    return {
        "weights": torch.softmax(torch.randn(3, generator=generator, dtype=dtype), 0),
        "locs": 3 * torch.randn(3, 2, generator=generator, dtype=dtype),
        "covariance_matrices": a @ a.transpose(-1, -2) + 0.3 * torch.eye(2, dtype=dtype),
    }


def brute_force_log_px(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """log Σ_k w_k N(x; μ_k, Σ_k), independently of pyrovae: torch's MixtureSameFamily."""
    mixture = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=params["weights"]),
        torch.distributions.MultivariateNormal(params["locs"], covariance_matrix=params["covariance_matrices"]),
    )
    return mixture.log_prob(x)


class Logits(nn.Module):
    """An "encoder" returning fixed functions of x as logits (zero-variance and gradient checks)."""

    def __init__(self, fn) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


# The model


def test_model_sites_shapes_and_params():
    model = GaussianMixture(3, 2, prefix="m")
    z, x = model.sample(7)
    assert z.shape == (7,) and x.shape == (7, 2)
    assert set(pyro.get_param_store().keys()) == model.param_names == {"m.weights", "m.locs", "m.scale_tril"}
    trace = pyro.poutine.trace(model).get_trace(x)
    assert trace.nodes["z"]["infer"]["enumerate"] == "parallel"
    assert trace.nodes["x"]["is_observed"]
    assert torch.allclose(model.posterior(x).sum(-1), torch.ones(7))
    uniform = GaussianMixture(3, 2, learn_weights=False, prefix="u")
    assert torch.equal(uniform.weights(), torch.full((3,), 1 / 3))
    assert "u.weights" not in uniform.param_names


def test_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="init_locs"):
        GaussianMixture(3, 2, init_locs=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="dim=2"):
        GaussianMixture(3, 2)(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="learn_weights=True"):
        GaussianMixture(3, 2, learn_weights=False).set_params(weights=torch.ones(3) / 3)
    with pytest.raises(ValueError, match="weights"):
        MixturePriorGuide(object())
    with pytest.raises(ValueError, match="needs the data"):
        CategoricalGuide(nn.Linear(2, 3))(None, torch.arange(3))


def test_log_marginal_matches_brute_force():
    params = random_params()
    model = GaussianMixture(3, 2, init_locs=params["locs"])
    model.set_params(**params)
    x = 2 * torch.randn(50, 2, dtype=torch.float64)
    assert torch.allclose(model.log_marginal(x), brute_force_log_px(x, params), atol=1e-10)
    assert torch.allclose(model.covariance_matrices(), params["covariance_matrices"], atol=1e-12)


# (i) Enumeration is the brute-force sum, with and without subsampling


@pytest.mark.parametrize("subsample", [False, True])
def test_enumeration_equals_brute_force_sum(subsample):
    params = random_params()
    model = GaussianMixture(3, 2, init_locs=params["locs"])
    model.set_params(**params)
    num_data = 40
    x_all = 2 * torch.randn(num_data, 2, dtype=torch.float64)
    index = torch.tensor([3, 7, 8, 21, 30, 39]) if subsample else torch.arange(num_data)
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    loss = elbo.differentiable_loss(model, empty_guide, x_all[index], index, num_data)

    locs = params["locs"].clone().requires_grad_()
    expected = -(num_data / len(index)) * brute_force_log_px(x_all[index], {**params, "locs": locs}).sum()
    assert abs(loss.item() - expected.item()) < 1e-5
    # The gradients agree too: enumeration differentiates the exact log-likelihood.
    loss.backward()
    expected.backward()
    assert torch.allclose(pyro.param("mixture.locs").grad, locs.grad, atol=1e-8)


def test_guide_equal_to_exact_posterior_gives_zero_variance_iwae():
    """With q(z|x) = p(z|x) every importance weight is p(x): IWAE = log p(x) for every draw."""
    model = truth_model(torch.float64)
    guide = CategoricalGuide(Logits(lambda x: model.log_joint(x).detach()))
    x = 3 * torch.randn(20, 2, dtype=torch.float64)
    for _ in range(3):
        loss = IWAE(num_particles=4).loss(model, guide, x)
        assert abs(loss + model.log_marginal(x).sum().item()) < 1e-6


def test_prior_guide_iwae_is_log_mean_likelihood():
    """With the prior guide the weights are p(x|z_k): the prior terms cancel exactly."""
    model = truth_model(torch.float64)
    x = 3 * torch.randn(5, 2, dtype=torch.float64)
    log_w = IWAE(num_particles=6).log_weights(model, MixturePriorGuide(model), (x,), {}).log_w
    assert log_w.shape == (6, 5)
    # log w[k, b] must be one of the three log N(x_b; μ_z, Σ_z).
    log_lik = model.components().log_prob(x.unsqueeze(-2))  # (5, 3)
    distance = (log_w.unsqueeze(-1) - log_lik.unsqueeze(0)).abs().min(-1).values
    assert distance.max() < 1e-10


# (ii) The importance-sampling estimates of p(x) are unbiased


@pytest.mark.parametrize("proposal", ["prior", "guide"])
def test_importance_sampling_estimate_of_px_is_unbiased(proposal):
    """E[p̂(x)] = p(x) for p̂ = (1/K) Σ_k w_k, z_k ~ q: the mean of exp(log p̂) over independent
    replicates matches the exact p(x) (by enumeration) within 5 standard errors."""
    model = truth_model()
    if proposal == "prior":
        guide = MixturePriorGuide(model)
    else:
        torch.manual_seed(3)
        guide = CategoricalGuide(nn.Linear(2, 3))  # an untrained, poor q(z|x)
    # Near each component, between two, and far out.
    points = torch.tensor([[-4.0, 0.0], [4.0, 0.0], [0.0, 5.0], [-2.0, 2.5], [0.0, -3.0]])
    replicates, k = 4000, 3
    x = points.repeat(replicates, 1)
    log_px_hat = importance_sampling(model, guide, x, num_samples=k, max_plate_nesting=1).log_likelihood
    ratio = torch.exp(log_px_hat.double() - model.log_marginal(x).double()).reshape(replicates, len(points))
    mean, se = ratio.mean(0), ratio.std(0) / math.sqrt(replicates)
    assert (se > 0).all()
    z = (mean - 1) / se
    assert z.abs().max() < 5, f"mean p̂/p = {mean.tolist()}, SE = {se.tolist()}"


# (iii) VIMCO gives the guide network nonzero, unbiased gradients


def exact_expected_iwae(logits: torch.Tensor, log_joint: torch.Tensor, k: int) -> torch.Tensor:
    """E_{z_1..z_K ~ q}[log (1/K) Σ_k p(x, z_k) / q(z_k)] by enumerating all 3^K configurations."""
    log_q = torch.log_softmax(logits, -1)
    total = torch.zeros((), dtype=logits.dtype)
    for config in itertools.product(range(logits.shape[-1]), repeat=k):
        config = torch.tensor(config)
        log_w = log_joint[config] - log_q[config]
        total = total + log_q[config].sum().exp() * (torch.logsumexp(log_w, 0) - math.log(k))
    return total


def test_vimco_gradient_of_categorical_guide_is_unbiased():
    """The per-point gradient of pyrovae's IWAE with respect to the guide's logits, averaged over
    independent replicates, equals the exact gradient of E[IWAE_K] (all 3^K particle configurations
    enumerated, differentiated by autograd) within 5 standard errors; the network gets it."""
    model = truth_model()
    encoder = nn.Linear(2, 3)
    with torch.no_grad():
        encoder.weight.copy_(torch.tensor([[0.3, -0.2], [-0.1, 0.4], [0.2, 0.1]]))
        encoder.bias.copy_(torch.tensor([0.5, -0.5, 0.0]))
    captured = {}

    def keep_logits(module, inputs, output):  # type: ignore[no-untyped-def]
        output.retain_grad()
        captured["logits"] = output

    encoder.register_forward_hook(keep_logits)
    guide = CategoricalGuide(encoder)
    # Between A and C (a mixed posterior) and near B (q is far from p(z|x) there).
    points = torch.tensor([[-2.0, 2.5], [3.0, 0.5]])
    replicates, k = 20000, 3
    x = points.repeat(replicates, 1)
    loss = IWAE(num_particles=k, max_plate_nesting=1).differentiable_loss(model, guide, x)
    loss.backward()
    grads = -captured["logits"].grad.double().reshape(replicates, len(points), 3)
    assert encoder.weight.grad.abs().sum() > 0

    for i, point in enumerate(points):
        logits = encoder(point.unsqueeze(0))[0].detach().double().requires_grad_()
        log_joint = model.log_joint(point.unsqueeze(0))[0].detach().double()
        (exact,) = torch.autograd.grad(exact_expected_iwae(logits, log_joint, k), logits)
        mean, se = grads[:, i].mean(0), grads[:, i].std(0) / math.sqrt(replicates)
        assert exact.abs().max() > 10 * se.max(), "the check would be vacuous: exact gradient ~ 0"
        z = (mean - exact) / se
        assert z.abs().max() < 5, f"point {i}: VIMCO {mean.tolist()} vs exact {exact.tolist()} (SE {se.tolist()})"
