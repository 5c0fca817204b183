"""Tests of the VAE model, the guides that swap into it, the data plate and non-reparameterized
distributions."""

from __future__ import annotations

import math
from typing import Any, Callable

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI

from pyrovae.distributions import (
    NonReparameterizedIndependent,
    diag_normal,
    non_reparameterized,
)
from pyrovae.guides import AmortizedGuide, PerDatapointGuide, PriorGuide
from pyrovae.handlers import data_plate
from pyrovae.infer.objectives import make_objective
from pyrovae.models import VAE
from pyrovae.nets import Decoder, GaussianEncoder

Z_MAX = 5.0


def binary_data(num_data: int = 64, x_dim: int = 12, seed: int = 3) -> torch.Tensor:
    """Random binary data whose pixels have different probabilities (so there is something to learn)."""
    generator = torch.Generator().manual_seed(seed)
    probs = torch.sigmoid(2.0 * torch.randn(x_dim, generator=generator))
    return torch.bernoulli(probs.expand(num_data, x_dim), generator=generator)


# --------------------------------------------------------------------------------------------
# the model


def test_sample_shapes_and_bernoulli_values() -> None:
    """z, mean and x have the right shapes; x is binary; and x really is drawn from
    Bernoulli(mean): per pixel, mean(x - x_mean) over 4000 draws is 0 within 5 SE."""
    model = VAE(Decoder(3, 5, (8,)), 3)
    z, x_mean, x = model.sample(7)
    assert z.shape == (7, 3) and x_mean.shape == (7, 5) and x.shape == (7, 5)
    n = 4000
    z, x_mean, x = model.sample(n)
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    assert torch.all((x_mean > 0) & (x_mean < 1))
    torch.testing.assert_close(x_mean, torch.sigmoid(model.decoder(z)))
    se = (x_mean * (1 - x_mean)).mean(0).sqrt() / math.sqrt(n)
    assert ((x - x_mean).mean(0).abs() / se).max() < Z_MAX
    # z ~ N(0, I): mean within 5 SE of 0 (SE = 1/sqrt(n))
    assert (z.mean(0).abs() * math.sqrt(n)).max() < Z_MAX
    with pytest.raises(ValueError, match="num_samples"):
        model.sample(0)


def test_sample_gaussian_and_prior() -> None:
    model = VAE(Decoder(2, 4, (8,)), 2, likelihood="gaussian", x_scale=0.3)
    z, x_mean, x = model.sample(3000)
    assert z.shape == (3000, 2) and x.shape == x_mean.shape == (3000, 4)
    residual = (x - x_mean) / 0.3  # N(0, 1) per entry
    assert (residual.mean(0).abs() * math.sqrt(3000)).max() < Z_MAX
    prior = model.prior(5, torch.device("cpu"))
    assert prior.batch_shape == (5,) and prior.event_shape == (2,)
    assert torch.all(prior.mean == 0) and torch.all(prior.stddev == 1)


def test_learned_x_scale_is_a_positive_param() -> None:
    model = VAE(Decoder(2, 4, (8,)), 2, likelihood="gaussian", x_scale=0.3, learn_x_scale=True)
    x = torch.randn(6, 4)
    model(x)
    store = pyro.get_param_store()
    assert "x_scale" in store
    assert store["x_scale"].item() == pytest.approx(0.3)
    unconstrained = dict(store.named_parameters())["x_scale"]
    assert unconstrained.item() == pytest.approx(math.log(0.3))  # positive via exp
    with torch.no_grad():
        unconstrained.fill_(-50.0)
    assert store["x_scale"].item() > 0
    # a fixed scale registers nothing
    pyro.clear_param_store()
    VAE(Decoder(2, 4, (8,)), 2, likelihood="gaussian", x_scale=0.3)(x)
    assert "x_scale" not in pyro.get_param_store()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"likelihood": "poisson"},
        {"beta": 0.0},
        {"beta": -1.0},
        {"x_scale": 0.0},
        {"likelihood": "bernoulli", "learn_x_scale": True},
    ],
)
def test_vae_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        VAE(Decoder(2, 4, (8,)), 2, **kwargs)


# --------------------------------------------------------------------------------------------
# guides swap into the same model and train


def make_guide(kind: str, num_data: int, x_dim: int, z_dim: int) -> Callable:
    if kind == "amortized":
        return AmortizedGuide(GaussianEncoder(x_dim, z_dim, (16,)))
    if kind == "per-datapoint":
        return PerDatapointGuide(num_data, z_dim)
    return PriorGuide(z_dim)


@pytest.mark.parametrize("kind", ["amortized", "per-datapoint", "prior"])
def test_each_guide_trains_the_same_model(kind: str) -> None:
    """The same VAE with each guide swapped in, 30 SVI steps on batches of 16 of 64 binary points:
    the full-data ELBO (20 evaluations with 10 particles each) improves by more than 5 combined SE."""
    x = binary_data()
    num_data, x_dim = x.shape
    z_dim = 2
    torch.manual_seed(0)
    model = VAE(Decoder(z_dim, x_dim, (16,)), z_dim)
    guide = make_guide(kind, num_data, x_dim, z_dim)
    index_all = torch.arange(num_data)
    evaluation = make_objective("elbo", 10)

    def full_elbo() -> tuple[float, float]:
        values = torch.tensor([-evaluation.loss(model, guide, x, index_all, num_data) for _ in range(20)])
        return values.mean().item(), values.std().item() / math.sqrt(len(values))

    guide(x, index_all, num_data)  # create params before the "before" estimate
    before, before_se = full_elbo()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), make_objective("elbo", 1))
    generator = torch.Generator().manual_seed(1)
    for _ in range(30):
        index = torch.randperm(num_data, generator=generator)[:16]
        loss = svi.step(x[index], index, num_data)
        assert math.isfinite(loss)
    after, after_se = full_elbo()
    assert after - before > Z_MAX * math.hypot(before_se, after_se), (before, after, before_se, after_se)


# --------------------------------------------------------------------------------------------
# the per-datapoint guide and lazy updates


def snapshot(names: frozenset[str]) -> dict[str, torch.Tensor]:
    params = dict(pyro.get_param_store().named_parameters())
    return {name: params[name].detach().clone() for name in names}


@pytest.mark.parametrize("optimizer", ["lazy", "adam"])
def test_per_datapoint_rows_move_only_when_in_the_batch(optimizer: str) -> None:
    """Params are (N, z_dim). Three SVI steps on batch A = rows 0..15, then three on batch
    B = rows 16..31:

    - with LazyAdam (``make_pyro_optimizer(lazy_params=guide.local_param_names)``) every row of
      the batch moves; rows outside the current batch keep their values exactly — rows of A stay
      where A's steps left them, rows never batched stay at their initial values;
    - with plain ``pyro.optim.Adam`` (the contrast) rows of A keep drifting while B is trained,
      pushed by their first-moment estimates, though their gradient is zero.
    """
    from pyrovae.infer.optim import make_pyro_optimizer

    x = binary_data()
    num_data, x_dim = x.shape
    model = VAE(Decoder(2, x_dim, (16,)), 2)
    guide = PerDatapointGuide(num_data, 2)
    names = guide.local_param_names
    guide(x, torch.arange(num_data), num_data)
    model(x, torch.arange(num_data), num_data)
    assert all(pyro.param(name).shape == (num_data, 2) for name in names)
    initial = snapshot(names)
    decoder_initial = pyro.param("decoder$$$0.weight").detach().clone()

    if optimizer == "lazy":
        optim = make_pyro_optimizer(0.05, lazy_params=names)
    else:
        optim = pyro.optim.Adam({"lr": 0.05})
    svi = SVI(model, guide, optim, make_objective("elbo", 1))
    batch_a, batch_b = torch.arange(0, 16), torch.arange(16, 32)
    never = torch.arange(32, num_data)

    for _ in range(3):
        svi.step(x[batch_a], batch_a, num_data)
    after_a = snapshot(names)
    for name in names:
        assert torch.all((after_a[name][batch_a] != initial[name][batch_a]).any(-1)), name
        assert torch.equal(after_a[name][16:], initial[name][16:]), name

    for _ in range(3):
        svi.step(x[batch_b], batch_b, num_data)
    after_b = snapshot(names)
    assert not torch.equal(pyro.param("decoder$$$0.weight").detach(), decoder_initial)
    for name in names:
        assert torch.all((after_b[name][batch_b] != initial[name][batch_b]).any(-1)), name
        assert torch.equal(after_b[name][never], initial[name][never]), name
        if optimizer == "lazy":
            assert torch.equal(after_b[name][batch_a], after_a[name][batch_a]), name
        else:
            assert torch.all((after_b[name][batch_a] != after_a[name][batch_a]).any(-1)), name


def test_guide_and_plate_argument_errors() -> None:
    x = torch.randn(4, 3)
    guide = PerDatapointGuide(10, 2)
    with pytest.raises(ValueError, match="num_data"):
        guide(x, torch.arange(4), num_data=12)
    with pytest.raises(ValueError, match="index"):
        guide(x)  # 4 rows but 10 points and no index
    with pytest.raises(ValueError, match="needs the data"):
        AmortizedGuide(GaussianEncoder(3, 2, (4,)))(None)
    with pytest.raises(ValueError, match="must match"):
        with data_plate(x, torch.arange(3), 10):
            pass
    with pytest.raises(ValueError, match="index"):
        data_plate(x, torch.arange(4.0), 10)
    with pytest.raises(ValueError, match="num_data"):
        data_plate(x, None, 10)
    with pytest.raises(ValueError):
        data_plate(None)
    for bad in (0, -1):
        with pytest.raises(ValueError):
            PerDatapointGuide(bad, 2)
    with pytest.raises(ValueError):
        PerDatapointGuide(5, 2, init_scale=0.0)


def test_data_plate_scales_by_num_data_over_batch() -> None:
    x = torch.randn(4, 3)
    index = torch.tensor([7, 2, 9, 0])
    trace = pyro.poutine.trace(lambda: _plate_site(x, index, 20)).get_trace()
    assert trace.nodes["v"]["scale"] == pytest.approx(5.0)
    assert trace.nodes["v"]["value"].shape == (4,)
    trace = pyro.poutine.trace(lambda: _plate_site(x, None, None)).get_trace()
    assert trace.nodes["v"]["scale"] == pytest.approx(1.0)


def _plate_site(x: torch.Tensor, index: Any, num_data: Any) -> torch.Tensor:
    with data_plate(x, index, num_data):
        return pyro.sample("v", dist.Normal(0.0, 1.0))


# --------------------------------------------------------------------------------------------
# non-reparameterized distributions


def test_non_reparameterized_survives_particle_plates() -> None:
    """Inside a vectorized particle plate (dim -2) and the data plate (dim -1):

    - ``non_reparameterized(Normal(loc, 1).to_event(1))`` draws z with ``requires_grad=False``
      although ``loc`` requires grad, while its log-density keeps the gradient wrt ``loc`` that the
      score-function estimator needs, and equals the reparameterized density;
    - Pyro's own ``Normal(loc, 1).has_rsample_(False).to_event(1)`` raises there: Pyro 1.9's
      BroadcastMessenger copies ``has_rsample`` onto the expanded ``Independent``, whose
      ``has_rsample`` is a read-only property (``AttributeError``);
    - and a leaf's ``has_rsample_(False)`` is dropped by ``expand``, so
      ``Normal(...).has_rsample_(False)`` broadcast by hand silently reparameterizes again.
    """
    loc = torch.zeros(3, 2, requires_grad=True)

    def sample(fn: dist.TorchDistribution) -> tuple[torch.Tensor, Any]:
        with pyro.plate("particles", 5, dim=-2), pyro.plate("data", 3, dim=-1):
            trace = pyro.poutine.trace(lambda: pyro.sample("z", fn)).get_trace()
        return trace.nodes["z"]["value"], trace.nodes["z"]["fn"]

    z, fn = sample(non_reparameterized(dist.Normal(loc, 1.0).to_event(1)))
    assert z.shape == (5, 3, 2) and not z.requires_grad
    assert isinstance(fn, NonReparameterizedIndependent) and not fn.has_rsample
    log_q = fn.log_prob(z)
    assert log_q.requires_grad and log_q.shape == (5, 3)
    torch.testing.assert_close(log_q, dist.Normal(loc, 1.0).to_event(1).log_prob(z))
    (grad,) = torch.autograd.grad(log_q.sum(), loc)
    torch.testing.assert_close(grad, z.sum(0))  # ∂/∂loc log N(z; loc, 1) = z - loc, loc = 0

    z, _ = sample(diag_normal(loc, torch.ones_like(loc), reparameterized=False))
    assert not z.requires_grad
    z, _ = sample(diag_normal(loc, torch.ones_like(loc)))
    assert z.requires_grad

    with pytest.raises(AttributeError, match="has_rsample"):
        sample(dist.Normal(loc, 1.0).has_rsample_(False).to_event(1))
    assert dist.Normal(loc, 1.0).has_rsample_(False).expand([5, 3, 2]).has_rsample

    # already non-reparameterized: returned unchanged; other wrappers: a ValueError naming the fix
    fn = non_reparameterized(dist.Normal(loc, 1.0).to_event(1))
    assert non_reparameterized(fn) is fn
    transformed = dist.TransformedDistribution(dist.Normal(loc, 1.0), [dist.transforms.ExpTransform()])
    with pytest.raises(ValueError, match="leaf distribution"):
        non_reparameterized(transformed)
