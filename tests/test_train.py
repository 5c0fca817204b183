"""fit(): training improves the bound, per-datapoint rows stay put, resume is exact, bad input fails."""

from __future__ import annotations

import math

import pyro
import pytest
import torch

from pyrovae import (
    TrainConfig,
    build,
    fit,
    importance_sampling,
    linear_gaussian,
    load_mnist,
    make_objective,
    optimize_local_guide,
)
from pyrovae.data import Dataset, index_batches
from pyrovae.infer.loop import Hook
from pyrovae.train import evaluation_data


def _paired_improvement(before: torch.Tensor, after: torch.Tensor) -> tuple[float, float]:
    diff = after - before
    return diff.mean().item(), diff.std().item() / math.sqrt(diff.numel())


def _elbo_per_point(model, guide, x, num_samples=20):
    index = torch.arange(x.shape[0])
    return importance_sampling(model, guide, x, index, x.shape[0], num_samples=num_samples).elbo


def test_short_mnist_run_improves_test_bound(mnist_root):
    full = load_mnist(mnist_root)
    dataset = Dataset(
        name="mnist", train=full.train[:3000], test=full.test[:300], likelihood="bernoulli",
        binarize="dynamic", image_shape=full.image_shape,
    )
    config = TrainConfig(z_dim=10, hidden_sizes=(100,)).resolved()
    model, guide = build(config, dataset)
    x_test = evaluation_data(dataset)
    before = _elbo_per_point(model, guide, x_test)
    # 3 epochs of 60 steps = 180 steps.
    history = fit(model, guide, dataset, make_objective("elbo"), epochs=3, batch_size=50, lr=3e-3, progress=False)
    after = _elbo_per_point(model, guide, x_test)
    gain, se = _paired_improvement(before, after)
    assert gain > 5 * se and gain > 50, (gain, se)
    assert len(history.train_bound) == 3 and all(b is not None for b in history.test_bound)
    assert history.train_bound[-1] > history.train_bound[0]


def test_every_guide_trains_in_the_same_model():
    dataset = linear_gaussian(num_train=200, num_test=50, x_dim=6, z_dim=2, seed=1)
    x = dataset.train
    for guide_name in ("amortized", "per-datapoint", "prior"):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        config = TrainConfig(dataset="linear", guide=guide_name, batch_size=50).resolved()
        model, guide = build(config, dataset)
        index = torch.arange(x.shape[0])
        before = importance_sampling(model, guide, x, index, 200, num_samples=50).elbo
        fit(model, guide, dataset, make_objective("elbo"), epochs=15, batch_size=50, lr=2e-2,
            test_bound=False, progress=False)
        after = importance_sampling(model, guide, x, index, 200, num_samples=50).elbo
        gain, se = _paired_improvement(before, after)
        assert gain > 5 * se, (guide_name, gain, se)


def _rows(names):
    return {name: pyro.param(name).detach().clone() for name in names}


@pytest.mark.parametrize("optimizer", ["lazy", "plain-adam"])
def test_per_datapoint_rows_outside_batches_do_not_move(optimizer):
    # Rows that LEFT the batch after Adam has momentum for them are what must stay put: train on
    # batch A (rows 0..9) for 4 steps, then on batch B (rows 10..19) only. With the lazy optimizer
    # A's rows keep, bit for bit, the values A's last step gave them, rows never in a batch keep
    # their initial values; plain pyro.optim.Adam (the contrast, so the test has power) keeps
    # moving A's rows by their first-moment estimates though their gradient is zero.
    from pyro.infer import SVI

    from pyrovae import make_pyro_optimizer

    dataset = linear_gaussian(num_train=30, num_test=10, x_dim=4, z_dim=2, seed=2)
    config = TrainConfig(dataset="linear", guide="per-datapoint").resolved()
    model, guide = build(config, dataset)
    names = sorted(guide.local_param_names)
    x = dataset.train
    if optimizer == "lazy":
        optim = make_pyro_optimizer(1e-2, lazy_params=guide.local_param_names)
    else:
        optim = pyro.optim.Adam({"lr": 1e-2})
    svi = SVI(model, guide, optim, loss=make_objective("elbo"))
    batch_a, batch_b, never = torch.arange(0, 10), torch.arange(10, 20), torch.arange(20, 30)
    svi.step(x[batch_a], batch_a, 30)
    initial_never = _rows(names)
    for _ in range(3):
        svi.step(x[batch_a], batch_a, 30)
    after_a = _rows(names)
    previous = after_a
    for _ in range(3):
        svi.step(x[batch_b], batch_b, 30)
        current = _rows(names)
        for name in names:
            # B's rows move at every step they are in the batch, whatever the optimizer.
            assert (current[name][batch_b] != previous[name][batch_b]).any(-1).all(), name
            assert torch.equal(current[name][never], initial_never[name][never]), name
            moved_a = (current[name][batch_a] != previous[name][batch_a]).any(-1)
            if optimizer == "lazy":
                assert not moved_a.any(), (name, moved_a)
            else:
                assert moved_a.all(), (name, moved_a)
        previous = current
    if optimizer == "lazy":
        for name in names:
            assert torch.equal(previous[name][batch_a], after_a[name][batch_a]), name


class _RowWatch(Hook):
    """Through fit's own Trainer: after every step, the rows of the per-datapoint params that
    changed are exactly the rows of the step's batch."""

    def __init__(self, names, batch_size):
        self.names, self.batch_size, self.before, self.checked = sorted(names), batch_size, None, 0

    def on_step_end(self, trainer, state, result):
        rows = _rows(self.names)
        if self.before is not None:
            batch = state.order.split(self.batch_size)[state.step - 1]
            in_batch = torch.zeros(trainer.num_data, dtype=torch.bool)
            in_batch[batch] = True
            for name in self.names:
                moved = (rows[name] != self.before[name]).any(-1)
                assert torch.equal(moved, in_batch), (name, state.epoch, state.step, moved.nonzero().flatten())
            self.checked += 1
        self.before = rows


def test_fit_steps_per_datapoint_rows_lazily():
    # fit must wire the lazy update in: over several epochs of shuffled batches, each step moves
    # exactly the rows of its batch, also rows that were in the previous batch (Adam has momentum
    # for them; plain Adam, e.g. fit with lazy_params=frozenset(), moves them).
    dataset = linear_gaussian(num_train=40, num_test=10, x_dim=4, z_dim=2, seed=5)
    config = TrainConfig(dataset="linear", guide="per-datapoint").resolved()
    model, guide = build(config, dataset)
    watch = _RowWatch(guide.local_param_names, 10)
    fit(model, guide, dataset, make_objective("elbo"), epochs=3, batch_size=10, lr=1e-2, test_bound=False,
        progress=False, hooks=[watch])
    assert watch.checked == 3 * 4 - 1


@pytest.mark.parametrize("local_steps", [0, 3])
def test_resume_continues_exactly(tmp_path, local_steps):
    dataset = linear_gaussian(num_train=120, num_test=30, x_dim=5, z_dim=2, seed=3)
    config = TrainConfig(dataset="linear", guide="per-datapoint", epochs=4, batch_size=40,
                         local_steps=local_steps).resolved()

    def run(epochs, resume, path):
        pyro.clear_param_store()
        pyro.set_rng_seed(123)  # a resumed run must not depend on the seed state at start
        model, guide = build(config, dataset)
        history = fit(model, guide, dataset, make_objective("iwae", 3), epochs=epochs, batch_size=40,
                      lr=1e-2, seed=7, checkpoint_path=path, resume=resume, config=config.to_dict(),
                      progress=False, local_steps=local_steps)
        return model, history

    model_full, history_full = run(4, False, tmp_path / "full.pt")
    loc_full = pyro.param("local.z_loc").detach().clone()
    run(2, False, tmp_path / "split.pt")
    model_split, history_split = run(4, True, tmp_path / "split.pt")
    loc_split = pyro.param("local.z_loc").detach().clone()
    assert history_split.epoch == [1, 2, 3, 4]
    assert history_split.train_bound == pytest.approx(history_full.train_bound, rel=0, abs=0)
    assert torch.equal(loc_split, loc_full)
    assert torch.equal(model_split.decoder.weight, model_full.decoder.weight)


def test_resume_refuses_a_different_config(tmp_path):
    dataset = linear_gaussian(num_train=40, num_test=10, x_dim=3, z_dim=1, seed=0)
    config = TrainConfig(dataset="linear", batch_size=20).resolved()
    model, guide = build(config, dataset)
    path = tmp_path / "c.pt"
    fit(model, guide, dataset, make_objective("elbo"), epochs=1, batch_size=20, checkpoint_path=path,
        config=config.to_dict(), progress=False)
    other = TrainConfig(dataset="linear", batch_size=20, lr=0.5).resolved()
    with pytest.raises(ValueError, match="config differs"):
        fit(model, guide, dataset, make_objective("elbo"), epochs=2, batch_size=20, checkpoint_path=path,
            resume=True, config=other.to_dict(), progress=False)


def test_test_time_inference_reaches_the_exact_posterior():
    dataset = linear_gaussian(num_train=10, num_test=64, x_dim=6, z_dim=2, noise_scale=0.5, seed=4)
    t = dataset.truth
    from pyrovae import LinearGaussian

    model = LinearGaussian(6, 2, noise_scale=t["noise_scale"], weight=t["weight"], bias=t["bias"])
    x = dataset.test
    guide = optimize_local_guide(model, x, 2, steps=1500, lr=2e-2, num_particles=64)
    posterior = model.posterior(x)
    loc = pyro.param("test.z_loc").detach()
    # The optimal mean-field Gaussian of a Gaussian posterior has the exact posterior mean.
    assert torch.allclose(loc, posterior.mean, atol=0.05), (loc - posterior.mean).abs().max()
    # ... and precision equal to the diagonal of the posterior precision.
    scale = pyro.param("test.z_scale").detach()
    expected = posterior.precision_matrix.diagonal(dim1=-2, dim2=-1).rsqrt()
    assert torch.allclose(scale, expected, rtol=0.05)
    assert guide.num_data == 64


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.rand(20, 1, 4), "2-D"),
        (torch.full((20, 4), float("nan")), "NaN"),
        (torch.rand(20, 4) * 255, r"\[0, 1\]"),
    ],
)
def test_bad_data_is_a_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        Dataset(name="bad", train=bad, test=torch.rand(5, 4), likelihood="bernoulli")


def test_fit_rejects_bad_arguments():
    dataset = linear_gaussian(num_train=20, num_test=5, x_dim=3, z_dim=1)
    model, guide = build(TrainConfig(dataset="linear").resolved(), dataset)
    with pytest.raises(ValueError, match="batch_size"):
        fit(model, guide, dataset, make_objective("elbo"), epochs=1, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="lr"):
        fit(model, guide, dataset, make_objective("elbo"), epochs=1, lr=-1.0, progress=False)


def test_config_round_trips_and_validates():
    config = TrainConfig(dataset="gmm", objective="iwae", num_particles=5, hidden_sizes=(32, 16)).resolved()
    assert TrainConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="objective"):
        TrainConfig(objective="kl")
    with pytest.raises(ValueError, match="num_particles"):
        TrainConfig(num_particles=0)
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict({"learning_rate": 1.0})


# ---------------------------------------------------------------------------------------------
# Local steps of a per-datapoint guide (fit(..., local_steps=T))


def _per_datapoint_run(dataset, local_steps, epochs=3):
    config = TrainConfig(dataset="linear", guide="per-datapoint", batch_size=40, local_steps=local_steps).resolved()
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model, guide = build(config, dataset)
    fit(model, guide, dataset, make_objective("elbo"), epochs=epochs, batch_size=40, lr=1e-2, seed=0,
        progress=False, local_steps=local_steps, local_lr=0.05)
    return model, guide


def test_local_steps_bring_the_rows_to_the_posterior():
    # One joint Adam step per visit leaves each row near its N(0, I) start; 20 local steps per
    # visit bring it to the posterior mean of the current model (exact: linear-Gaussian).
    dataset = linear_gaussian(num_train=120, num_test=30, x_dim=5, z_dim=2, seed=3)
    errors = {}
    for steps in (0, 20):
        model, _ = _per_datapoint_run(dataset, steps)
        with torch.no_grad():
            posterior = model.posterior(dataset.train)
            sd = posterior.covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt()
            errors[steps] = ((pyro.param("local.z_loc") - posterior.loc) / sd).abs().mean().item()
    # Measured 0.10 and 0.48 posterior standard deviations.
    assert errors[20] < 0.2 and errors[0] > 3 * errors[20], errors


def test_local_steps_hold_the_rows_during_the_decoder_step():
    # One epoch, one batch of all points: the rows after fit are exactly those the refinement
    # alone gives (same draws), so the decoder step did not move them; the decoder did move.
    dataset = linear_gaussian(num_train=40, num_test=10, x_dim=5, z_dim=2, seed=4)
    config = TrainConfig(dataset="linear", guide="per-datapoint", batch_size=40, local_steps=4).resolved()
    pyro.clear_param_store()
    model, guide = build(config, dataset)
    weight = model.decoder.weight.detach().clone()
    order = torch.cat(list(index_batches(40, 40, generator=torch.Generator().manual_seed(5))))
    pyro.set_rng_seed(5)
    guide.refine_rows(model, dataset.train[order], order, 4, 0.05)
    refined = pyro.param("local.z_loc").detach().clone()
    assert not torch.equal(refined, torch.zeros_like(refined))

    pyro.clear_param_store()
    model.decoder.weight.data.copy_(weight)
    fit(model, guide, dataset, make_objective("elbo"), epochs=1, batch_size=40, lr=1e-2, seed=5, progress=False,
        test_bound=False, local_steps=4, local_lr=0.05)
    assert torch.equal(pyro.param("local.z_loc").detach(), refined)
    assert not torch.equal(model.decoder.weight.detach(), weight)


def test_refine_rows_moves_only_the_batch_rows():
    dataset = linear_gaussian(num_train=30, num_test=10, x_dim=5, z_dim=2, seed=4)
    config = TrainConfig(dataset="linear", guide="per-datapoint").resolved()
    pyro.clear_param_store()
    model, guide = build(config, dataset)
    weight = model.decoder.weight.detach().clone()
    index = torch.tensor([2, 3, 5, 7, 11, 13, 17, 19, 23, 29])
    guide.refine_rows(model, dataset.train[index], index, 3, 0.05)
    moved = (pyro.param("local.z_loc").detach() != 0).any(-1) | (pyro.param("local.z_scale").detach() != 1).any(-1)
    in_batch = torch.zeros(30, dtype=torch.bool)
    in_batch[index] = True
    assert torch.equal(moved, in_batch)
    assert torch.equal(model.decoder.weight.detach(), weight) and model.decoder.weight.grad is None
    # Rows refined earlier (no longer at their start) stay put while another batch is refined,
    # and that batch's rows, some of them refined before, all move.
    before = {name: pyro.param(name).detach().clone() for name in ("local.z_loc", "local.z_scale")}
    other = torch.tensor([0, 1, 2, 3, 4, 5])  # 2, 3, 5 were in the first batch
    guide.refine_rows(model, dataset.train[other], other, 3, 0.05)
    in_other = torch.zeros(30, dtype=torch.bool)
    in_other[other] = True
    for name, value in before.items():
        now = pyro.param(name).detach()
        assert torch.equal(now[~in_other], value[~in_other]), name
        assert (now[in_other] != value[in_other]).any(-1).all(), name
    with pytest.raises(ValueError, match="points 0..29 only"):
        guide.refine_rows(model, dataset.train[:2], torch.tensor([0, 30]), 1)


def test_local_steps_need_a_per_datapoint_guide():
    dataset = linear_gaussian(num_train=40, num_test=10, x_dim=3, z_dim=1, seed=0)
    with pytest.raises(ValueError, match="guide='per-datapoint'"):
        TrainConfig(dataset="linear", guide="amortized", local_steps=2)
    with pytest.raises(ValueError, match="local_steps must be an integer >= 0"):
        TrainConfig(dataset="linear", guide="per-datapoint", local_steps=-1)
    model, guide = build(TrainConfig(dataset="linear").resolved(), dataset)
    with pytest.raises(ValueError, match="needs a per-datapoint guide"):
        fit(model, guide, dataset, make_objective("elbo"), epochs=1, batch_size=40, progress=False, local_steps=2)
