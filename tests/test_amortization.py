"""Semi-amortized guides, test-time per-datapoint optimisation, importance diagnostics with ArviZ
(``pyrovae/guides/semi_amortized.py``, ``optimize_local_guide`` in ``pyrovae/infer/local.py``,
``pyrovae/infer/diagnostics.py``). The amortization-gap study (``experiments/studies/amortization.py``)
is smoke-run in ``experiments/tests/test_amortization_study.py``.

Exact claims (row independence, frozen rows, the zero-step guide, ESS of the exact posterior) are
checked bitwise or to float rounding; every stochastic claim against its Monte Carlo standard
error with |z| < 5 (or z > 5 for "larger than").
"""

from __future__ import annotations

import json
import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI
from torch.distributions import MultivariateNormal, kl_divergence

from pyrovae import (
    VAE,
    AmortizedGuide,
    Decoder,
    ExactPosteriorGuide,
    GaussianEncoder,
    LinearGaussian,
    SemiAmortizedGuide,
    make_objective,
    make_pyro_optimizer,
    optimize_local_guide,
)
from pyrovae.guides import gaussian_elbo, refine_gaussian
from pyrovae.infer.diagnostics import (
    importance_diagnostics,
    pareto_khat,
    posterior_draws,
    to_inference_data,
)

Z_MAX = 5.0


def _small_vae(x_dim: int = 12, z_dim: int = 3, hidden: int = 16) -> tuple[VAE, GaussianEncoder]:
    return VAE(Decoder(z_dim, x_dim, [hidden]), z_dim), GaussianEncoder(x_dim, z_dim, [hidden])


def _exact_elbo(model: LinearGaussian, x: torch.Tensor, z_loc: torch.Tensor, z_scale: torch.Tensor) -> torch.Tensor:
    # ELBO(q) = log p(x) - KL(q || p(z|x)), both in closed form for the linear-Gaussian model.
    with torch.no_grad():
        q = MultivariateNormal(z_loc, scale_tril=torch.diag_embed(z_scale))
        return model.log_marginal(x) - kl_divergence(q, model.posterior(x))


def _blocked_elbo(model, x, z_loc, z_scale, blocks: int, per_block: int, generator=None):
    # Replicate estimates of the per-point ELBO from independent blocks of draws: (blocks, B).
    noise = torch.randn(blocks, per_block, *z_loc.shape, generator=generator)
    with torch.no_grad():
        return torch.stack([gaussian_elbo(model, x, z_loc, z_scale, noise=n) for n in noise]), noise


# ---------------------------------------------------------------------------------------------
# gaussian_elbo and the refinement


def test_gaussian_elbo_matches_the_closed_form():
    model, x = LinearGaussian.random(3, 6, num_points=8, seed=1)
    z_loc = torch.randn(8, 3) * 0.5
    z_scale = torch.rand(8, 3) + 0.3
    replicates, _ = _blocked_elbo(model, x, z_loc, z_scale, blocks=40, per_block=100)
    assert replicates.shape == (40, 8)
    estimate = replicates.mean(0)
    se = replicates.std(0) / math.sqrt(40)
    exact = _exact_elbo(model, x, z_loc, z_scale)
    z = (estimate - exact) / se
    assert z.abs().max() < Z_MAX, z


def test_gaussian_elbo_rejects_mismatched_shapes():
    model, x = LinearGaussian.random(2, 4, num_points=5, seed=0)
    with pytest.raises(ValueError, match="z_loc and z_scale"):
        gaussian_elbo(model, x, torch.zeros(5, 2), torch.ones(4, 2))
    with pytest.raises(ValueError, match="noise"):
        gaussian_elbo(model, x, torch.zeros(5, 2), torch.ones(5, 2), noise=torch.randn(3, 5, 3))


def test_refinement_increases_the_elbo():
    model, encoder = _small_vae()
    x = torch.bernoulli(torch.rand(20, 12))
    with torch.no_grad():
        z_loc0, z_scale0 = encoder(x)
    z_loc, z_scale, trajectory = refine_gaussian(model, x, z_loc0, z_scale0, num_steps=30, lr=5e-2)
    assert z_loc.shape == z_scale.shape == (20, 3) and len(trajectory) == 30
    assert not z_loc.requires_grad and bool((z_scale > 0).all())
    assert all(p.grad is None for p in model.decoder.parameters())  # the model gets no gradient
    # Paired comparison with common draws: replicate blocks give the standard error of the gain.
    noise = torch.randn(30, 200, 20, 3)
    with torch.no_grad():
        gains = torch.stack([
            (gaussian_elbo(model, x, z_loc, z_scale, noise=n) - gaussian_elbo(model, x, z_loc0, z_scale0, noise=n)).mean()
            for n in noise
        ])
    z = gains.mean() / (gains.std() / math.sqrt(len(gains)))
    assert z > Z_MAX, (gains.mean(), z)


def test_semi_amortized_guide_shapes_and_zero_steps_is_the_amortized_guide():
    model, encoder = _small_vae()
    x = torch.bernoulli(torch.rand(7, 12))
    index = torch.arange(7)
    amortized = AmortizedGuide(encoder)
    zero = SemiAmortizedGuide(encoder, model, num_steps=0)
    pyro.set_rng_seed(3)
    trace_a = poutine.trace(amortized).get_trace(x, index, 7)
    pyro.set_rng_seed(3)
    trace_0 = poutine.trace(zero).get_trace(x, index, 7)
    assert torch.equal(trace_a.nodes["z"]["value"], trace_0.nodes["z"]["value"])
    assert torch.equal(trace_a.log_prob_sum(), trace_0.log_prob_sum())
    refined = SemiAmortizedGuide(encoder, model, num_steps=3)
    assert refined(x, index, 7).shape == (7, 3)
    # Inside a vectorized-particle plate the refinement runs once and z gets the particle dim.
    with pyro.plate("particles", 4, dim=-2):
        assert refined(x, index, 7).shape == (4, 7, 3)
    with pytest.raises(ValueError, match="num_steps"):
        SemiAmortizedGuide(encoder, model, num_steps=-1)


def test_semi_amortized_svi_step_trains_encoder_and_decoder():
    model, encoder = _small_vae()
    x = torch.bernoulli(torch.rand(10, 12))
    guide = SemiAmortizedGuide(encoder, model, num_steps=3)
    before = {n: p.detach().clone() for n, p in [*model.decoder.named_parameters(), *encoder.named_parameters(prefix="enc")]}
    svi = SVI(model, guide, make_pyro_optimizer(1e-2), loss=make_objective("elbo", num_particles=2))
    loss = svi.step(x, torch.arange(10), 10)
    assert math.isfinite(loss)
    after = {n: p.detach() for n, p in [*model.decoder.named_parameters(), *encoder.named_parameters(prefix="enc")]}
    moved = {n: not torch.equal(before[n], after[n]) for n in before}
    assert all(moved.values()), moved  # the straight-through estimator reaches the encoder


# ---------------------------------------------------------------------------------------------
# optimize_local_guide: vectorised over points, stopping rule, start


def test_vectorised_rows_are_independent():
    model, x = LinearGaussian.random(2, 5, num_points=6, seed=2)
    x_other = x.clone()
    x_other[4] += 3.0

    def run(data):
        pyro.set_rng_seed(11)
        optimize_local_guide(model, data, 2, steps=40, lr=5e-2, num_particles=2, prefix="t")
        return pyro.param("t.z_loc").detach().clone(), pyro.param("t.z_scale").detach().clone()

    loc_a, scale_a = run(x)
    loc_b, scale_b = run(x_other)
    others = torch.arange(6) != 4
    assert torch.equal(loc_a[others], loc_b[others]) and torch.equal(scale_a[others], scale_b[others])
    assert not torch.equal(loc_a[4], loc_b[4])


def test_vectorised_optimisation_matches_a_one_point_reference():
    model, x = LinearGaussian.random(2, 5, num_points=6, seed=3)
    settings = dict(steps=250, lr=5e-2, lr_decay=0.99, num_particles=8)
    pyro.set_rng_seed(0)
    optimize_local_guide(model, x, 2, prefix="all", **settings)
    elbo_all = _exact_elbo(model, x, pyro.param("all.z_loc").detach(), pyro.param("all.z_scale").detach())
    elbo_one = []
    for i in range(6):
        pyro.set_rng_seed(100 + i)
        optimize_local_guide(model, x[i : i + 1], 2, prefix="one", **settings)
        elbo_one.append(_exact_elbo(model, x[i : i + 1], pyro.param("one.z_loc").detach(), pyro.param("one.z_scale").detach()))
    elbo_one = torch.cat(elbo_one)
    # Best diagonal Gaussian of a Gaussian posterior: exact mean, precision = diag of the precision.
    posterior = model.posterior(x)
    best_scale = posterior.precision_matrix.diagonal(dim1=-2, dim2=-1).rsqrt()
    elbo_best = _exact_elbo(model, x, posterior.mean, best_scale)
    assert bool((elbo_all <= elbo_best + 1e-5).all()) and bool((elbo_one <= elbo_best + 1e-5).all())
    diff = elbo_all - elbo_one
    z = diff.mean() / (diff.std() / math.sqrt(len(diff)))
    assert abs(z) < Z_MAX, (diff, z)
    # Both end close to the best diagonal Gaussian: a few hundredths of a nat below it at most.
    assert float((elbo_best - elbo_all).max()) < 0.05 and float((elbo_best - elbo_one).max()) < 0.05


def test_stopping_rule_freezes_points_where_they_stopped():
    model, x = LinearGaussian.random(2, 5, num_points=12, seed=4)
    settings = dict(lr=0.1, lr_decay=0.995, num_particles=2, tol=5e-3, check_every=10, patience=2,
                    return_history=True, prefix="s")
    pyro.set_rng_seed(5)
    _, history = optimize_local_guide(model, x, 2, steps=600, **settings)
    final_loc = pyro.param("s.z_loc").detach().clone()
    stopped = history.stopped_at
    assert stopped.shape == (12,) and history.final_elbo.shape == (12,)
    assert len(history.step) == len(history.elbo) == len(history.num_active) == len(history.seconds)
    assert len(history.step_elbo) == history.step[-1]
    assert history.num_active[0] == 12 and history.num_active[-1] == 0
    first = int(stopped.min())
    assert first < int(stopped.max()), "the points should stop at different steps here"
    # A run cut at the first stop takes exactly the same path until then, so the points that
    # stopped there must hold the very values they end with in the long run.
    pyro.set_rng_seed(5)
    optimize_local_guide(model, x, 2, steps=first, **settings)
    cut_loc = pyro.param("s.z_loc").detach()
    early = stopped == first
    assert torch.equal(cut_loc[early], final_loc[early])
    assert not torch.equal(cut_loc[~early], final_loc[~early])


def test_start_from_an_encoder_and_history():
    model, encoder = _small_vae()
    x = torch.bernoulli(torch.rand(9, 12))
    guide = AmortizedGuide(encoder)
    with torch.no_grad():
        z_loc0, z_scale0 = encoder(x)
    _, history = optimize_local_guide(model, x, 3, steps=1, lr=1e-9, init=guide, prefix="e",
                                      check_every=1, return_history=True)
    assert torch.allclose(pyro.param("e.z_loc").detach(), z_loc0, atol=1e-6)
    assert torch.allclose(pyro.param("e.z_scale").detach(), z_scale0, rtol=1e-5)
    assert history.step == [0, 1] and history.stopped_at.tolist() == [1] * 9
    assert json.dumps(history.to_dict())
    with pytest.raises(ValueError, match="init"):
        optimize_local_guide(model, x, 3, steps=1, init="encoder")


# ---------------------------------------------------------------------------------------------
# Diagnostics


@pytest.mark.parametrize("tail", [0.3, 0.9])
def test_pareto_khat_recovers_the_tail_index(tail):
    # w = U^(-ξ) has a generalized-Pareto tail with shape ξ.
    generator = torch.Generator().manual_seed(0)
    u = torch.rand(40, 2000, generator=generator, dtype=torch.float64)
    khat = pareto_khat(-tail * u.log())
    assert khat.shape == (40,)
    z = (khat.mean() - tail) / (khat.std() / math.sqrt(40))
    assert abs(z) < Z_MAX, (khat.mean(), z)


def test_importance_diagnostics_with_the_exact_posterior():
    model, x = LinearGaussian.random(2, 5, num_points=7, seed=6)
    diag = importance_diagnostics(model, ExactPosteriorGuide(model), x, num_samples=60, chunk_size=25, batch_size=3)
    log_px = model.log_marginal(x)
    assert diag.log_likelihood.shape == diag.elbo.shape == diag.ess.shape == diag.khat.shape == (7,)
    assert torch.allclose(diag.log_likelihood, log_px.double(), atol=1e-4)
    assert torch.allclose(diag.elbo, log_px.double(), atol=1e-4)
    assert torch.allclose(diag.ess, torch.full((7,), 60.0, dtype=torch.float64), rtol=1e-4)
    summary = diag.summary()
    assert summary["num_points"] == 7 and summary["num_samples"] == 60


def test_inference_data_has_point_and_latent_coordinates(tmp_path):
    model, x = LinearGaussian.random(3, 6, num_points=5, seed=7)
    index = torch.tensor([1, 3])
    z, log_w = posterior_draws(model, ExactPosteriorGuide(model), x[index], index, 5, 40)
    assert z.shape == (40, 2, 3) and log_w.shape == (40, 2)
    idata = to_inference_data(
        {"exact": z, "other": z + 1.0}, x[index], [1, 3], log_weights={"exact": log_w},
        point_stats={"khat_exact": torch.tensor([0.1, 0.2])},
    )
    path = tmp_path / "draws.nc"
    idata.to_netcdf(str(path))
    from pyrovae.infer.diagnostics import _arviz

    az = _arviz()
    loaded = az.from_netcdf(str(path))
    assert dict(loaded.posterior["z_exact"].sizes) == {"chain": 4, "draw": 10, "point": 2, "latent": 3}
    assert loaded.posterior["point"].values.tolist() == [1, 3]
    assert loaded.observed_data["x"].shape == (2, 6)
    assert torch.allclose(torch.as_tensor(loaded.posterior["z_other"].values).reshape(40, 2, 3), z + 1.0)
    summary = az.summary(loaded, kind="stats")
    assert len(summary) == 2 * 2 * 3
    with pytest.raises(ValueError, match="divisible"):
        to_inference_data({"exact": z[:39]}, x[index], [1, 3])
