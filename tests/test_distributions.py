"""The fused Bernoulli log-density (:class:`pyrovae.distributions.BernoulliEvent`) against Pyro's
own ``Bernoulli(logits=...).to_event(1)``: values, gradients, and Pyro's provenance tracking
(``TraceGraph_ELBO`` finds the costs downstream of a non-reparameterized site through it)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceGraph_ELBO
from pyro.ops.provenance import ProvenanceTensor, get_provenance

from pyrovae.distributions import BernoulliEvent
from pyrovae.guides import AmortizedGuide
from pyrovae.models import VAE
from pyrovae.nets import Decoder, GaussianEncoder

X_DIM, Z_DIM, NUM_DATA = 6, 2, 20


#: Every test here in float64 (the root conftest's fixture).
pytestmark = pytest.mark.usefixtures("float64")


class PlainBernoulliVAE(VAE):
    """The same model with Pyro's own Bernoulli log-density."""

    def likelihood_dist(self, out: torch.Tensor) -> dist.TorchDistribution:
        return dist.Bernoulli(logits=out).to_event(1)


def test_values_and_gradients_match_pyro_bernoulli() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 5, X_DIM, requires_grad=True)
    value = torch.bernoulli(torch.full((5, X_DIM), 0.4))
    fused = BernoulliEvent(logits).log_prob(value)
    plain = dist.Bernoulli(logits=logits).to_event(1).log_prob(value)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    (g_fused,) = torch.autograd.grad(fused.sum(), logits)
    (g_plain,) = torch.autograd.grad(plain.sum(), logits)
    torch.testing.assert_close(g_fused, g_plain, rtol=1e-12, atol=1e-12)
    # the normal path is the fused kernel, not a fallback
    assert type(fused.grad_fn).__name__ == "_BernoulliEventLogProbBackward"


def test_provenance_and_gradient_survive_the_fused_kernel() -> None:
    logits = torch.randn(4, X_DIM, requires_grad=True)
    tracked = ProvenanceTensor(logits * 1.0, frozenset({"z"}))
    out = BernoulliEvent(tracked).log_prob(torch.ones(4, X_DIM))
    assert get_provenance(out) == frozenset({"z"})
    (grad,) = torch.autograd.grad(out.sum(), logits)
    torch.testing.assert_close(grad, 1 - torch.sigmoid(logits))


def _tracegraph_grads(model_cls: type, seed: int, num_particles: int, vectorize: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    decoder = Decoder(Z_DIM, X_DIM, (8,))
    encoder = GaussianEncoder(X_DIM, Z_DIM, (8,))
    x = torch.bernoulli(torch.full((NUM_DATA, X_DIM), 0.3))
    model = model_cls(decoder, Z_DIM)
    guide = AmortizedGuide(encoder, reparameterized=False)
    index = torch.arange(5, 12)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    elbo = TraceGraph_ELBO(num_particles=num_particles, vectorize_particles=vectorize, max_plate_nesting=1)
    elbo.loss_and_grads(model, guide, x[index], index, NUM_DATA)
    grads = {}
    for prefix, net in (("decoder", decoder), ("encoder", encoder)):
        for name, param in net.named_parameters():
            assert param.grad is not None, f"{prefix}.{name} got no gradient"
            grads[f"{prefix}.{name}"] = param.grad.clone()
    return grads


@pytest.mark.parametrize("num_particles,vectorize", [(1, False), (3, False), (4, True)])
def test_tracegraph_elbo_gradients_equal_those_of_a_plain_bernoulli(num_particles: int, vectorize: bool) -> None:
    for seed in (1, 2):
        fused = _tracegraph_grads(VAE, seed, num_particles, vectorize)
        plain = _tracegraph_grads(PlainBernoulliVAE, seed, num_particles, vectorize)
        assert fused.keys() == plain.keys()
        for name in fused:
            torch.testing.assert_close(fused[name], plain[name], rtol=1e-9, atol=1e-12, msg=name)
        # the encoder's score term multiplies the downstream cost, which holds log p(x|z): it is
        # not the gradient of the KL term alone
        assert any(fused[name].abs().sum() > 0 for name in fused if name.startswith("encoder"))


def test_bernoulli_event_blocks_of_many_particles_give_the_same_bits():
    # A K-particle evaluation's logits are worked through in cache-sized blocks of leading rows;
    # each row's sums are the same, so the result is bit for bit the unblocked one (and Pyro's
    # Bernoulli log-density to rounding). 37 rows of 100 × 784 do not divide into the blocks.
    from pyrovae.distributions import BernoulliEvent, _BLOCK_ELEMENTS, _bernoulli_event_log_prob

    torch.manual_seed(0)
    logits = 3 * torch.randn(37, 100, 784)
    x = torch.bernoulli(torch.rand(100, 784))
    assert logits[0].numel() < _BLOCK_ELEMENTS < logits.numel()  # blocked, in several blocks
    blocked = BernoulliEvent(logits).log_prob(x)
    assert torch.equal(blocked, _bernoulli_event_log_prob(logits, x.expand_as(logits)))
    exact = dist.Bernoulli(logits=logits.double()).to_event(1).log_prob(x.double())
    assert torch.allclose(blocked.double(), exact, atol=1e-3, rtol=0)
