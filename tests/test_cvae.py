"""The CVAE of the quadrant task (:mod:`pyrovae.models.cvae`, :mod:`pyrovae.guides.cvae`,
:mod:`pyrovae.models.quadrants`) against exact answers: the masks cut the quadrants Pyro's example
cuts; a linear-Gaussian CVAE's importance-sampled log p(y|x_obs) equals its closed-form Gaussian
marginal exactly with the exact posterior as guide and within Monte Carlo error with another; a
Bernoulli CVAE's estimate matches quadrature over a 1-D z; the baseline's NLL is the Bernoulli NLL
written by hand; the prior never sees y; and the run trains, resumes and reloads from the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from torch import nn
from torch.nn import functional as F

from pyrovae.models.quadrants import UNOBSERVED, join_quadrants, quadrant_mask, split_quadrants
from pyrovae.guides.cvae import CVAEGuide, cvae_pair
from pyrovae.infer.conditional import baseline_log_likelihood, no_latents
from pyrovae.infer.evaluate import evaluate_dataset, importance_sampling, log_likelihood_se
from pyrovae.models.cvae import CVAE

Z_MAX = 5.0  # Monte Carlo checks: |estimate - exact| < 5 standard errors


# ----------------------------------------------------------------------------------------------
# the masks


@pytest.mark.parametrize("num_quadrants", [1, 2, 3])
def test_masks_observe_pyros_quadrants_in_pyros_order(num_quadrants: int) -> None:
    image = quadrant_mask(num_quadrants).reshape(28, 28)
    quadrants = {"bottom-left": image[14:, :14], "top-left": image[:14, :14], "top-right": image[:14, 14:],
                 "bottom-right": image[14:, 14:]}
    observed = [name for name, block in quadrants.items() if block.all()]
    assert observed == list(quadrants)[:num_quadrants]
    assert all(not block.any() for name, block in quadrants.items() if name not in observed)
    assert int(image.sum()) == 196 * num_quadrants


def test_masks_nest_and_split_odd_sides_at_the_floor() -> None:
    m1, m2, m3 = (quadrant_mask(q, (1, 5, 7)) for q in (1, 2, 3))
    assert (m1 <= m2).all() and (m2 <= m3).all()
    expected = torch.zeros(5, 7, dtype=torch.bool)
    expected[2:, :3] = True  # rows 5 // 2.., columns ..7 // 2
    assert torch.equal(m1.reshape(5, 7), expected)
    with pytest.raises(ValueError, match="num_quadrants must be 1, 2 or 3"):
        quadrant_mask(4)


@pytest.mark.parametrize("num_quadrants", [1, 2, 3])
def test_split_and_join_round_trip(num_quadrants: int) -> None:
    mask = quadrant_mask(num_quadrants)
    x = torch.rand(5, 784)
    x_obs, y = split_quadrants(x, mask)
    assert y.shape == (5, 784 - 196 * num_quadrants)
    assert torch.equal(x_obs[:, mask], x[:, mask]) and (x_obs[:, ~mask] == UNOBSERVED).all()
    # y is the unobserved pixels in row-major order
    assert torch.equal(y, torch.stack([row[(~mask).nonzero().squeeze(-1)] for row in x]))
    assert torch.equal(join_quadrants(x_obs, y, mask), x)
    # samples broadcast against the observed part
    samples = torch.rand(3, 5, y.shape[-1])
    joined = join_quadrants(x_obs, samples, mask)
    assert joined.shape == (3, 5, 784)
    assert torch.equal(joined[:, :, mask], x[:, mask].expand(3, 5, -1)) and torch.equal(joined[:, :, ~mask], samples)


# ----------------------------------------------------------------------------------------------
# a linear-Gaussian CVAE: log p(y|x_obs) in closed form


SIDE, Z_DIM, SIGMA = 4, 3, 0.7


class LinearPrior(nn.Module):
    """p(z|x_obs) = N(A x̃ + a, I)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc = x @ self.weight.T + self.bias
        return loc, torch.ones_like(loc)


class ExactRecognition(nn.Module):
    """q(z|x_obs, y) = p(z|x_obs, y) of the linear-Gaussian CVAE (diagonal, since W_u has orthogonal
    columns), optionally shifted and widened."""

    def __init__(self, cvae: CVAE, shift: float = 0.0, widen: float = 1.0) -> None:
        super().__init__()
        self.cvae, self.shift, self.widen = cvae, shift, widen

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_obs, y = split_quadrants(x, self.cvae.mask)
        prior_loc, _ = self.cvae.prior_net(x_obs)
        W_u, B_u, b_u = linear_parts(self.cvae)
        precision = 1 + (W_u**2).sum(0) / SIGMA**2  # diag(I + W_uᵀW_u / σ²)
        loc = (prior_loc + (y - x_obs @ B_u.T - b_u) @ W_u / SIGMA**2) / precision
        return loc + self.shift, self.widen * precision.rsqrt().expand_as(loc)


def linear_parts(cvae: CVAE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W_u, B_u, b_u: the rows of the generation map y = W z + B x_obs + b for the unobserved pixels."""
    weight, bias = cvae.generation_net.weight, cvae.generation_net.bias
    unobserved = ~cvae.mask
    return weight[unobserved, :Z_DIM], weight[unobserved, Z_DIM:], bias[unobserved]


def linear_cvae(num_quadrants: int = 2) -> CVAE:
    torch.manual_seed(3)
    mask = quadrant_mask(num_quadrants, (SIDE, SIDE))
    d, d_y = mask.numel(), int((~mask).sum())
    prior = LinearPrior(torch.randn(Z_DIM, d) / 2, torch.randn(Z_DIM))
    generation = nn.Linear(Z_DIM + d, d)
    orthonormal, _ = torch.linalg.qr(torch.randn(d_y, Z_DIM))
    with torch.no_grad():
        generation.weight[~mask, :Z_DIM] = orthonormal * torch.tensor([1.5, 0.8, 2.0])
    return CVAE(prior, generation, mask, Z_DIM, likelihood="gaussian", y_scale=SIGMA)


def closed_form(cvae: CVAE, x: torch.Tensor) -> torch.Tensor:
    """log N(y; W_u μ_p + B_u x_obs + b_u, W_u W_uᵀ + σ² I) with μ_p = A x̃ + a."""
    x_obs, y = split_quadrants(x, cvae.mask)
    prior_loc, _ = cvae.prior_net(x_obs)
    W_u, B_u, b_u = linear_parts(cvae)
    mean = prior_loc @ W_u.T + x_obs @ B_u.T + b_u
    covariance = W_u @ W_u.T + SIGMA**2 * torch.eye(y.shape[-1])
    return torch.distributions.MultivariateNormal(mean, covariance).log_prob(y)


def gaussian_data(n: int = 6) -> torch.Tensor:
    return torch.randn(n, SIDE * SIDE, generator=torch.Generator().manual_seed(5))


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("num_quadrants", [1, 2, 3])
def test_exact_posterior_guide_gives_the_closed_form_conditional_log_likelihood_for_every_draw(num_quadrants: int) -> None:
    cvae = linear_cvae(num_quadrants)
    guide = CVAEGuide(ExactRecognition(cvae))
    x = gaussian_data()
    index = torch.arange(len(x))
    with torch.no_grad():
        exact = closed_form(cvae, x)
        estimate = importance_sampling(cvae, guide, x, index, len(x), num_samples=20, chunk_size=10)
    # zero variance: every log-weight is log p(y|x_obs), so log-mean-exp, mean and ESS are exact
    assert torch.allclose(estimate.log_likelihood, exact, atol=1e-9, rtol=0)
    assert torch.allclose(estimate.elbo, exact, atol=1e-9, rtol=0)
    assert torch.allclose(estimate.ess, torch.full_like(exact, 20.0), rtol=1e-9)
    # the run's evaluator gives the same: the model's only observed site is y
    report = evaluate_dataset(cvae, guide, x, num_samples=20, chunk_size=10, batch_size=4)
    assert torch.allclose(report.log_likelihood, exact, atol=1e-9, rtol=0)


@pytest.mark.usefixtures("float64")
def test_another_guide_gives_the_closed_form_within_monte_carlo_error() -> None:
    cvae = linear_cvae(2)
    guide = CVAEGuide(ExactRecognition(cvae, shift=0.4, widen=1.3))
    x = gaussian_data(8)
    index = torch.arange(len(x))
    num_samples = 4000
    with torch.no_grad():
        exact = closed_form(cvae, x)
        estimate = importance_sampling(cvae, guide, x, index, len(x), num_samples=num_samples, chunk_size=500)
    se = log_likelihood_se(estimate.ess, num_samples)
    assert (se > 1e-3).all(), "the guide must differ from the posterior for this test to mean anything"
    z = (estimate.log_likelihood - exact) / se
    assert z.abs().max() < Z_MAX, z
    # the ELBO is below log p(y|x_obs) by KL(q ‖ p(z|x_obs, y)) > 0
    assert ((exact - estimate.elbo) > 5 * estimate.elbo_se).all()


# ----------------------------------------------------------------------------------------------
# the Bernoulli CVAE and its baseline, by hand


def small_pair(num_quadrants: int = 2, z_dim: int = 1):  # type: ignore[no-untyped-def]
    torch.manual_seed(7)
    return cvae_pair(num_quadrants, z_dim=z_dim, hidden_sizes=(6,), image_shape=(SIDE, SIDE))


def binary_data(n: int = 5) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, SIDE * SIDE), 0.4), generator=torch.Generator().manual_seed(9))


def bernoulli_log_prob(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (y * F.logsigmoid(logits) + (1 - y) * F.logsigmoid(-logits)).sum(-1)


@pytest.mark.usefixtures("float64")
def test_baseline_nll_is_the_bernoulli_nll_of_its_prediction_and_its_elbo_with_no_latents() -> None:
    model, _ = small_pair(1)
    baseline = model.baseline
    x = binary_data(7)
    unobserved = (~baseline.mask).nonzero().squeeze(-1)
    x_obs = x.clone()
    x_obs[:, unobserved] = -1.0
    probs = torch.sigmoid(baseline.net(x_obs))[:, unobserved]
    y = x[:, unobserved]
    by_hand = (y * probs.log() + (1 - y) * (1 - probs).log()).sum(-1)
    assert torch.allclose(baseline_log_likelihood(baseline, x, batch_size=3), by_hand, atol=1e-10)
    # the training loss (no latents): exactly -log p(y|x_obs), scaled by N / B in a minibatch
    loss = Trace_ELBO().loss(baseline, no_latents, x[:3], torch.arange(3), 7)
    assert loss == pytest.approx(-(7 / 3) * by_hand[:3].sum().item(), rel=1e-10)


@pytest.mark.usefixtures("float64")
def test_bernoulli_cvae_estimate_matches_quadrature_over_a_one_dimensional_z() -> None:
    model, guide = small_pair(2, z_dim=1)
    with torch.no_grad():  # make y depend strongly on z, and the prior on the baseline's prediction
        model.generation_net[0].weight[:, :1] *= 4.0
        model.prior_net.net[0].weight *= 4.0
    x = binary_data(4)
    mask = model.mask
    x_obs, y = split_quadrants(x, mask)
    with torch.no_grad():
        # the prior network reads x_obs filled with the baseline's prediction, written out by hand
        filled = x_obs.clone()
        filled[:, ~mask] = torch.sigmoid(model.baseline.net(x_obs))[:, ~mask]
        prior_loc, prior_scale = model.prior_net(filled)
        prior = poutine.trace(model).get_trace(x).nodes["z"]["fn"].base_dist
        assert torch.allclose(prior.loc, prior_loc, atol=1e-12) and torch.allclose(prior.scale, prior_scale, atol=1e-12)
        grid = prior_loc[:, 0] + prior_scale[:, 0] * torch.linspace(-12, 12, 8001)[:, None]  # (G, B)
        logits = model.generation_net(torch.cat([grid[..., None], x_obs.expand(len(grid), -1, -1)], -1))[..., ~mask]
        log_joint = torch.distributions.Normal(prior_loc[:, 0], prior_scale[:, 0]).log_prob(grid) + bernoulli_log_prob(logits, y)
        step = grid[1] - grid[0]
        exact = torch.logsumexp(log_joint, 0) + step.log()  # the rectangle rule: exact to float rounding here
        num_samples = 3000
        estimate = importance_sampling(model, guide, x, torch.arange(4), 4, num_samples=num_samples, chunk_size=500)
    se = log_likelihood_se(estimate.ess, num_samples)
    z = (estimate.log_likelihood - exact) / se
    assert z.abs().max() < Z_MAX, (estimate.log_likelihood, exact, se)


def test_the_prior_reads_x_obs_never_y_and_the_generation_net_reads_z_and_x_obs() -> None:
    model, _ = small_pair(1, z_dim=2)
    x = binary_data(6)
    other_y = x.clone()
    other_y[:, ~model.mask] = 1 - x[:, ~model.mask]  # the same observed quadrants, every y pixel flipped
    other_x_obs = x.clone()
    other_x_obs[:, model.mask] = 1 - x[:, model.mask]
    z = torch.randn(6, 2)

    def prior_and_logits(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        trace = poutine.trace(poutine.condition(model, data={"z": z})).get_trace(data)
        fn = trace.nodes["z"]["fn"].base_dist
        return fn.loc, fn.scale, trace.nodes["y"]["fn"].base_dist.logits

    loc, scale, logits = prior_and_logits(x)
    loc_y, scale_y, logits_y = prior_and_logits(other_y)
    assert torch.equal(loc, loc_y) and torch.equal(scale, scale_y) and torch.equal(logits, logits_y)
    loc_o, _, logits_o = prior_and_logits(other_x_obs)
    assert not torch.allclose(loc, loc_o) and not torch.allclose(logits, logits_o)
    # the observed site is the unobserved pixels
    assert torch.equal(poutine.trace(model).get_trace(x).nodes["y"]["value"], x[:, ~model.mask])


def test_cvae_steps_leave_the_baseline_as_trained_and_train_the_rest() -> None:
    from pyrovae.infer.objectives import make_objective
    from pyrovae.train import fit

    model, guide = small_pair(2, z_dim=2)
    before = {name: p.detach().clone() for name, p in [("baseline", model.baseline.net[0].weight),
                                                       ("prior", model.prior_net.net[0].weight)]}
    fit(model, guide, binary_data(40), make_objective("elbo"), epochs=2, batch_size=10, lr=1e-2, progress=False)
    assert torch.equal(model.baseline.net[0].weight, before["baseline"])
    assert not torch.equal(model.prior_net.net[0].weight, before["prior"])


def test_models_and_guide_refuse_missing_data_with_the_fix() -> None:
    model, guide = small_pair(1)
    with pytest.raises(ValueError, match="complete"):
        model(None, index=torch.arange(3))
    with pytest.raises(ValueError, match="complete"):
        guide(None, index=torch.arange(3))
    with pytest.raises(ValueError, match="complete"):
        model.sample(4)
    with pytest.raises(ValueError, match="features"):
        model(torch.zeros(2, 15))


def test_completions_keep_the_observed_quadrants() -> None:
    model, _ = small_pair(3, z_dim=2)
    x = binary_data(4)
    samples = model.complete(x, num_samples=3)
    assert samples.shape == (3, 4, SIDE * SIDE)
    assert torch.equal(samples[:, :, model.mask], x[:, model.mask].expand(3, -1, -1))
    assert ((samples[:, :, ~model.mask] > 0) & (samples[:, :, ~model.mask] < 1)).all()
    assert not torch.equal(samples[0], samples[1])  # z is drawn


# ----------------------------------------------------------------------------------------------
# configuration, the CLI, and a run on MNIST


def test_config_checks_quadrants_and_who_reads_them() -> None:
    from pyrovae.app.config import ConfigError, TrainConfig

    assert TrainConfig(model="cvae").resolved().quadrants == 1
    with pytest.raises(ConfigError, match="quadrants must be 1, 2 or 3") as error:
        TrainConfig(model="cvae", quadrants=4)
    assert error.value.params == ("quadrants",)
    with pytest.raises(ConfigError, match="quadrants=2 is an option of model 'cvae'"):
        TrainConfig(model="vae", quadrants=2)
    with pytest.raises(ConfigError, match="cvae_baseline_epochs=3 is an option of model 'cvae'"):
        TrainConfig(model="vae", cvae_baseline_epochs=3)


@pytest.mark.parametrize("argv, words", [
    (["--model", "cvae", "--quadrants", "4"], ["--quadrants", "1, 2 or 3"]),
    (["--model", "vae", "--quadrants", "2"], ["--quadrants 2", "--model cvae"]),
])
def test_cli_refuses_bad_quadrants_with_exit_2_and_no_traceback(tmp_path, capsys, argv, words) -> None:  # type: ignore[no-untyped-def]
    from pyrovae.app.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["train", *argv, "--out", str(tmp_path / "run"), "--no-progress"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert all(word in err for word in words) and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_cli_trains_resumes_and_load_run_evaluates_on_mnist(mnist_root, tmp_path, capsys, drawn) -> None:  # type: ignore[no-untyped-def]
    from pyrovae.app.cli import main
    from pyrovae.app.run import load_run
    from pyrovae.train import evaluation_data

    out = tmp_path / "run"
    argv = ["train", "--model", "cvae", "--quadrants", "2", "--num-train", "300", "--num-test", "40",
            "--cvae-baseline-epochs", "2", "--eval-samples", "50", "--z-dim", "4", "--hidden-sizes", "40",
            "--data-dir", str(mnist_root), "--out", str(out), "--no-progress"]
    assert main([*argv, "--epochs", "1"]) == 0
    first = json.loads((out / "metrics.json").read_text())
    for name in ("checkpoint.pt", "baseline_checkpoint.pt", "completions.png", "curves.png"):
        assert (out / name).is_file(), name
    drawn(out / "completions.png", data=False)
    assert first["quadrants"] == 2 and first["eval_samples"] == 50 and first["baseline_epochs"] == 2
    assert first["test_conditional_nll"] == pytest.approx(first["test_nll"], rel=1e-6)
    assert first["test_conditional_nll_se"] == first["test_log_likelihood_se"] > 0
    assert first["test_conditional_nll"] - first["baseline_test_nll"] == pytest.approx(-first["cvae_gain_over_baseline"], abs=1e-4)
    # 784 - 2 * 196 Bernoulli pixels: an untrained net would score 392 log 2 = 272 nats; 2 baseline epochs do better
    assert first["baseline_test_nll"] < 392 * math.log(2)
    # resume to 2 epochs: the CVAE continues, the baseline stays as it was trained
    assert main([*argv, "--epochs", "2", "--resume"]) == 0
    second = json.loads((out / "metrics.json").read_text())
    assert second["epochs"] == 2 and second["train_elbo"][0] == first["train_elbo"][0]
    assert second["baseline_test_nll"] == first["baseline_test_nll"]
    # a run stopped after its baseline (only baseline_checkpoint.pt there) resumes from it
    for name in ("checkpoint.pt", "metrics.json", "completions.png", "curves.png"):
        (out / name).unlink()
    baseline_file = (out / "baseline_checkpoint.pt").read_bytes()
    assert main([*argv, "--epochs", "1", "--resume"]) == 0
    assert (out / "baseline_checkpoint.pt").read_bytes() == baseline_file  # finished: not trained again
    assert json.loads((out / "metrics.json").read_text())["baseline_test_nll"] == first["baseline_test_nll"]
    assert main([*argv, "--epochs", "2", "--resume"]) == 0
    second = json.loads((out / "metrics.json").read_text())
    # evaluate reads the run; sample refuses a conditional model with the fix
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--eval-samples", "20",
                 "--data-dir", str(mnist_root), "--out", str(tmp_path / "eval.json"), "--no-progress"]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["baseline_test_nll"] == pytest.approx(second["baseline_test_nll"], abs=1e-4)
    assert evaluated["eval_samples"] == 20
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        main(["sample", "--checkpoint", str(out / "checkpoint.pt"), "--num", "4", "--out", str(tmp_path / "s.png")])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "complete" in err and "Traceback" not in err, err
    # load_run rebuilds the run; its baseline's exact NLL and the CVAE's estimate agree with metrics.json
    run = load_run(out, data_dir=str(mnist_root))
    x_test = evaluation_data(run.dataset, "test", run.config.seed)
    assert -baseline_log_likelihood(run.model.baseline, x_test).mean().item() == pytest.approx(second["baseline_test_nll"], abs=1e-4)
    report = evaluate_dataset(run.model, run.guide, x_test, num_samples=50).summary()
    se = math.hypot(report["log_likelihood_se"], second["test_conditional_nll_se"])
    assert abs(report["nll"] - second["test_conditional_nll"]) < Z_MAX * se + 1e-4
