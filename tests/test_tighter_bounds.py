"""MIWAE, PIWAE and CIWAE (Rainforth et al. 2018) against exact answers on the linear-Gaussian model.

- identities from the same (seeded) draws: MIWAE(1, K) = IWAE_K, MIWAE(M, 1) = the M-particle
  ELBO, CIWAE(1) = ELBO, CIWAE(0) = IWAE_K, in value and gradient, to float rounding;
- each loss = a hand computation from the per-point log-weights of its own draws, under
  subsampling (N ≠ B) and with a KL weight β ≠ 1;
- PIWAE's decoder gradient = IWAE_{MK}'s and its encoder gradient = MIWAE(M, K)'s, same draws;
- gradients unbiased against closed forms (the K = 1 ELBO gradient of a diagonal guide; ∇θ log p(x)
  at the exact posterior for K > 1), and score-function gradients against pathwise ones, within
  5 Monte Carlo standard errors from independent replicates;
- the registry, the config and the command line; ``fit`` and ``pyrovae train`` end to end.

Everything runs in float64.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from pyrovae import fit
from pyrovae.app import cli
from pyrovae.app.config import ConfigError, TrainConfig, objective_options
from pyrovae.guides import AmortizedGuide, PerDatapointGuide
from pyrovae.infer.objectives import CIWAE, MIWAE, PIWAE, make_objective
from pyrovae.models import LinearGaussian
from pyrovae.nets import GaussianEncoder
from pyrovae.train import bound_name

X_DIM, Z_DIM, SIGMA = 4, 2, 0.5
Z_MAX = 5.0  # stochastic checks: |estimate - truth| < 5 standard errors
ROUNDING = 1e-10


#: Every test here in float64 (the root conftest's fixture).
pytestmark = pytest.mark.usefixtures("float64")


# --------------------------------------------------------------------------------------------
# helpers


def linear_model(num_points: int, beta: float = 1.0, seed: int = 1) -> tuple[LinearGaussian, torch.Tensor]:
    """``LinearGaussian.random``'s model and data, rebuilt with KL weight ``beta``."""
    base, x = LinearGaussian.random(Z_DIM, X_DIM, num_points, noise_scale=SIGMA, seed=seed)
    weight, bias = base.decoder.weight.detach(), base.decoder.bias.detach()
    return LinearGaussian(X_DIM, Z_DIM, SIGMA, weight=weight, bias=bias, beta=beta), x


def misfit(model: LinearGaussian, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A diagonal q_n shifted by 0.8 posterior standard deviations and 1.4 times too wide."""
    with torch.no_grad():
        posterior = model.posterior(x)
    std = posterior.covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt()
    return posterior.loc + 0.8 * std * torch.tensor([1.0, -1.0]), 1.4 * std


def set_local_params(loc: torch.Tensor, scale: torch.Tensor) -> None:
    pyro.param("local.z_loc", loc.clone())
    pyro.param("local.z_scale", scale.clone(), constraint=constraints.positive)


def log_weights_by_hand(model: LinearGaussian, z: torch.Tensor, x: torch.Tensor, loc: torch.Tensor,
                        scale: torch.Tensor, beta: float) -> torch.Tensor:
    """log w = log p(x|z) + β (log N(z; 0, I) - log q(z|x)), shape ``z.shape[:-1]``."""
    weight, bias = model.decoder.weight.detach(), model.decoder.bias.detach()
    log_lik = dist.Normal(z @ weight.T + bias, SIGMA).to_event(1).log_prob(x)
    log_prior = dist.Normal(torch.zeros_like(z), 1.0).to_event(1).log_prob(z)
    return log_lik + beta * (log_prior - dist.Normal(loc, scale).to_event(1).log_prob(z))


def lme(t: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.logsumexp(t, dim) - math.log(t.shape[dim])


class Recorder:
    """Wraps a guide and keeps the z of its last call (the objective's own draws)."""

    def __init__(self, guide: Callable) -> None:
        self.guide, self.z = guide, None

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        z = self.guide(*args, **kwargs)
        self.z = z.detach()
        return z


def amortized_setup(num_data: int = 12, batch: int = 5, reparameterized: bool = True):
    """A learnable linear decoder, an MLP encoder, a subsampled batch (N/B = 12/5)."""
    model, x = linear_model(num_data, beta=1.5)
    guide = AmortizedGuide(GaussianEncoder(X_DIM, Z_DIM, (8,)), beta=1.5, reparameterized=reparameterized)
    index = torch.tensor([7, 2, 11, 0, 5])[:batch]
    args = (x[index], index, num_data)
    guide(*args)
    model(*args)  # create every param
    return model, guide, args


def loss_and_grads(objective: Any, model: Callable, guide: Callable, args: tuple, seed: int):
    """The differentiable loss and its gradient for every param (by name), from seed ``seed``."""
    named = dict(pyro.get_param_store().named_parameters())
    pyro.set_rng_seed(seed)
    loss = objective.differentiable_loss(model, guide, *args)
    grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    return loss.detach(), {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named.items(), grads)}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str = "") -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a if n.startswith(prefix))


# --------------------------------------------------------------------------------------------
# 1. limits, from the same draws


@pytest.mark.parametrize(
    "tighter, reference",
    [
        ((lambda: make_objective("miwae", 5, num_groups=1)), (lambda: make_objective("iwae", 5))),
        ((lambda: make_objective("miwae", 1, num_groups=4)), (lambda: make_objective("elbo", 4))),
        ((lambda: make_objective("ciwae", 5, ciwae_beta=1.0)), (lambda: make_objective("elbo", 5))),
        ((lambda: make_objective("ciwae", 5, ciwae_beta=0.0)), (lambda: make_objective("iwae", 5))),
        ((lambda: make_objective("piwae", 5, num_groups=1)), (lambda: make_objective("iwae", 5))),
    ],
    ids=["miwae(1,K)=iwae", "miwae(M,1)=elbo", "ciwae(1)=elbo", "ciwae(0)=iwae", "piwae(1,K)=iwae"],
)
def test_limits_from_the_same_draws(tighter: Callable, reference: Callable) -> None:
    """Value and every gradient (encoder and decoder) equal to float rounding; the reference for
    the ELBO is Pyro's Trace_ELBO (make_objective("elbo")), not pyrovae's per-point code."""
    model, guide, args = amortized_setup()
    loss, grads = loss_and_grads(tighter(), model, guide, args, seed=3)
    ref_loss, ref_grads = loss_and_grads(reference(), model, guide, args, seed=3)
    assert abs(loss - ref_loss).item() < ROUNDING * abs(ref_loss).item()
    assert max_difference(grads, ref_grads) < ROUNDING
    assert max(g.abs().max().item() for g in ref_grads.values()) > 1.0  # not vacuous
    # a different seed gives different draws: the equality is per draw, not by accident
    other_loss, _ = loss_and_grads(reference(), model, guide, args, seed=4)
    assert abs(other_loss - ref_loss).item() > 1e-3


# --------------------------------------------------------------------------------------------
# 2. hand computations from the same draws, N != B, KL weight β = 2


@pytest.mark.parametrize("name", ["miwae", "piwae", "ciwae"])
def test_loss_is_the_hand_computation_from_its_draws(name: str) -> None:
    num_groups, k, beta, num_data = 3, 4, 2.0, 12
    model, x = linear_model(num_data, beta=beta)
    loc, scale = misfit(model, x)
    set_local_params(loc, scale)
    guide = Recorder(PerDatapointGuide(num_data, Z_DIM, beta=beta))
    index = torch.tensor([9, 4, 0, 6, 3])
    args, s = (x[index], index, num_data), num_data / len(index)
    kwargs = dict(ciwae_beta=0.3) if name == "ciwae" else dict(num_groups=num_groups)
    objective = make_objective(name, k, **kwargs)

    def by_hand() -> float:
        z = guide.z
        draws = k if name == "ciwae" else num_groups * k
        assert z.shape == (draws, len(index), Z_DIM)
        log_w = log_weights_by_hand(model, z, x[index], loc[index], scale[index], beta)
        if name == "miwae":
            per_point = lme(log_w.reshape(num_groups, k, -1), 1).mean(0)
        elif name == "piwae":
            per_point = lme(log_w, 0)
        else:
            per_point = 0.3 * log_w.mean(0) + 0.7 * lme(log_w, 0)
        return -s * per_point.sum().item()

    for _ in range(2):
        loss = objective.differentiable_loss(model, guide, *args).item()
        assert loss == pytest.approx(by_hand(), rel=ROUNDING)
        loss = objective.loss(model, guide, *args)
        assert loss == pytest.approx(by_hand(), rel=ROUNDING)
    # the draws matter: the same formula with N/B inside the log-sum-exp is far off
    z = guide.z
    log_w = log_weights_by_hand(model, z, x[index], loc[index], scale[index], beta)
    assert abs(-lme(s * log_w, 0).sum().item() - loss) > 1.0


# --------------------------------------------------------------------------------------------
# 3. PIWAE's routing


@pytest.mark.parametrize("reparameterized", [True, False], ids=["pathwise", "score-function"])
def test_piwae_decoder_gets_iwae_mk_and_encoder_gets_miwae(reparameterized: bool) -> None:
    """From the same M·K = 12 draws: PIWAE's decoder gradient = IWAE_12's, its encoder gradient =
    MIWAE(3, 4)'s, its value = IWAE_12's; the two references differ on both, so neither identity
    holds by accident."""
    model, guide, args = amortized_setup(reparameterized=reparameterized)
    loss, piwae = loss_and_grads(make_objective("piwae", 4, num_groups=3), model, guide, args, seed=5)
    iwae_loss, iwae = loss_and_grads(make_objective("iwae", 12), model, guide, args, seed=5)
    _, miwae = loss_and_grads(make_objective("miwae", 4, num_groups=3), model, guide, args, seed=5)
    assert abs(loss - iwae_loss).item() < ROUNDING * abs(iwae_loss).item()
    assert max_difference(piwae, iwae, "decoder") < ROUNDING
    assert max_difference(piwae, miwae, "encoder") < ROUNDING
    assert max_difference(iwae, miwae, "decoder") > 1e-3
    assert max_difference(iwae, miwae, "encoder") > 1e-3


# --------------------------------------------------------------------------------------------
# 4. unbiased against closed forms


def closed_form_elbo(model: LinearGaussian, x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
                     beta: float) -> torch.Tensor:
    """Σ_b E_q log p(x_b|z) - β KL(q_b ‖ N(0, I)), q_b = N(loc_b, diag scale_b²), differentiable in
    loc, scale and the decoder's W and b."""
    weight, bias = model.decoder.weight, model.decoder.bias
    resid = x - loc @ weight.T - bias
    sq = (resid**2).sum(-1) + (scale**2 * (weight**2).sum(0)).sum(-1)
    log_lik = -0.5 * sq / SIGMA**2 - 0.5 * X_DIM * math.log(2 * math.pi * SIGMA**2)
    kl = 0.5 * (scale**2 + loc**2 - 1 - 2 * scale.log()).sum(-1)
    return (log_lik - beta * kl).sum()


@pytest.mark.parametrize("name", ["miwae", "piwae", "ciwae"])
def test_one_particle_gradients_are_the_closed_form_elbo_gradient(name: str) -> None:
    """MIWAE(3, 1) and CIWAE(0.4, K=1) are the ELBO, and PIWAE(3, 1)'s encoder trains on it: their
    mean per-point gradient wrt (loc, log scale) of a mis-fit diagonal guide equals the closed-form
    ELBO gradient (KL weight 2, N/B = 2) within 5 SE over R = 2000 replicate rows; for MIWAE and
    CIWAE also the decoder's (W, b) gradient, over 24 independent calls."""
    beta, copies, points = 2.0, 1000, 2
    model, x_points = linear_model(points, beta=beta)
    loc_p, scale_p = misfit(model, x_points)
    rows = copies * points
    num_data = 2 * rows
    set_local_params(loc_p.repeat(2 * copies, 1), scale_p.repeat(2 * copies, 1))
    guide = PerDatapointGuide(num_data, Z_DIM, beta=beta)
    x, index = x_points.repeat(copies, 1), torch.arange(rows)
    objective = make_objective(name, 1, **({"ciwae_beta": 0.4} if name == "ciwae" else {"num_groups": 3}))
    guide(x, index, num_data)
    model(x, index, num_data)
    named = dict(pyro.get_param_store().named_parameters())
    local = [named["local.z_loc"], named["local.z_scale"]]  # the latter is log scale (unconstrained)
    decoder = [named["decoder$$$weight"], named["decoder$$$bias"]]

    loss = objective.differentiable_loss(model, guide, x, index, num_data)
    grads = torch.stack(torch.autograd.grad(loss, local))[:, :rows].reshape(2, copies, points, Z_DIM)
    mean, se = grads.mean(1), grads.std(1) / math.sqrt(copies)

    log_scale = scale_p.log().requires_grad_()
    loc = loc_p.clone().requires_grad_()
    elbo = closed_form_elbo(model, x_points, loc, log_scale.exp(), beta)
    exact = -(num_data / rows) * torch.stack(torch.autograd.grad(elbo, [loc, log_scale]))
    z = (mean - exact) / se
    assert z.abs().max() < Z_MAX, z
    assert (exact.abs() / se).max() > 4 * Z_MAX  # a missing 1/M or N/B would fail

    if name == "piwae":
        return
    calls = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        objective.differentiable_loss(model, guide, x, index, num_data), decoder)]) for _ in range(24)]
    calls = torch.stack(calls)
    elbo = closed_form_elbo(model, x, loc_p.repeat(copies, 1), scale_p.repeat(copies, 1), beta)
    exact = -(num_data / rows) * torch.cat([g.reshape(-1) for g in torch.autograd.grad(elbo, decoder)])
    z = (calls.mean(0) - exact) / (calls.std(0) / math.sqrt(len(calls)))
    assert z.abs().max() < Z_MAX, z


def orthogonal_model(num_points: int) -> tuple[LinearGaussian, torch.Tensor]:
    """A linear-Gaussian model with WᵀW diagonal, so p(z|x) is a diagonal Gaussian."""
    generator = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(X_DIM, Z_DIM, generator=generator))
    weight = q * torch.tensor([2.0, 1.2])
    bias = torch.randn(X_DIM, generator=generator)
    x = torch.randn(num_points, Z_DIM, generator=generator) @ weight.T + bias
    x = x + SIGMA * torch.randn(num_points, X_DIM, generator=generator)
    return LinearGaussian(X_DIM, Z_DIM, SIGMA, weight=weight, bias=bias), x


@pytest.mark.parametrize(
    "name, k, kwargs",
    [("miwae", 3, dict(num_groups=2)), ("piwae", 3, dict(num_groups=2)), ("ciwae", 4, dict(ciwae_beta=0.5))],
)
def test_decoder_gradient_at_the_exact_posterior_is_the_marginal_likelihood_gradient(name, k, kwargs) -> None:
    """With q = p(z|x) every weight is p(x), so each bound's decoder gradient is (1/K) Σ_k
    ∇θ log p(x, z_k), whose mean is ∇θ log p(x) (Fisher's identity), for K > 1: within 5 SE over 40
    independent calls, N/B = 3."""
    num_data, batch = 60, 20
    model, x = orthogonal_model(num_data)
    with torch.no_grad():
        posterior = model.posterior(x)
    set_local_params(posterior.loc, posterior.covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt())
    guide = PerDatapointGuide(num_data, Z_DIM)
    index = torch.arange(0, num_data, 3)
    assert len(index) == batch
    args = (x[index], index, num_data)
    guide(*args)
    model(*args)
    named = dict(pyro.get_param_store().named_parameters())
    decoder = [named["decoder$$$weight"], named["decoder$$$bias"]]
    objective = make_objective(name, k, **kwargs)
    with torch.no_grad():  # the identity holds only if q is exactly the posterior
        torch.testing.assert_close(objective.loss(model, guide, *args),
                                   -(num_data / batch) * model.log_marginal(x[index]).sum().item())
    calls = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        objective.differentiable_loss(model, guide, *args), decoder)]) for _ in range(40)])
    exact = -(num_data / batch) * torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        model.log_marginal(x[index]).sum(), decoder)])
    se = calls.std(0) / math.sqrt(len(calls))
    z = (calls.mean(0) - exact) / se
    assert z.abs().max() < Z_MAX, z
    assert (exact.abs() / se).max() > 2 * Z_MAX  # a missing N/B = 3 would be off by > 2/3 of it


def replicated_local_gradients(objective: Any, reparameterized: bool, copies: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and SE over R copies of 2 points (N = 2 R·2, B = R·2) of the per-row gradient wrt
    (loc, log scale) of a mis-fit per-datapoint guide."""
    pyro.clear_param_store()
    model, x_points = linear_model(2)
    loc, scale = misfit(model, x_points)
    rows = 2 * copies
    set_local_params(loc.repeat(2 * copies, 1), scale.repeat(2 * copies, 1))
    guide = PerDatapointGuide(2 * rows, Z_DIM, reparameterized=reparameterized)
    loss = objective.differentiable_loss(model, guide, x_points.repeat(copies, 1), torch.arange(rows), 2 * rows)
    named = dict(pyro.get_param_store().named_parameters())
    grads = torch.stack(torch.autograd.grad(loss, [named["local.z_loc"], named["local.z_scale"]]))
    assert torch.all(grads[:, rows:] == 0)
    grads = grads[:, :rows].reshape(2, copies, 2, Z_DIM)
    return grads.mean(1), grads.std(1) / math.sqrt(copies)


@pytest.mark.parametrize(
    "name, k, kwargs",
    [("miwae", 3, dict(num_groups=2)), ("piwae", 3, dict(num_groups=2)), ("ciwae", 3, dict(ciwae_beta=0.5))],
)
def test_score_function_gradients_are_unbiased(name: str, k: int, kwargs: dict) -> None:
    """A non-reparameterized guide (VIMCO within each group of K; CIWAE's ELBO part with a
    leave-one-out baseline) has the mean encoder gradient of the reparameterized one, per
    coordinate within 5 combined SEs over R = 3000 replicate rows."""
    objective = make_objective(name, k, **kwargs)
    score, score_se = replicated_local_gradients(objective, False, 3000)
    path, path_se = replicated_local_gradients(objective, True, 3000)
    z = (score - path) / torch.sqrt(score_se**2 + path_se**2)
    assert z.abs().max() < Z_MAX, z
    assert (path.abs() / path_se).max() > 2 * Z_MAX


# --------------------------------------------------------------------------------------------
# 5. registry, config, command line, fit


def test_registry_and_config_refuse_what_does_not_apply() -> None:
    assert isinstance(make_objective("miwae", 2, num_groups=3), MIWAE)
    assert isinstance(make_objective("piwae", 2, num_groups=3), PIWAE)
    assert isinstance(make_objective("ciwae", 2, ciwae_beta=0.2), CIWAE)
    assert make_objective("miwae", 2, num_groups=3).num_draws == 6
    assert bound_name(make_objective("miwae", 2, num_groups=3)) == "MIWAE (M=3, K=2)"
    for name, kwargs, message in [
        ("iwae", dict(num_groups=2), "'num_groups' (it is a parameter of 'miwae', 'piwae')"),
        ("elbo", dict(ciwae_beta=0.5), "'ciwae_beta' (it is a parameter of 'ciwae')"),
        ("ciwae", dict(num_groups=2), "'num_groups'"),
        ("miwae", dict(ciwae_beta=0.5), "'ciwae_beta'"),
        ("iwae-dreg", dict(estimator="standard"), "'estimator' (it is a parameter of 'iwae')"),
        ("miwae", dict(num_groups=0), "num_groups must be an integer >= 1, got 0"),
        ("ciwae", dict(ciwae_beta=1.5), "ciwae_beta must be a number in [0, 1], got 1.5"),
    ]:
        with pytest.raises(ValueError) as info:
            make_objective(name, 2, **kwargs)
        assert message in str(info.value), info.value

    for options, message, params in [
        (dict(objective="iwae", num_groups=3), "num_groups=3 is an option of objective 'miwae' or 'piwae'; "
         "objective='iwae' has none", ("num_groups", "objective")),
        (dict(objective="miwae", ciwae_beta=0.1), "ciwae_beta=0.1 is an option of objective 'ciwae'",
         ("ciwae_beta", "objective")),
        (dict(objective="ciwae", ciwae_beta=-0.5), "ciwae_beta must be in [0, 1], got -0.5", ("ciwae_beta",)),
        (dict(objective="miwae", num_groups=0), "num_groups must be an integer >= 1, got 0", ("num_groups",)),
    ]:
        with pytest.raises(ConfigError) as info:
            TrainConfig(**options)
        assert message in str(info.value) and info.value.params == params, info.value
        assert "--" not in str(info.value)
    said = cli.flag_message(_config_error(dict(objective="iwae", num_groups=3)))
    assert "--num-groups 3" in said and "--objective miwae" in said, said

    config = cli.config_from_args(cli.build_parser().parse_args(
        ["train", "--out", "o", "--objective", "piwae", "--num-groups", "3", "--num-particles", "2"]))
    assert (config.objective, config.num_groups, config.num_particles) == ("piwae", 3, 2)
    assert objective_options(config) == {"num_groups": 3}
    assert objective_options(TrainConfig(objective="ciwae", ciwae_beta=0.25)) == {"ciwae_beta": 0.25}
    assert objective_options(TrainConfig(objective="iwae")) == {}
    assert TrainConfig.from_dict(config.to_dict()) == config


def _config_error(options: dict) -> ConfigError:
    try:
        TrainConfig(**options)
    except ConfigError as error:
        return error
    raise AssertionError(options)


@pytest.mark.parametrize("name, guide_kind", [("piwae", "per-datapoint"), ("miwae", "amortized"),
                                              ("ciwae", "amortized")])
def test_fit_trains_with_each_bound(name: str, guide_kind: str) -> None:
    """A few epochs of pyrovae.fit raise the objective's own training bound."""
    model, x = linear_model(200)
    model = LinearGaussian(X_DIM, Z_DIM, SIGMA)  # decoder from nn.Linear's init: something to learn
    if guide_kind == "per-datapoint":
        guide: Any = PerDatapointGuide(200, Z_DIM)
    else:
        guide = AmortizedGuide(GaussianEncoder(X_DIM, Z_DIM, (16,)))
    objective = make_objective(name, 2, **({"ciwae_beta": 0.5} if name == "ciwae" else {"num_groups": 2}))
    history = fit(model, guide, x, objective, epochs=4, batch_size=50, lr=3e-2, progress=False)
    assert history.bound_name == bound_name(objective) and history.bound_name.startswith(name.upper())
    assert all(math.isfinite(v) for v in history.train_bound)
    assert history.train_bound[-1] > history.train_bound[0] + 1.0, history.train_bound


def test_pyrovae_train_linear_with_miwae(tmp_path) -> None:
    out = tmp_path / "miwae"
    assert cli.main(["train", "--dataset", "linear", "--objective", "miwae", "--num-groups", "2",
                     "--num-particles", "3", "--epochs", "1", "--batch-size", "200", "--lr", "0.01",
                     "--num-train", "400", "--num-test", "100", "--eval-samples", "50",
                     "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["bound_name"] == "MIWAE (M=2, K=3)"
    assert metrics["config"]["objective"] == "miwae" and metrics["config"]["num_groups"] == 2
    assert metrics["test_log_likelihood"] <= metrics["test_log_likelihood_exact"] + 0.05
