"""Tests of pyrovae.infer.optim: LazyAdam against torch.optim.Adam, lazy rows, Pyro wrapper, state."""

from __future__ import annotations

import io
import pathlib

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyrovae.infer.optim import LazyAdam, make_pyro_optimizer
from pyrovae.runtime.checkpoint import load_checkpoint, save_checkpoint


def _quadratic(seed: int = 0):
    """A random convex quadratic in two parameters: sum ||A x - b||^2 + ||y - c||^2."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(6, 5, generator=generator)
    b = torch.randn(6, 3, generator=generator)
    c = torch.randn(4, generator=generator)
    x0 = torch.randn(5, 3, generator=generator)
    y0 = torch.randn(4, generator=generator)

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (a @ x - b).pow(2).sum() + (y - c).pow(2).sum()

    return loss, x0, y0


def _run(optimizer_cls, loss, x0, y0, num_steps, lr_schedule=None, **kwargs):
    x = x0.clone().requires_grad_()
    y = y0.clone().requires_grad_()
    optimizer = optimizer_cls([x, y], **kwargs)
    trajectory = []
    for step in range(num_steps):
        if lr_schedule is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_schedule(step)
        optimizer.zero_grad()
        loss(x, y).backward()
        optimizer.step()
        trajectory.append((x.detach().clone(), y.detach().clone()))
    return trajectory


@pytest.mark.parametrize("lazy", [False, True], ids=["dense", "lazy-all-rows-active"])
def test_matches_torch_adam(lazy: bool) -> None:
    # With every row active at every step, per-row step counts equal the global one, so the lazy
    # path must reproduce Adam too.
    loss, x0, y0 = _quadratic()
    options = dict(lr=0.05, betas=(0.8, 0.99), eps=1e-8)
    ours = _run(LazyAdam, loss, x0, y0, 20, lazy=lazy, **options)
    reference = _run(torch.optim.Adam, loss, x0, y0, 20, **options)
    for step, ((x, y), (x_ref, y_ref)) in enumerate(zip(ours, reference)):
        assert torch.allclose(x, x_ref, atol=1e-6, rtol=0), step
        assert torch.allclose(y, y_ref, atol=1e-6, rtol=0), step
    assert not torch.allclose(ours[-1][0], x0, atol=1e-2), "the trajectory should go somewhere"


@pytest.mark.parametrize("lazy", [False, True], ids=["dense", "lazy"])
def test_lr_decay_is_a_geometric_schedule(lazy: bool) -> None:
    loss, x0, y0 = _quadratic(1)
    ours = _run(LazyAdam, loss, x0, y0, 15, lr=0.1, lr_decay=0.8, lazy=lazy)
    reference = _run(torch.optim.Adam, loss, x0, y0, 15, lr_schedule=lambda k: 0.1 * 0.8**k)
    undecayed = _run(torch.optim.Adam, loss, x0, y0, 15, lr=0.1)
    for (x, y), (x_ref, y_ref) in zip(ours, reference):
        assert torch.allclose(x, x_ref, atol=1e-6, rtol=0) and torch.allclose(y, y_ref, atol=1e-6, rtol=0)
    assert not torch.allclose(ours[-1][0], undecayed[-1][0], atol=1e-3)


def _alternating_rows(optimizer_cls, num_steps: int, **kwargs):
    """Rows 0, 2, 4 are in the batch on even steps, rows 1, 3, 5 on odd steps, row 6 never."""
    generator = torch.Generator().manual_seed(3)
    target = torch.randn(7, 3, generator=generator)
    param = torch.randn(7, 3, generator=generator).requires_grad_()
    optimizer = optimizer_cls([param], **kwargs)
    history = [param.detach().clone()]
    batches = []
    for step in range(num_steps):
        rows = torch.tensor([0, 2, 4]) if step % 2 == 0 else torch.tensor([1, 3, 5])
        optimizer.zero_grad()
        (param[rows] - target[rows]).pow(2).sum().backward()
        optimizer.step()
        history.append(param.detach().clone())
        batches.append(rows)
    return history, batches, target, param, optimizer


def test_rows_outside_the_batch_do_not_move() -> None:
    history, batches, _, param, optimizer = _alternating_rows(LazyAdam, 8, lr=0.1, lazy=True)
    for step, rows in enumerate(batches):
        outside = torch.ones(7, dtype=torch.bool)
        outside[rows] = False
        before, after = history[step], history[step + 1]
        assert torch.equal(after[outside], before[outside]), step
        assert (after[rows] != before[rows]).all(), step
    assert torch.equal(history[-1][6], history[0][6])
    state = optimizer.state[param]
    assert state["step"].tolist() == [4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 0.0]
    assert (state["exp_avg"][6] == 0).all() and (state["exp_avg_sq"][6] == 0).all()

    # Plain Adam keeps moving rows that left the batch: the property above is not automatic.
    adam_history, *_ = _alternating_rows(torch.optim.Adam, 3, lr=0.1)
    assert not torch.equal(adam_history[2][0], adam_history[1][0])


def test_each_row_follows_adam_on_its_own_visits() -> None:
    # The loss is separable across rows, so row r under LazyAdam must follow torch Adam run on
    # row r alone, stepping only when r was in the batch (per-row bias correction).
    history, batches, target, _, _ = _alternating_rows(LazyAdam, 10, lr=0.1, lazy=True)
    for row in range(6):
        value = history[0][row].clone().requires_grad_()
        adam = torch.optim.Adam([value], lr=0.1)
        for step, rows in enumerate(batches):
            if row in rows.tolist():
                adam.zero_grad()
                (value - target[row]).pow(2).sum().backward()
                adam.step()
            assert torch.allclose(history[step + 1][row], value.detach(), atol=1e-6, rtol=0), (row, step)


def test_state_dict_round_trip() -> None:
    generator = torch.Generator().manual_seed(5)
    target = torch.randn(6, 2, generator=generator)
    weight0 = torch.randn(2, 2, generator=generator)
    rows0 = torch.randn(6, 2, generator=generator)

    def make():
        weight = weight0.clone().requires_grad_()
        rows = rows0.clone().requires_grad_()
        optimizer = LazyAdam(
            [{"params": [weight]}, {"params": [rows], "lazy": True}], lr=0.05, lr_decay=0.95
        )
        return weight, rows, optimizer

    def take_steps(weight, rows, optimizer, steps):
        for step in steps:
            index = torch.tensor([step % 6, (step + 1) % 6])
            optimizer.zero_grad()
            (rows[index] @ weight - target[index]).pow(2).sum().backward()
            optimizer.step()

    weight, rows, optimizer = make()
    take_steps(weight, rows, optimizer, range(5))
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    weight2, rows2, optimizer2 = make()
    with torch.no_grad():
        weight2.copy_(weight)
        rows2.copy_(rows)
    optimizer2.load_state_dict(saved)
    lazy_state = optimizer2.state[rows2]
    assert lazy_state["step"].dtype == torch.float32 and lazy_state["step"].shape == (6,)
    assert optimizer2.param_groups[1]["lazy"] and optimizer2.param_groups[1]["num_steps"] == 5

    take_steps(weight, rows, optimizer, range(5, 12))
    take_steps(weight2, rows2, optimizer2, range(5, 12))
    assert torch.equal(weight, weight2) and torch.equal(rows, rows2)


def test_option_checks() -> None:
    x = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="lr_decay"):
        LazyAdam([x], lr_decay=0.0)
    with pytest.raises(ValueError, match="betas"):
        LazyAdam([x], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr must be positive"):
        LazyAdam([x], lr=-1.0)
    with pytest.raises(ValueError, match="lazy=False"):
        LazyAdam([torch.zeros((), requires_grad=True)], lazy=True)
    with pytest.raises(ValueError, match=r"\{'z_loc'\}"):
        make_pyro_optimizer(0.1, lazy_params="z_loc")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Pyro wrapper

NUM_DATA = 8


def _model(x: torch.Tensor, index: torch.Tensor) -> None:
    shift = pyro.param("shift", torch.zeros(2))
    with pyro.plate("data", NUM_DATA, subsample=index):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z + shift, 0.5).to_event(1), obs=x[index])


def _guide(x: torch.Tensor, index: torch.Tensor) -> None:
    with pyro.plate("data", NUM_DATA, subsample=index):
        z_loc = pyro.param("z_loc", torch.zeros(NUM_DATA, 2), event_dim=1)
        z_scale = pyro.param(
            "z_scale", torch.ones(NUM_DATA, 2), constraint=dist.constraints.positive, event_dim=1
        )
        pyro.sample("z", dist.Normal(z_loc, z_scale).to_event(1))


def _batches(num_steps: int, start: int = 0):
    return [torch.tensor([0, 1, 2]) if step % 2 == 0 else torch.tensor([3, 4, 5]) for step in range(start, num_steps)]


def test_pyro_optimizer_leaves_unvisited_rows_alone() -> None:
    x = torch.randn(NUM_DATA, 2, generator=torch.Generator().manual_seed(0))
    optim = make_pyro_optimizer(0.05, lazy_params={"z_loc", "z_scale"})
    svi = SVI(_model, _guide, optim, Trace_ELBO())
    svi.step(x, torch.tensor([0, 1, 2]))
    previous = pyro.param("z_loc").detach().clone()
    for index in _batches(7, start=1):
        svi.step(x, index)
        current = pyro.param("z_loc").detach().clone()
        outside = torch.ones(NUM_DATA, dtype=torch.bool)
        outside[index] = False
        assert torch.equal(current[outside], previous[outside])
        assert (current[index] != previous[index]).all()
        previous = current
    assert (pyro.param("z_loc")[6:] == 0).all(), "rows never in a batch keep their initial value"

    store = pyro.get_param_store()
    lazy_flags = {store.param_name(p): opt.param_groups[0]["lazy"] for p, opt in optim.optim_objs.items()}
    assert lazy_flags == {"shift": False, "z_loc": True, "z_scale": True}
    assert all(isinstance(opt, LazyAdam) for opt in optim.optim_objs.values())


def test_pyro_optimizer_predicate() -> None:
    x = torch.randn(NUM_DATA, 2, generator=torch.Generator().manual_seed(0))
    optim = make_pyro_optimizer(0.05, lr_decay=0.99, lazy_params=lambda name: name.startswith("z_"))
    SVI(_model, _guide, optim, Trace_ELBO()).step(x, torch.tensor([0, 1]))
    store = pyro.get_param_store()
    groups = {store.param_name(p): opt.param_groups[0] for p, opt in optim.optim_objs.items()}
    assert {name: group["lazy"] for name, group in groups.items()} == {
        "shift": False,
        "z_loc": True,
        "z_scale": True,
    }
    assert all(group["lr_decay"] == 0.99 and group["num_steps"] == 1 for group in groups.values())


def test_pyro_optimizer_state_round_trips_through_a_checkpoint(tmp_path: pathlib.Path) -> None:
    x = torch.randn(NUM_DATA, 2, generator=torch.Generator().manual_seed(1))
    optim = make_pyro_optimizer(0.05, lr_decay=0.97, lazy_params={"z_loc", "z_scale"})
    svi = SVI(_model, _guide, optim, Trace_ELBO())
    for index in _batches(4):
        svi.step(x, index)
    save_checkpoint(
        tmp_path / "svi.pt",
        {"param_store": pyro.get_param_store().get_state(), "optim": optim.get_state()},
    )

    def continue_training(svi: SVI) -> dict[str, torch.Tensor]:
        pyro.set_rng_seed(42)
        for index in _batches(9, start=4):
            svi.step(x, index)
        return {name: pyro.param(name).detach().clone() for name in ("shift", "z_loc", "z_scale")}

    expected = continue_training(svi)

    pyro.clear_param_store()
    loaded = load_checkpoint(tmp_path / "svi.pt")
    pyro.get_param_store().set_state(loaded["param_store"])
    resumed_optim = make_pyro_optimizer(0.05, lr_decay=0.97, lazy_params={"z_loc", "z_scale"})
    resumed_optim.set_state(loaded["optim"])
    got = continue_training(SVI(_model, _guide, resumed_optim, Trace_ELBO()))
    for name in expected:
        assert torch.equal(got[name], expected[name]), name

    # Without the optimizer state the continuation differs, so the check above has teeth.
    pyro.clear_param_store()
    pyro.get_param_store().set_state(load_checkpoint(tmp_path / "svi.pt")["param_store"])
    fresh = continue_training(SVI(_model, _guide, make_pyro_optimizer(0.05, lr_decay=0.97, lazy_params={"z_loc", "z_scale"}), Trace_ELBO()))
    assert not torch.equal(fresh["z_loc"], expected["z_loc"])
