"""The fast path (pyrovae.infer.replay): a traced and replayed loss_and_grads is the objective's own.

Every objective of the registry, with subsampling, β, per-datapoint rows and DReG's gradient
hooks: for the same random seed and the same params, the replayed step's loss and gradients equal
those of ``objective.loss_and_grads`` run by Pyro (float64, to rounding). Steps that cannot be
traced stay eager and say why; a changed structure is traced anew; a Python value the model reads
that changes before the first replay is caught by the verification.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyrovae.guides import AmortizedGuide, PerDatapointGuide
from pyrovae.infer.loop import Hook
from pyrovae.infer.objectives import OBJECTIVES, make_objective
from pyrovae.infer.optim import make_pyro_optimizer
from pyrovae.infer.replay import LossAndGradsReplay, ReplayedELBO, choose_backend
from pyrovae.models import VAE
from pyrovae.nets import Decoder, GaussianEncoder
from pyrovae.train import fit
from pyrovae.train.step import GradientStep

pytestmark = pytest.mark.usefixtures("float64")

NUM_DATA, X_DIM, Z_DIM, BATCH = 40, 12, 3, 8


def _batch(batch: int = BATCH, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(NUM_DATA, generator=generator)[:batch]
    x = torch.bernoulli(torch.full((batch, X_DIM), 0.4, dtype=torch.float64), generator=generator)
    return x, index


def _pair(beta: float = 1.0, per_datapoint: bool = False, activation: str = "softplus"):
    torch.manual_seed(0)
    decoder = Decoder(Z_DIM, X_DIM, (16,), activation)
    model = VAE(decoder, Z_DIM, beta=beta)
    if per_datapoint:
        guide = PerDatapointGuide(NUM_DATA, Z_DIM, beta=beta)
    else:
        guide = AmortizedGuide(GaussianEncoder(X_DIM, Z_DIM, (16,), activation), beta=beta)
    return model, guide


def _eager(objective, model, guide, x, index, seed: int):
    pyro.set_rng_seed(seed)
    with pyro.poutine.trace(param_only=True) as capture:
        loss = objective.loss_and_grads(model, guide, x, index, num_data=NUM_DATA)
    params = {name: site["value"].unconstrained() for name, site in capture.trace.nodes.items()}
    grads = {name: p.grad.clone() for name, p in params.items() if p.grad is not None}
    for p in params.values():
        p.grad = None
    return float(loss), grads


def _replayed(replay, model, guide, x, index, seed: int):
    pyro.set_rng_seed(seed)
    loss, params = replay(model, guide, x, index, num_data=NUM_DATA)
    grads = {name: p.grad.clone() for name, p in params.items() if p.grad is not None}
    for p in params.values():
        p.grad = None
    return loss, grads


def _warm(replay, model, guide, x, index, calls: int = 3) -> None:
    """The first calls of a structure: eager, trace, verify."""
    for i in range(calls):
        _replayed(replay, model, guide, x, index, seed=100 + i)


def _assert_same(eager, replayed) -> None:
    (loss, grads), (loss_r, grads_r) = eager, replayed
    assert loss_r == pytest.approx(loss, rel=1e-12, abs=1e-9)
    assert set(grads_r) == set(grads) and grads
    for name in grads:
        torch.testing.assert_close(grads_r[name], grads[name], rtol=1e-10, atol=1e-12, msg=name)


# The objectives and the options that make each one traceable and non-trivial.
CASES = {
    "elbo": {}, "elbo-analytic": {}, "elbo-stl": {}, "iwae": {"num_particles": 4},
    "iwae-stl": {"num_particles": 4}, "iwae-dreg": {"num_particles": 4},
    "score": {"num_particles": 3},  # K>1: the leave-one-out baseline (K=1 is tested below: it stays eager)
    "miwae": {"num_particles": 2, "num_groups": 3}, "piwae": {"num_particles": 2, "num_groups": 3},
    "ciwae": {"num_particles": 3, "ciwae_beta": 0.3},
}


#: Objectives whose step reads values into Python, so it is never traced (tested below).
EAGER_CASES = {"elbo-enum": {"num_particles": 2}}  # Pyro's TraceEnum_ELBO


def test_every_registered_objective_has_a_case():
    assert set(CASES) | set(EAGER_CASES) == set(OBJECTIVES) and not set(CASES) & set(EAGER_CASES)


@pytest.mark.parametrize("name", sorted(EAGER_CASES))
def test_an_objective_that_reads_values_stays_eager_with_pyros_results(name: str) -> None:
    pyro.clear_param_store()
    model, guide = _pair()
    options = dict(EAGER_CASES[name])
    objective = make_objective(name, options.pop("num_particles", 1), **options)
    replay = LossAndGradsReplay(objective)
    x, index = _batch()
    _warm(replay, model, guide, x, index)
    assert replay.stats.traced == 0 and replay.stats.replayed == 0, replay.status
    _assert_same(_eager(objective, model, guide, x, index, seed=2), _replayed(replay, model, guide, x, index, seed=2))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("beta", [1.0, 0.5], ids=["beta1", "beta0.5"])
def test_replay_equals_the_objective_for_every_registered_objective(name: str, beta: float) -> None:
    pyro.clear_param_store()
    model, guide = _pair(beta=beta)
    options = dict(CASES[name])
    objective = make_objective(name, options.pop("num_particles", 1), **options)
    replay = LossAndGradsReplay(objective)
    x, index = _batch()
    _warm(replay, model, guide, x, index)
    assert (replay.stats.traced, replay.stats.verified) == (1, 1), replay.status
    replayed = _replayed(replay, model, guide, x, index, seed=7)
    assert replay.stats.replayed == 1, replay.status
    _assert_same(_eager(objective, model, guide, x, index, seed=7), replayed)


@pytest.mark.parametrize("name", ["elbo", "iwae-dreg"])
def test_replay_equals_the_objective_with_per_datapoint_rows(name: str) -> None:
    pyro.clear_param_store()
    model, guide = _pair(per_datapoint=True)
    objective = make_objective(name, 1 if name == "elbo" else 4)
    replay = LossAndGradsReplay(objective)
    x, index = _batch()
    _warm(replay, model, guide, x, index)
    replayed = _replayed(replay, model, guide, x, index, seed=3)
    assert replay.stats.replayed == 1, replay.status
    eager = _eager(objective, model, guide, x, index, seed=3)
    _assert_same(eager, replayed)
    # The rows' gradient is non-zero in the batch's rows only, in both.
    rows = [n for n in eager[1] if eager[1][n].shape[:1] == (NUM_DATA,)]
    assert rows
    outside = torch.ones(NUM_DATA, dtype=torch.bool)
    outside[index] = False
    for name_ in rows:
        assert replayed[1][name_][outside].abs().max() == 0
        assert replayed[1][name_][index].abs().max() > 0


def test_replay_draws_the_same_random_numbers_as_pyro() -> None:
    # Same seed -> same draws -> the generator ends in the same state (the verification checks
    # this too); a different seed gives a different loss, so the equality above is not vacuous.
    pyro.clear_param_store()
    model, guide = _pair()
    objective = make_objective("elbo")
    replay = LossAndGradsReplay(objective)
    x, index = _batch()
    _warm(replay, model, guide, x, index)
    loss_a, _ = _replayed(replay, model, guide, x, index, seed=11)
    state_a = torch.get_rng_state()
    eager_loss, _ = _eager(objective, model, guide, x, index, seed=11)
    assert torch.equal(torch.get_rng_state(), state_a)
    loss_b, _ = _replayed(replay, model, guide, x, index, seed=12)
    assert loss_a == pytest.approx(eager_loss, rel=1e-12) and loss_b != pytest.approx(loss_a, rel=1e-6)


def test_a_new_batch_shape_is_traced_anew_and_each_shape_replays_its_own_graph() -> None:
    pyro.clear_param_store()
    model, guide = _pair()
    objective = make_objective("iwae", 3)
    replay = LossAndGradsReplay(objective)
    batches = [_batch(BATCH), _batch(5, seed=1)]
    for x, index in batches:
        _warm(replay, model, guide, x, index)
    assert (replay.stats.traced, replay.stats.verified) == (2, 2), replay.status
    for x, index in batches:
        _assert_same(_eager(objective, model, guide, x, index, seed=5), _replayed(replay, model, guide, x, index, seed=5))
    assert replay.stats.replayed == 2


def test_a_step_that_reads_a_value_into_python_stays_eager_and_says_why() -> None:
    # ScoreFunctionELBO with K=1 keeps a moving-average baseline as a Python float (.item()):
    # the trace fails, the objective stays eager, and its results are Pyro's.
    pyro.clear_param_store()
    model, guide = _pair()
    objective = make_objective("score", 1)
    replay = LossAndGradsReplay(objective)
    x, index = _batch()
    _warm(replay, model, guide, x, index, calls=4)
    assert replay.stats.traced == 0 and replay.stats.replayed == 0
    assert "reads a tensor's value into Python" in replay.status, replay.status
    state = objective.get_state()
    eager = _eager(objective, model, guide, x, index, seed=2)
    objective.set_state(state)
    _assert_same(eager, _replayed(replay, model, guide, x, index, seed=2))


class _Knob:
    """A model whose log-likelihood weight is a Python attribute (the kind of value a trace bakes in)."""

    def __init__(self, model: VAE) -> None:
        self.model, self.weight = model, 1.0

    def __call__(self, x, index=None, num_data=None):
        with pyro.poutine.scale(scale=self.weight):
            return self.model(x, index, num_data)


def test_the_verification_catches_a_python_value_that_changed_since_the_trace() -> None:
    pyro.clear_param_store()
    inner, guide = _pair()
    model = _Knob(inner)
    objective = make_objective("elbo")
    replay = LossAndGradsReplay(objective)
    x, index = _batch()
    _replayed(replay, model, guide, x, index, seed=0)  # eager
    _replayed(replay, model, guide, x, index, seed=1)  # traced with weight 1
    model.weight = 0.5
    _replayed(replay, model, guide, x, index, seed=2)  # the verification sees weight 0.5 in Pyro's step
    assert replay.stats.verified == 0 and "instead of" in replay.status, replay.status
    _assert_same(_eager(objective, model, guide, x, index, seed=4), _replayed(replay, model, guide, x, index, seed=4))
    assert replay.stats.replayed == 0
    # reset() forgets the verdict: a new trace with the new value, verified.
    replay.reset()
    _warm(replay, model, guide, x, index)
    assert replay.stats.verified == 1
    _assert_same(_eager(objective, model, guide, x, index, seed=4), _replayed(replay, model, guide, x, index, seed=4))


def test_a_value_passed_as_an_argument_is_part_of_the_structure() -> None:
    # Pyro's examples anneal the KL by passing the factor to model and guide: a new value is a
    # new structure (traced anew), never a stale constant.
    pyro.clear_param_store()
    torch.manual_seed(0)
    decoder, encoder = Decoder(Z_DIM, X_DIM, (16,)), GaussianEncoder(X_DIM, Z_DIM, (16,))

    def model(x, annealing):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            with pyro.poutine.scale(scale=annealing):
                z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], Z_DIM), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x, annealing):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            loc, scale = encoder(x)
            with pyro.poutine.scale(scale=annealing):
                pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    objective = Trace_ELBO()
    replay = LossAndGradsReplay(objective)
    x, _ = _batch()
    for annealing in (0.2, 0.7):
        for seed in range(3):
            pyro.set_rng_seed(seed)
            _, params = replay(model, guide, x, annealing)
            for p in params.values():
                p.grad = None
    assert (replay.stats.traced, replay.stats.verified) == (2, 2), replay.status
    for annealing in (0.2, 0.7):
        pyro.set_rng_seed(9)
        loss_r, params = replay(model, guide, x, annealing)
        grads_r = {n: p.grad.clone() for n, p in params.items()}
        for p in params.values():
            p.grad = None
        pyro.set_rng_seed(9)
        loss = objective.loss_and_grads(model, guide, x, annealing)
        assert loss_r == pytest.approx(loss, rel=1e-12)
        for name, p in params.items():
            torch.testing.assert_close(grads_r[name], p.grad, rtol=1e-10, atol=1e-12)
            p.grad = None


def test_replayed_elbo_under_pyro_svi_follows_plain_svi() -> None:
    # A user's own Pyro model and guide, Pyro's SVI and optimizer: ReplayedELBO(Trace_ELBO())
    # takes the same steps as Trace_ELBO().
    x, _ = _batch()
    finals = []
    for loss_fn in (Trace_ELBO(), ReplayedELBO(Trace_ELBO())):
        pyro.clear_param_store()
        model, guide = _pair()
        pyro.set_rng_seed(0)
        svi = SVI(lambda x, model=model: model(x), lambda x, guide=guide: guide(x), pyro.optim.Adam({"lr": 0.05}), loss_fn)
        losses = [svi.step(x) for _ in range(8)]
        finals.append((losses, {n: v.detach().clone() for n, v in pyro.get_param_store().items()}))
    (losses, params), (losses_r, params_r) = finals
    assert losses_r == pytest.approx(losses, rel=1e-10)
    assert set(params) == set(params_r)
    for name in params:
        torch.testing.assert_close(params_r[name], params[name], rtol=1e-9, atol=1e-12)
    assert not torch.allclose(params["decoder$$$0.weight"], _pair()[0].decoder[0].weight), "training moved the weights"


def test_fit_with_the_fast_path_follows_fit_without_it() -> None:
    # Five epochs of fit, replayed against eager: the same losses and final params (the first
    # epoch holds the eager, traced and verified steps; the rest are replays).
    x = torch.bernoulli(torch.full((NUM_DATA, X_DIM), 0.3, dtype=torch.float64), generator=torch.Generator().manual_seed(3))
    results = {}
    for fast_path in ("eager", "replay"):
        pyro.clear_param_store()
        model, guide = _pair()
        history = fit(model, guide, (x, x[:10]), make_objective("iwae", 3), epochs=5, batch_size=16, lr=1e-2,
                      progress=False, handle_signals=False, fast_path=fast_path)
        results[fast_path] = (history.train_bound, {n: v.detach().clone() for n, v in pyro.get_param_store().items()})
    (bounds, params), (bounds_r, params_r) = results["eager"], results["replay"]
    assert bounds_r == pytest.approx(bounds, rel=1e-9)
    for name in params:
        torch.testing.assert_close(params_r[name], params[name], rtol=1e-8, atol=1e-10)


def test_gradient_step_reports_how_it_ran() -> None:
    pyro.clear_param_store()
    model, guide = _pair()
    step = GradientStep(model, guide, make_objective("elbo"), make_pyro_optimizer(1e-2))
    x, index = _batch()
    for _ in range(5):
        step(x, index, NUM_DATA)
    assert step.loss_and_grads.status == "eager 1, traced 1, verified 1, replayed 2"
    eager = GradientStep(model, guide, make_objective("elbo"), make_pyro_optimizer(1e-2), fast_path=False)
    eager(x, index, NUM_DATA)
    assert eager.loss_and_grads.status.startswith("eager 1, traced 0")


def test_fast_path_settings_and_their_errors() -> None:
    assert choose_backend(True) == "replay" and choose_backend(False) == "eager"
    assert choose_backend("inductor") == "inductor"
    with pytest.raises(ValueError, match=r"fast_path must be one of \('eager', 'replay', 'inductor'\)"):
        choose_backend("fast")
    with pytest.raises(ValueError, match="unknown backend 'jit'"):
        LossAndGradsReplay(make_objective("elbo"), backend="jit")



def test_the_inductor_backend_compiles_the_graph_and_gives_the_same_step() -> None:
    # The one compiling test (~10-30 s): the compiled graph is verified against Pyro's step and
    # then equals it to rounding, drawing the same random numbers (fallback_random).
    pyro.clear_param_store()
    model, guide = _pair()
    objective = make_objective("iwae", 3)
    replay = LossAndGradsReplay(objective, backend="inductor")
    x, index = _batch()
    _warm(replay, model, guide, x, index)
    (graph,) = [g for g in replay._graphs.values() if g is not None]
    assert graph.compiled is not None and replay.stats.verified == 1, replay.status
    _assert_close = _eager(objective, model, guide, x, index, seed=8), _replayed(replay, model, guide, x, index, seed=8)
    (loss, grads), (loss_r, grads_r) = _assert_close
    assert replay.stats.replayed == 1
    assert loss_r == pytest.approx(loss, rel=1e-10)
    for name in grads:
        torch.testing.assert_close(grads_r[name], grads[name], rtol=1e-8, atol=1e-10, msg=name)


class _SpoilWeight(Hook):
    """After the ``at``-th step, one decoder weight becomes NaN (a tensor value, which a replayed
    step reads like any other)."""

    def __init__(self, at: int) -> None:
        self.at, self.steps = at, 0

    def on_step_end(self, trainer, state, result) -> None:  # type: ignore[no-untyped-def]
        self.steps += 1
        if self.steps == self.at:
            with torch.no_grad():
                pyro.get_param_store()["decoder$$$0.weight"].unconstrained()[0, 0] = float("nan")


def test_a_nan_on_the_fast_path_stops_fit_before_the_update() -> None:
    x = torch.bernoulli(torch.full((NUM_DATA, X_DIM), 0.3, dtype=torch.float64), generator=torch.Generator().manual_seed(3))
    pyro.clear_param_store()
    model, guide = _pair()
    with pytest.raises(FloatingPointError, match="at epoch 3, step 2 of 3"):
        fit(model, guide, (x, x[:10]), make_objective("elbo"), epochs=4, batch_size=16, progress=False,
            handle_signals=False, fast_path="replay", hooks=[_SpoilWeight(7)])
    # Batches of 16 are eager, traced, verified (steps 1, 2, 4), then replayed (5, 7, 8): step 8, a
    # replay, found the NaN; no other param moved in that step.
    store = pyro.get_param_store()
    finite = [name for name, value in store.items() if name != "decoder$$$0.weight" and torch.isfinite(value).all()]
    assert sorted(finite) == sorted(name for name in store if name != "decoder$$$0.weight")


@pytest.mark.parametrize("name", ["elbo", "iwae-dreg", "piwae"])
def test_the_default_replay_gives_pyros_bits(name: str) -> None:
    # No rewrite that changes a kernel (graph_passes.simplify is exact): the same bits as Pyro's
    # step, which is what keeps a resumed run bit for bit an uninterrupted one.
    pyro.clear_param_store()
    model, guide = _pair()
    options = dict(CASES[name])
    objective = make_objective(name, options.pop("num_particles", 1), **options)
    replay = LossAndGradsReplay(objective)
    x, index = _batch()
    _warm(replay, model, guide, x, index)
    loss_r, grads_r = _replayed(replay, model, guide, x, index, seed=21)
    loss, grads = _eager(objective, model, guide, x, index, seed=21)
    assert replay.stats.replayed == 1 and loss_r == loss
    for n in grads:
        assert torch.equal(grads_r[n], grads[n]), n


def test_simplify_removes_operations_and_keeps_the_bits() -> None:
    from torch.fx.experimental.proxy_tensor import make_fx

    from pyrovae.infer.graph_passes import simplify

    def f(x, w):
        ones = torch.ones(3, dtype=x.dtype)
        c = ones.log() + ones.pow(2)             # constants the step makes: folded
        a = (x * w).sum() + (x * w).sum()        # a repeated computation: once
        y = torch.zeros(3, dtype=x.dtype)
        y.add_(x)                                 # written in place: left alone
        noise = torch.empty(3, dtype=x.dtype).normal_()  # random: left alone
        return a + c.sum() + y.sum() + noise.sum(), w.t().t() * 2

    x, w = torch.randn(3), torch.randn(3, 3)
    module = make_fx(f)(x, w)
    before = len(module.graph.nodes)
    torch.manual_seed(0)
    expected = module(x, w)
    simplify(module)
    torch.manual_seed(0)
    got = module(x, w)
    assert len(module.graph.nodes) < before - 5, (before, len(module.graph.nodes))
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    targets = [n.target for n in module.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.add_.Tensor in targets and torch.ops.aten.normal_.default in targets
    assert targets.count(torch.ops.aten.mul.Tensor) == 2 and torch.ops.aten.t.default not in targets


def test_importance_sampling_replays_its_chunks_with_pyros_bits() -> None:
    # K = 7 chunks of 3 draws and one of 2, over two batches: the chunks after each call's first
    # run through one shared replayed function (eager, traced, verified, then replays), and every
    # estimate is bit for bit the eager one for the same seed.
    from pyrovae.infer import evaluate

    pyro.clear_param_store()
    model, guide = _pair()
    evaluate._CHUNKS.clear()
    results = {}
    for fast_path in ("eager", "replay"):
        out = []
        for batch in (_batch(), _batch(seed=1)):
            pyro.set_rng_seed(4)
            est = evaluate.importance_sampling(model, guide, *batch, NUM_DATA, num_samples=23, chunk_size=3,
                                               fast_path=fast_path)
            out.append((est.log_likelihood, est.elbo, est.ess))
        results[fast_path] = out
    for eager, replayed in zip(results["eager"], results["replay"]):
        assert all(torch.equal(a, b) for a, b in zip(eager, replayed))
    stats = [entry[2].stats for entry in evaluate._CHUNKS.values() if entry[2].backend == "replay"]
    assert sum(s.replayed for s in stats) >= 8 and sum(s.verified for s in stats) >= 1, stats


def test_the_config_offers_exactly_the_backends() -> None:
    # The CLI's --fast-path choices come from the config's Literal; the library's from BACKENDS.
    from typing import get_args

    from pyrovae.app.config import FastPathName, TrainConfig
    from pyrovae.infer.replay import BACKENDS

    assert set(get_args(FastPathName)) == set(BACKENDS)
    assert TrainConfig().fast_path == "replay" == choose_backend(True)


def test_verify_false_trusts_the_trace_and_a_knob_then_goes_unseen() -> None:
    # The contrast to the verification test: without it, a value changed after the trace is
    # replayed stale, which is why verify=True is the default.
    pyro.clear_param_store()
    inner, guide = _pair()
    model = _Knob(inner)
    objective = make_objective("elbo")
    replay = LossAndGradsReplay(objective, verify=False)
    x, index = _batch()
    _replayed(replay, model, guide, x, index, seed=0)
    _replayed(replay, model, guide, x, index, seed=1)
    model.weight = 0.5
    stale = _replayed(replay, model, guide, x, index, seed=2)
    assert replay.stats.verified == 0 and replay.stats.replayed == 1
    assert stale[0] != pytest.approx(_eager(objective, model, guide, x, index, seed=2)[0], rel=1e-6)


def test_a_replayed_function_with_gradients_enabled_runs_the_function() -> None:
    from pyrovae.infer.replay import ReplayedFunction

    w = torch.randn(3, requires_grad=True)
    f = ReplayedFunction(lambda x: (x * w).sum())
    x = torch.randn(3)
    for _ in range(4):
        out = f(x)
    assert out.requires_grad and f.stats.eager == 4 and f.stats.replayed == 0
    with torch.no_grad():
        for _ in range(4):
            out = f(x)
    assert f.stats.replayed == 1 and f.stats.verified == 1
    assert torch.equal(out, (x * w).sum().detach())
