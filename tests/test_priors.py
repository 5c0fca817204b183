"""Learned priors p(z) (pyrovae.models.priors) against exact answers: the VampPrior's, the mixture's and
the flow's log-densities computed by hand; N(0, I)-equivalent priors giving the plain VAE's numbers on
the same draws; the closed-form marginal of a linear decoder under a mixture prior; the VampPrior's
encoder held once in the param store and trained by both the model's and the guide's gradient; and
the priors through the analytic-KL objective, fit/resume, load_run and the command line."""

from __future__ import annotations

import copy
import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from pyrovae import params
from pyrovae.app.cli import main
from pyrovae.app.config import ConfigError, TrainConfig
from pyrovae.data import gaussian_mixture
from pyrovae.guides import AmortizedGuide
from pyrovae.handlers import data_plate
from pyrovae.infer.evaluate import evaluate_dataset, importance_sampling, kl_to_prior, log_likelihood
from pyrovae.infer.objectives import make_objective
from pyrovae.models import VAE
from pyrovae.models.priors import DiagonalMixture, FlowPrior, MixturePrior, VampPrior, diagonal_mixture
from pyrovae.nets import Decoder, GaussianEncoder
from pyrovae.train import fit

LOG_2PI = math.log(2 * math.pi)


def _diag_normal_log_density(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log N(z; loc, diag scale²) summed over the last dim, written out (float64)."""
    z, loc, scale = z.double(), loc.double(), scale.double()
    return (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * LOG_2PI).sum(-1)


# --------------------------------------------------------------------------------------------
# log-densities by hand


def test_vamp_log_density_is_the_mean_of_the_encoders_gaussians_at_the_pseudo_inputs():
    x_dim, z_dim, k = 6, 3, 5
    encoder = GaussianEncoder(x_dim, z_dim, (8,))
    init = torch.rand(k, x_dim) * 1.6 - 0.3  # some entries outside [0, 1]: the hard tanh clamps them
    prior = VampPrior(encoder, x_dim, k, init=init)
    z = 1.5 * torch.randn(7, 4, z_dim)
    got = prior(4, "cpu").log_prob(z)
    assert got.shape == (7, 4)
    expected = torch.empty(7, 4, dtype=torch.float64)
    with torch.no_grad():
        for s in range(7):
            for b in range(4):
                densities = []
                for j in range(k):
                    u = init[j].clamp(0.0, 1.0)
                    loc, scale = encoder(u)
                    densities.append(_diag_normal_log_density(z[s, b], loc, scale).exp())
                expected[s, b] = torch.stack(densities).mean().log()
    assert torch.allclose(got.double(), expected, atol=1e-5, rtol=1e-5)
    # unbounded pseudo-inputs (real-valued data) are used as they are
    free = VampPrior(encoder, x_dim, k, init=init, bounds=None)
    loc, scale = encoder(init)
    by_hand = torch.logsumexp(_diag_normal_log_density(z.unsqueeze(-2), loc, scale), -1) - math.log(k)
    assert torch.allclose(free(4, "cpu").log_prob(z).double(), by_hand, atol=1e-5)


def test_mixture_log_density_is_the_weighted_sum_of_its_gaussians():
    z_dim, k = 3, 4
    loc = torch.randn(k, z_dim)
    scale = torch.rand(k, z_dim) + 0.3
    logits = torch.randn(k)
    prior = MixturePrior(z_dim, k, loc=loc, scale=scale, logits=logits)
    z = 2 * torch.randn(5, 6, z_dim)
    got = prior(6, "cpu").log_prob(z)
    weights = torch.exp(logits.double()) / torch.exp(logits.double()).sum()
    expected = torch.empty(5, 6, dtype=torch.float64)
    for s in range(5):
        for b in range(6):
            total = sum(weights[j] * _diag_normal_log_density(z[s, b], loc[j], scale[j]).exp() for j in range(k))
            expected[s, b] = torch.log(total)
    assert torch.allclose(got.double(), expected, atol=1e-5, rtol=1e-5)
    # the model samples z from it: one narrow component far from 0
    far = MixturePrior(z_dim, 1, loc=torch.full((1, z_dim), 5.0), scale=0.1)
    model = VAE(Decoder(z_dim, 4, (8,)), z_dim, prior=far)
    z_drawn, _, _ = model.sample(500)
    assert torch.allclose(z_drawn.mean(0), torch.full((z_dim,), 5.0), atol=0.03)
    assert torch.allclose(z_drawn.std(0), torch.full((z_dim,), 0.1), atol=0.02)


def test_the_matrix_product_mixture_density_is_pyros_mixture_same_family():
    loc, scale, logits = torch.randn(7, 3), torch.rand(7, 3) + 0.2, torch.randn(7)
    loc.requires_grad_(True)
    ours = diagonal_mixture(loc, scale, logits).expand([4])
    pyros = dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1)).expand([4])
    z = torch.randn(5, 4, 3)
    z[0, 0] = loc[0].detach() + 1e-3  # next to a component: the expansion's cancellation is worst here
    z[0, 1] = 8.0  # far from every component
    for fn in (ours, ours.expand([5, 4])):
        assert isinstance(fn, DiagonalMixture)
        assert torch.allclose(fn.log_prob(z), pyros.log_prob(z), atol=1e-6)
    grad_ours, = torch.autograd.grad(ours.log_prob(z).sum(), loc)
    grad_pyros, = torch.autograd.grad(pyros.log_prob(z).sum(), loc)
    assert torch.allclose(grad_ours, grad_pyros, atol=1e-6)
    assert ours.log_prob(z[0, 0]).shape == (4,)


@pytest.mark.parametrize("kind", ["affine", "spline"])
def test_flow_log_density_is_the_change_of_variables_with_an_autograd_jacobian(kind):
    z_dim = 3
    prior = FlowPrior(z_dim, num_layers=2, kind=kind)
    with torch.no_grad():  # a flow far from the identity
        for p in prior.layers.parameters():
            p.mul_(1.5)
    z = 1.2 * torch.randn(6, z_dim)
    got = prior(6, "cpu").log_prob(z).detach()
    for b in range(6):
        eps = prior.flow(z[b])
        jacobian = torch.autograd.functional.jacobian(prior.flow, z[b])
        log_det = torch.linalg.slogdet(jacobian.double())[1]
        expected = _diag_normal_log_density(eps, torch.zeros(z_dim), torch.ones(z_dim)) + log_det
        expected = float(expected.detach())
        assert abs(float(got[b]) - expected) < 1e-4 + 1e-6 * abs(expected), (b, float(got[b]), expected)
    # its draws are h⁻¹(ε): h maps them back to N(0, I)
    with torch.no_grad():
        drawn = prior(4000, "cpu").sample()
        eps = prior.flow(drawn)
    assert eps.mean(0).abs().max() < 0.08 and (eps.std(0) - 1).abs().max() < 0.08


# --------------------------------------------------------------------------------------------
# N(0, I)-equivalent priors are the plain VAE


def _normal_equivalent(kind: str, z_dim: int):
    if kind == "mog":  # every component N(0, I), unequal weights
        return MixturePrior(z_dim, 3, loc=torch.zeros(3, z_dim), scale=1.0, logits=torch.tensor([0.3, -1.0, 2.0]))
    return FlowPrior(z_dim, num_layers=2, identity_init=True)


@pytest.mark.parametrize("kind", ["mog", "flow"])
def test_a_prior_at_standard_normal_parameters_gives_the_plain_vae_numbers(kind):
    x_dim, z_dim, n = 5, 2, 8
    decoder, encoder = Decoder(z_dim, x_dim, (8,)), GaussianEncoder(x_dim, z_dim, (8,))
    plain = VAE(decoder, z_dim)
    learned = VAE(decoder, z_dim, prior=_normal_equivalent(kind, z_dim))
    guide = AmortizedGuide(encoder)
    x = torch.bernoulli(torch.rand(n, x_dim))
    args = (x, torch.arange(n), n)

    def run(model, fn):
        pyro.set_rng_seed(5)
        return fn(model)

    for objective in ("elbo", "iwae"):
        elbo = make_objective(objective, num_particles=4)
        a = run(plain, lambda m: elbo.loss(m, guide, *args))
        b = run(learned, lambda m: elbo.loss(m, guide, *args))
        assert b == pytest.approx(a, rel=1e-6, abs=1e-5), objective
    est_plain = run(plain, lambda m: importance_sampling(m, guide, *args, num_samples=200, chunk_size=50))
    est_learned = run(learned, lambda m: importance_sampling(m, guide, *args, num_samples=200, chunk_size=50))
    assert torch.allclose(est_learned.log_likelihood, est_plain.log_likelihood, atol=1e-5)
    assert torch.allclose(est_learned.elbo, est_plain.elbo, atol=1e-5)
    # the MC KL of the learned prior estimates the closed-form KL of the plain one
    kl_plain = run(plain, lambda m: kl_to_prior(m, guide, *args))
    kl_learned = run(learned, lambda m: kl_to_prior(m, guide, *args, num_samples=4000))
    assert torch.allclose(kl_learned, kl_plain, atol=0.05)


# --------------------------------------------------------------------------------------------
# a linear decoder under a mixture prior: the marginal is a mixture of Gaussians


class _ExactMixturePosterior:
    """p(z|x) of x = W z + b + σ ε under Σ_k π_k N(μ_k, diag s_k²): a mixture of full-covariance
    Gaussians with responsibilities ∝ π_k N(x; W μ_k + b, W S_k Wᵀ + σ² I)."""

    def __init__(self, weight, bias, sigma, loc, scale, logits):
        self.w, self.b, self.sigma = weight.double(), bias.double(), sigma
        self.loc, self.cov = loc.double(), torch.diag_embed(scale.double() ** 2)
        self.log_pi = torch.log_softmax(logits.double(), -1)

    def marginal_components(self):
        x_dim = self.w.shape[0]
        means = self.loc @ self.w.T + self.b
        covs = self.w @ self.cov @ self.w.T + self.sigma ** 2 * torch.eye(x_dim, dtype=torch.float64)
        return means, covs

    def log_marginal(self, x):
        means, covs = self.marginal_components()
        comp = dist.MultivariateNormal(means, covariance_matrix=covs).log_prob(x.double().unsqueeze(-2))
        return torch.logsumexp(self.log_pi + comp, -1)

    def __call__(self, x, index=None, num_data=None):
        means, covs = self.marginal_components()
        xd = x.double()
        resp = self.log_pi + dist.MultivariateNormal(means, covariance_matrix=covs).log_prob(xd.unsqueeze(-2))
        precision = torch.linalg.inv(self.cov) + self.w.T @ self.w / self.sigma ** 2  # (K, D, D)
        post_cov = torch.linalg.inv(precision)
        rhs = (torch.linalg.inv(self.cov) @ self.loc.unsqueeze(-1)).squeeze(-1) + \
            ((xd - self.b) @ self.w / self.sigma ** 2).unsqueeze(-2)  # (B, K, D)
        post_mean = (post_cov @ rhs.unsqueeze(-1)).squeeze(-1)
        fn = dist.MixtureSameFamily(dist.Categorical(logits=resp.float()),
                                    dist.MultivariateNormal(post_mean.float(), covariance_matrix=post_cov.float()))
        with data_plate(x, index, num_data):
            pyro.sample("z", fn)


def _broad_proposal(x, index=None, num_data=None):
    with data_plate(x, index, num_data) as batch:
        pyro.sample("z", dist.Normal(torch.zeros(len(batch), 2), 3.0).to_event(1))


def test_importance_sampled_log_px_of_a_linear_decoder_under_a_mixture_prior_is_the_closed_form():
    x_dim, z_dim, k, n, sigma = 3, 2, 3, 6, 0.6
    loc = 2.0 * torch.randn(k, z_dim)
    scale = torch.rand(k, z_dim) + 0.4
    logits = torch.tensor([0.5, -0.7, 1.2])
    decoder = torch.nn.Linear(z_dim, x_dim)
    model = VAE(decoder, z_dim, likelihood="gaussian", x_scale=sigma,
                prior=MixturePrior(z_dim, k, loc=loc, scale=scale, logits=logits))
    exact = _ExactMixturePosterior(decoder.weight.detach(), decoder.bias.detach(), sigma, loc, scale, logits)
    with torch.no_grad():
        z = dist.Normal(loc[torch.randint(k, (n,))], 1.0).sample()
        x = decoder(z) + sigma * torch.randn(n, x_dim)
    truth = exact.log_marginal(x)
    args = (x, torch.arange(n), n)
    # the exact posterior as proposal: every weight is p(x), so log p̂(x) and the ELBO are exact
    est = importance_sampling(model, exact, *args, num_samples=64, chunk_size=32)
    assert torch.allclose(est.log_likelihood.double(), truth, atol=2e-4)
    assert torch.allclose(est.elbo.double(), truth, atol=2e-4)
    assert float(est.elbo_se.max()) < 1e-3
    assert torch.allclose(log_likelihood(model, exact, *args, num_samples=16).double(), truth, atol=2e-4)
    report = evaluate_dataset(model, exact, x, num_samples=16, batch_size=4, kl_samples=2000)
    assert torch.allclose(report.log_likelihood.double(), truth, atol=2e-4)
    assert torch.allclose(report.gap.double(), torch.zeros(n, dtype=torch.float64), atol=2e-4)
    # a broad proposal converges to it within its standard error
    est = importance_sampling(model, _broad_proposal, *args, num_samples=20000, chunk_size=5000)
    error = (est.log_likelihood.double() - truth).abs()
    assert (error < 5 * est.log_likelihood_se.double() + 1e-3).all(), (error, est.log_likelihood_se)


# --------------------------------------------------------------------------------------------
# the VampPrior's encoder: one entry per tensor, both gradients


def _vamp_pair(x_dim=6, z_dim=3, k=4, encoder_name="encoder", encoder=None, decoder=None, init=None):
    encoder = encoder or GaussianEncoder(x_dim, z_dim, (8,), activation="tanh")  # no dead units: every weight moves
    decoder = decoder or Decoder(z_dim, x_dim, (8,))
    prior = VampPrior(encoder, x_dim, k, init=init, encoder_name=encoder_name)
    return VAE(decoder, z_dim, prior=prior), AmortizedGuide(encoder), prior


def test_the_vamp_encoder_is_one_store_entry_per_tensor_and_trains_with_both_gradients():
    n, lr = 10, 1e-2
    model, guide, prior = _vamp_pair()
    encoder = guide.encoder
    x = torch.bernoulli(torch.rand(n, 6))
    args = (x, torch.arange(n), n)
    params.inspect(model, guide, args)
    store = pyro.get_param_store()
    for name, tensor in encoder.named_parameters():
        holders = [key for key in store.keys() if store._params[key] is tensor]
        assert holders == [f"encoder$$${name}"], (name, holders)
    assert "prior$$$pseudo_inputs" in store.keys()

    # Its gradient is the guide's plus the model's: the same draws with a copy of the encoder in
    # the prior (under another name) split the two.
    pyro.set_rng_seed(3)
    Trace_ELBO().differentiable_loss(model, guide, *args).backward()
    shared = {name: p.grad.clone() for name, p in encoder.named_parameters()}
    pyro.clear_param_store()
    prior_copy = copy.deepcopy(encoder)
    split_model, split_guide, _ = _vamp_pair(encoder=prior_copy, decoder=model.decoder, encoder_name="prior_encoder",
                                             init=prior.module.pseudo_inputs.detach())
    split_guide = AmortizedGuide(encoder)
    for p in encoder.parameters():
        p.grad = None
    pyro.set_rng_seed(3)
    Trace_ELBO().differentiable_loss(split_model, split_guide, *args).backward()
    for name, p in encoder.named_parameters():
        from_prior = dict(prior_copy.named_parameters())[name].grad
        assert from_prior.abs().sum() > 0 and p.grad.abs().sum() > 0, name
        assert torch.allclose(shared[name], p.grad + from_prior, atol=1e-5), name

    # One Adam step moves every weight by lr (|m̂/√v̂| = 1 at the first step): stepped once, not twice.
    pyro.clear_param_store()
    model, guide, _ = _vamp_pair(encoder=encoder, decoder=model.decoder, init=prior.module.pseudo_inputs.detach())
    before = {name: p.detach().clone() for name, p in encoder.named_parameters()}
    fit(model, guide, x, make_objective("elbo"), epochs=1, batch_size=n, lr=lr, test_bound=False, progress=False,
        handle_signals=False)
    for name, p in encoder.named_parameters():
        moved = (p.detach() - before[name]).abs()
        assert torch.allclose(moved, torch.full_like(moved, lr), rtol=0.02), (name, moved.max(), moved.min())


def test_one_tensor_under_two_names_is_refused():
    model, guide, _ = _vamp_pair(encoder_name="prior_encoder")
    x = torch.bernoulli(torch.rand(4, 6))
    with pytest.raises(ValueError, match=r"one tensor under several param names \('encoder\$\$\$.*'prior_encoder"):
        params.inspect(model, guide, (x, torch.arange(4), 4))


# --------------------------------------------------------------------------------------------
# objectives, training, runs and the command line


def _learned_prior(kind: str, x_dim: int, z_dim: int, encoder: torch.nn.Module):
    if kind == "vamp":
        return VampPrior(encoder, x_dim, 4)
    if kind == "mog":
        return MixturePrior(z_dim, 3)
    return FlowPrior(z_dim, 2)


@pytest.mark.parametrize("kind", ["vamp", "mog", "flow"])
def test_elbo_analytic_falls_back_to_monte_carlo_for_the_latent_site(kind):
    """No learned prior has a closed-form KL to the guide's Gaussian: Pyro's TraceMeanField_ELBO
    then scores the latent site by log p(z) − log q at the draw, which is Trace_ELBO on the same draws."""
    x_dim, z_dim, n = 6, 3, 8
    encoder = GaussianEncoder(x_dim, z_dim, (8,))
    model = VAE(Decoder(z_dim, x_dim, (8,)), z_dim, prior=_learned_prior(kind, x_dim, z_dim, encoder))
    guide = AmortizedGuide(encoder)
    args = (torch.bernoulli(torch.rand(n, x_dim)), torch.arange(n), n)
    losses = {}
    for name in ("elbo", "elbo-analytic"):
        pyro.set_rng_seed(11)
        loss = make_objective(name, num_particles=3).differentiable_loss(model, guide, *args)
        loss.backward()
        losses[name] = float(loss.detach())
    assert losses["elbo-analytic"] == pytest.approx(losses["elbo"], rel=1e-6)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in encoder.parameters())
    kl = kl_to_prior(model, guide, *args, num_samples=50)
    assert kl.shape == (n,) and torch.isfinite(kl).all()


def test_a_checkpointed_run_with_a_vamp_prior_resumes_exactly(tmp_path):
    from pyrovae import build

    dataset = gaussian_mixture(num_train=200, num_test=50, seed=1)
    config = TrainConfig(dataset="gmm", prior="vamp", num_pseudo_inputs=6, pseudo_input_init="data",
                         epochs=4, batch_size=50).resolved()

    def run(epochs, resume, path):
        pyro.clear_param_store()
        pyro.set_rng_seed(123)
        model, guide = build(config, dataset)
        fit(model, guide, dataset, make_objective("iwae", 2), epochs=epochs, batch_size=50, lr=1e-2, seed=7,
            checkpoint_path=path, resume=resume, config=config.to_dict(), progress=False)
        return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}

    full = run(4, False, tmp_path / "full.pt")
    run(2, False, tmp_path / "split.pt")
    split = run(4, True, tmp_path / "split.pt")
    assert "prior$$$pseudo_inputs" in full and sorted(full) == sorted(split)
    assert all(torch.equal(full[k], split[k]) for k in full)


@pytest.mark.parametrize("kind", ["vamp", "mog", "flow"])
def test_train_evaluate_sample_and_load_run_with_a_learned_prior(tmp_path, kind):
    from pyrovae import load_run
    from pyrovae.app.run import evaluate_run

    options = {"vamp": ["--num-pseudo-inputs", "8"], "mog": ["--prior-components", "3"],
               "flow": ["--prior-flow-layers", "1"]}[kind]
    out = tmp_path / "run"
    assert main(["train", "--dataset", "gmm", "--prior", kind, *options, "--num-train", "300", "--num-test", "60",
                 "--epochs", "2", "--batch-size", "100", "--eval-samples", "20", "--out", str(out),
                 "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["prior"] == kind and math.isfinite(metrics["test_log_likelihood"])
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--eval-samples", "20",
                 "--out", str(tmp_path / "eval.json"), "--no-progress"]) == 0
    assert main(["sample", "--checkpoint", str(out / "checkpoint.pt"), "--num", "16",
                 "--out", str(tmp_path / "s.png")]) == 0

    run = load_run(out)  # seeds as `pyrovae evaluate` does: the same draws follow
    again, _ = evaluate_run(run.config, run.dataset, run.model, run.guide)
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert again["test_log_likelihood"] == evaluated["test_log_likelihood"]
    assert again["test_log_likelihood"] == pytest.approx(metrics["test_log_likelihood"], abs=0.3)
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    stored = params.param_entry(saved)["params"]
    prior_names = [n for n in stored if n.startswith("prior$$$")]
    assert prior_names and all(torch.equal(pyro.param(n).detach(), stored[n]) for n in prior_names)
    fn = run.model.prior(3, "cpu")
    assert not isinstance(fn, dist.Independent)  # a mixture or a flow, not N(0, I)
    trace = poutine.trace(run.model).get_trace(None, torch.arange(5), 5)
    assert trace.nodes["z"]["fn"].batch_shape == (5,)


def test_prior_options_are_checked_with_the_fix():
    cases = [
        (dict(prior="vamp", guide="full-cov"), "use guide='amortized'"),
        (dict(prior="mog", num_pseudo_inputs=10), "num_pseudo_inputs=10 is an option of prior='vamp'"),
        (dict(prior_flow_layers=3), "prior_flow_layers=3 is an option of prior='flow'; prior='normal'"),
        (dict(prior="vamp", model="hvae"), "prior='vamp' is an option of model 'vae'"),
        (dict(prior="flow", z_dim=1), "needs z_dim ≥ 2"),
        (dict(prior="mog", guide="prior"), "guide='prior' samples N\\(0, I\\)"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            TrainConfig(**kwargs)
    TrainConfig(prior="mog", guide="iaf", prior_components=4)  # mog and flow priors take any guide with a density
