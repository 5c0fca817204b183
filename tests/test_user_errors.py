"""What a user's mistakes get: a ValueError that names the mistake and the fix.

- every pyrovae model and guide called without data (``fn(None)``, also through
  ``pyro.infer.Predictive``) says to pass ``x`` or ``index=torch.arange(n)``, and sampling with
  ``index`` works;
- a model (or guide) whose data plate ignores the ``index``/``num_data`` it is given is told so,
  not told about β; a real β mismatch still is;
- pyrovae's objectives and evaluation guess ``max_plate_nesting`` without Pyro's INFO line and
  without consuming random numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Callable, Optional

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Predictive

from pyrovae.guides import (
    AmortizedGuide,
    CategoricalGuide,
    ExactPosteriorGuide,
    HierarchicalGuide,
    MixturePriorGuide,
    PerDatapointGuide,
    PriorGuide,
    SemiAmortizedGuide,
)
from pyrovae.infer.evaluate import evaluate_dataset, importance_sampling, kl_to_prior, log_likelihood
from pyrovae.infer.objectives import OBJECTIVES, make_objective
from pyrovae.models import VAE, GaussianMixture, HierarchicalVAE, LinearGaussian
from pyrovae.models.code_prior import CodePrior
from pyrovae.models.vqvae import VQVAE, VQVAE2, VQ2Guide, VQ2Networks, VQDecoder, VQEncoder, VQGuide
from pyrovae.nets import Decoder, GaussianEncoder, HierarchicalDecoder, HierarchicalEncoder, MLP

X_DIM, Z_DIM, NUM_DATA = 6, 2, 20
SAMPLE_FIX = r"index=torch\.arange\(n\)"


@pytest.fixture(autouse=True)
def fresh_store() -> Iterator[None]:
    pyro.clear_param_store()
    yield


def samplers() -> dict[str, Callable]:
    """Models and guides that can run without data: given ``index`` they draw that many points."""
    torch.manual_seed(0)
    mixture = GaussianMixture(num_components=3, dim=2)
    vq_decoder = VQDecoder((1, 8, 8), 3, channels=(4, 5))
    vq_grid = VQEncoder((1, 8, 8), 3, channels=(4, 5)).grid
    return {
        "VAE": VAE(Decoder(Z_DIM, X_DIM, (8,)), Z_DIM),
        "VAE-gaussian": VAE(Decoder(Z_DIM, X_DIM, (8,)), Z_DIM, likelihood="gaussian", learn_x_scale=True),
        "HierarchicalVAE": HierarchicalVAE(HierarchicalDecoder(X_DIM, (3, 2), (8,), (8,))),
        "LinearGaussian": LinearGaussian(X_DIM, Z_DIM),
        "GaussianMixture": mixture,
        "VQVAE": VQVAE(vq_decoder, 4, 3, vq_grid),
        "VQVAE2": VQVAE2(VQ2Networks((1, 8, 8), 3, num_codes_top=4, num_codes_bottom=4, channels=6)),
        "PriorGuide": PriorGuide(Z_DIM),
        "MixturePriorGuide": MixturePriorGuide(mixture),
    }


def data_guides() -> dict[str, Callable]:
    """Guides that are functions of the data, so need x (or, per-datapoint, the rows ``index``)."""
    torch.manual_seed(0)
    model = LinearGaussian(X_DIM, Z_DIM)
    vq_encoder = VQEncoder((1, 8, 8), 3, channels=(4, 5))
    vq_model = VQVAE(VQDecoder((1, 8, 8), 3, channels=(4, 5)), 4, 3, vq_encoder.grid)
    vq2_model = VQVAE2(VQ2Networks((1, 8, 8), 3, num_codes_top=4, num_codes_bottom=4, channels=6))
    return {
        "AmortizedGuide": AmortizedGuide(GaussianEncoder(X_DIM, Z_DIM, (8,))),
        "CategoricalGuide": CategoricalGuide(MLP(X_DIM, [8], 3)),
        "HierarchicalGuide": HierarchicalGuide(HierarchicalEncoder(X_DIM, (3, 2), (8,), (8,))),
        "SemiAmortizedGuide": SemiAmortizedGuide(GaussianEncoder(X_DIM, Z_DIM, (8,)), model, num_steps=1),
        "ExactPosteriorGuide": ExactPosteriorGuide(model),
        "PerDatapointGuide": PerDatapointGuide(NUM_DATA, Z_DIM),
        "VQGuide": VQGuide(vq_encoder, vq_model),
        "VQ2Guide": VQ2Guide(vq2_model),
        "CodePrior": CodePrior(num_codes=3, grid=(2, 3), channels=8, layers=1),
    }


@pytest.mark.parametrize("name", sorted(samplers()))
def test_samplers_called_without_data_say_what_to_pass(name: str) -> None:
    fn = samplers()[name]
    with pytest.raises(ValueError, match=SAMPLE_FIX):
        fn(None)
    with pytest.raises(ValueError, match=SAMPLE_FIX):
        Predictive(fn, num_samples=3)(None)
    # and sampling with an index works, one row per position
    trace = pyro.poutine.trace(fn).get_trace(None, index=torch.arange(5))
    latents = [s for s in trace.nodes.values() if s["type"] == "sample" and s["name"] != "data"]
    assert latents and all(s["value"].shape[0] == 5 for s in latents)


@pytest.mark.parametrize("name", sorted(data_guides()))
def test_data_guides_called_without_data_say_they_need_it(name: str) -> None:
    with pytest.raises(ValueError, match=r"needs the data x|needs? x|scores code grids|pass index="):
        data_guides()[name](None)


def test_predictive_draws_samples_given_an_index() -> None:
    torch.manual_seed(0)
    model = VAE(Decoder(Z_DIM, X_DIM, (8,)), Z_DIM)
    samples = Predictive(model, num_samples=3)(None, index=torch.arange(5))
    assert samples["z"].shape == (3, 5, Z_DIM) and samples["x"].shape == (3, 5, X_DIM)
    assert set(samples["x"].unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(samples["z"][0], samples["z"][1])  # three independent draws
    # with the prior as guide, in parallel (Predictive guesses max_plate_nesting itself)
    samples = Predictive(model, guide=PriorGuide(Z_DIM), num_samples=4, parallel=True)(None, index=torch.arange(7))
    assert samples["x"].shape == (4, 7, X_DIM)


# --------------------------------------------------------------------------------------------
# a data plate that ignores index / num_data


class Nets:
    def __init__(self) -> None:
        torch.manual_seed(0)
        self.decoder = Decoder(Z_DIM, X_DIM, (8,))
        self.encoder = GaussianEncoder(X_DIM, Z_DIM, (8,))
        self.x = torch.bernoulli(torch.full((NUM_DATA, X_DIM), 0.4))

    def model_ignoring_index(self, x: torch.Tensor, index: Optional[torch.Tensor] = None,
                             num_data: Optional[int] = None) -> None:
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):  # neither subsample=index nor num_data
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], Z_DIM), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide_ignoring_index(self, x: torch.Tensor, index: Optional[torch.Tensor] = None,
                             num_data: Optional[int] = None) -> None:
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, scale = self.encoder(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def runs(model: Callable, guide: Callable, x: torch.Tensor, index: torch.Tensor) -> dict[str, Callable[[], Any]]:
    return {
        "iwae": lambda: make_objective("iwae", 3).loss(model, guide, x, index, NUM_DATA),
        "iwae-grads": lambda: make_objective("iwae", 2).loss_and_grads(model, guide, x, index, NUM_DATA),
        "score": lambda: make_objective("score", 3).loss(model, guide, x, index, NUM_DATA),
        "log_likelihood": lambda: log_likelihood(model, guide, x, index, NUM_DATA, num_samples=4),
    }


@pytest.mark.parametrize("which", ["iwae", "iwae-grads", "score", "log_likelihood"])
def test_a_model_ignoring_index_is_told_to_use_it(which: str) -> None:
    nets = Nets()
    index = torch.arange(4, 12)
    run = runs(nets.model_ignoring_index, AmortizedGuide(nets.encoder), nets.x[index], index)[which]
    with pytest.raises(ValueError) as info:
        run()
    message = str(info.value)
    assert "the model ignores the index and num_data it is given" in message
    assert "pyro.plate('data', num_data, subsample=index)" in message
    assert "8 of 20 points" in message and "beta" not in message


@pytest.mark.parametrize("which", ["iwae", "score", "log_likelihood"])
def test_a_guide_ignoring_index_is_told_to_use_it(which: str) -> None:
    nets = Nets()
    index = torch.arange(4, 12)
    model = VAE(nets.decoder, Z_DIM)
    run = runs(model, nets.guide_ignoring_index, nets.x[index], index)[which]
    with pytest.raises(ValueError, match=r"the guide ignores the index and num_data it is given.*pyro\.plate\('data', num_data, subsample=index\)") as info:
        run()
    assert "beta" not in str(info.value)


def test_ignoring_index_is_fine_on_the_full_data_set() -> None:
    nets = Nets()
    index = torch.arange(NUM_DATA)
    ll = log_likelihood(nets.model_ignoring_index, AmortizedGuide(nets.encoder), nets.x, index, NUM_DATA, num_samples=4)
    assert ll.shape == (NUM_DATA,) and torch.isfinite(ll).all()


def test_a_real_beta_mismatch_keeps_the_beta_message() -> None:
    nets = Nets()
    index = torch.arange(4, 12)
    model = VAE(nets.decoder, Z_DIM, beta=2.0)
    guide = AmortizedGuide(nets.encoder, beta=1.0)
    for which in ("iwae", "score"):
        with pytest.raises(ValueError, match="model's beta") as info:
            runs(model, guide, nets.x[index], index)[which]()
        assert "subsample" not in str(info.value)


# --------------------------------------------------------------------------------------------
# max_plate_nesting: no INFO line, no random numbers


def test_objectives_and_evaluation_guess_max_plate_nesting_quietly(caplog: pytest.LogCaptureFixture) -> None:
    nets = Nets()
    model, guide = VAE(nets.decoder, Z_DIM), AmortizedGuide(nets.encoder)
    index = torch.arange(8)
    args = (nets.x[index], index, NUM_DATA)
    caplog.set_level(logging.INFO, logger="pyro")
    for name in OBJECTIVES:
        for k in (1, 3):
            objective = make_objective(name, k)
            objective.loss_and_grads(model, guide, *args)
            objective.loss(model, guide, *args)
    evaluate_dataset(model, guide, nets.x, num_samples=5, batch_size=7)
    log_likelihood(model, guide, *args, num_samples=5)
    kl_to_prior(model, guide, *args, num_samples=5)
    assert not [r.getMessage() for r in caplog.records if "max_plate_nesting" in r.getMessage()]
    # Pyro's own ELBO still logs it (the check above can see the line)
    pyro.infer.Trace_ELBO(vectorize_particles=True).loss(model, guide, *args)
    assert any("Guessed max_plate_nesting" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_guessing_max_plate_nesting_draws_no_random_numbers(name: str) -> None:
    """The first call (which guesses) and a second call from the same seed draw the same
    particles, so they give the same loss exactly."""
    nets = Nets()
    model, guide = VAE(nets.decoder, Z_DIM), AmortizedGuide(nets.encoder)
    index = torch.arange(8)
    objective = make_objective(name, 3)
    assert objective.max_plate_nesting == float("inf")
    pyro.set_rng_seed(7)
    first = objective.loss(model, guide, nets.x[index], index, NUM_DATA)
    assert objective.max_plate_nesting != float("inf")
    pyro.set_rng_seed(7)
    second = objective.loss(model, guide, nets.x[index], index, NUM_DATA)
    assert first == second


def test_importance_sampling_guess_draws_no_random_numbers() -> None:
    nets = Nets()
    model, guide = VAE(nets.decoder, Z_DIM), AmortizedGuide(nets.encoder)
    index = torch.arange(8)
    args = (nets.x[index], index, NUM_DATA)
    pyro.set_rng_seed(3)
    guessed = importance_sampling(model, guide, *args, num_samples=6).log_likelihood
    pyro.set_rng_seed(3)
    given = importance_sampling(model, guide, *args, num_samples=6, max_plate_nesting=1).log_likelihood
    assert torch.equal(guessed, given)
