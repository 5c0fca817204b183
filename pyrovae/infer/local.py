"""Test-time per-datapoint inference: a fresh Gaussian per point fitted with the model held fixed
(q* of the amortization gap), the same for any per-datapoint family (:func:`fit_local_guide`), and
the helpers that freeze parameters while it runs."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI
from torch.distributions import constraints
from tqdm.auto import tqdm

from pyrovae import params
from pyrovae.guides import PerDatapointGuide
from pyrovae.guides.semi_amortized import gaussian_elbo
from pyrovae.infer.loop import Hook, StepResult, Trainer, TrainState
from pyrovae.infer.optim import make_pyro_optimizer
from pyrovae.infer.weights import guess_max_plate_nesting


@dataclass
class LocalFitHistory:
    """Record of a test-time per-datapoint optimisation, in nats per data point (higher is better).

    :ivar step: the steps at which every point's ELBO was checked (0 is the start).
    :ivar elbo: mean over all points of the per-point ELBO at those steps, each point's estimated
        with the same fixed draws at every check (common random numbers); points that stopped
        count with their last value.
    :ivar num_active: points still being optimised after each check.
    :ivar seconds: wall-clock time since the start, at each check.
    :ivar step_elbo: after each step, the mean over all points of that step's one-draw ELBO
        estimates (stopped points at their last checked value): noisy, but at every step.
    :ivar stopped_at: ``(N,)`` the step at which each point stopped (the last step if it never did).
    :ivar final_elbo: ``(N,)`` each point's ELBO at its last check.
    """

    step: list[int] = field(default_factory=list)
    elbo: list[float] = field(default_factory=list)
    num_active: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    step_elbo: list[float] = field(default_factory=list)
    stopped_at: Optional[torch.Tensor] = None
    final_elbo: Optional[torch.Tensor] = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: per-point tensors become lists."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if not isinstance(v, torch.Tensor)}
        for name in ("stopped_at", "final_elbo"):
            value = getattr(self, name)
            out[name] = None if value is None else value.tolist()
        return out


@torch.no_grad()
def gaussian_guide_params(
    guide: Callable, x: torch.Tensor, batch_size: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (z_loc, z_scale) that a diagonal-Gaussian guide (amortized, semi-amortized or
    per-datapoint) gives each point of ``x`` (indexed ``0..N-1``), read from its ``"z"`` site."""
    num_data = x.shape[0]
    locs, scales = [], []
    for index in torch.arange(num_data, device=x.device).split(batch_size):
        with poutine.block():
            trace = poutine.trace(guide).get_trace(x[index], index, num_data)
        fn = trace.nodes["z"]["fn"]
        base = getattr(fn, "base_dist", fn)
        if not hasattr(base, "loc") or not hasattr(base, "scale"):
            raise ValueError(f"the guide's z site is a {type(base).__name__}, not a diagonal Gaussian")
        locs.append(base.loc.expand(len(index), -1))
        scales.append(base.scale.expand(len(index), -1))
    return torch.cat(locs), torch.cat(scales)


@contextlib.contextmanager
def frozen_params(freeze: Callable[[str], bool]) -> Iterator[None]:
    """Turn off ``requires_grad`` of the Pyro params (network weights included) whose names
    ``freeze`` selects, and restore it on exit.

    ``poutine.block(fn, hide_types=["param"])`` keeps SVI from *updating* a function's params, but
    autograd still computes and accumulates their ``.grad`` (which nothing then zeroes, so it leaks
    into the next optimiser that steps them); frozen params get no gradient at all.
    """
    store = pyro.get_param_store()
    tensors = [store[name].unconstrained() for name in list(store.keys()) if freeze(name)]  # type: ignore[attr-defined]  # Pyro's stub types store[name] as Tensor; it carries .unconstrained
    tensors = [t for t in tensors if t.requires_grad]
    for tensor in tensors:
        tensor.requires_grad_(False)
    try:
        with warnings.catch_warnings():
            # pyro.module notes that a frozen weight "was not registered"; it is, from before.
            warnings.filterwarnings("ignore", message=".*not registered in the param store because requires_grad=False")
            yield
    finally:
        for tensor in tensors:
            tensor.requires_grad_(True)


@contextlib.contextmanager
def _frozen_modules(modules: Any) -> Iterator[None]:
    # The model's own networks, frozen too: if the param store holds other tensors under their
    # names (a module built after another was registered under the same name), freezing the store
    # alone would leave the weights in use trainable, and autograd would compute (and leak) their
    # gradients at every step — 40 % of the time of a test-time optimisation.
    tensors = [p for module in modules for p in module.parameters() if p.requires_grad]
    for tensor in tensors:
        tensor.requires_grad_(False)
    try:
        yield
    finally:
        for tensor in tensors:
            tensor.requires_grad_(True)


class _Checks(Hook):
    # optimize_local_guide's bookkeeping after each step: the one-draw ELBO, the checks of the
    # stopping rule every `check_every` steps, the progress bar; stops when every point has.
    def __init__(
        self,
        check: Optional[Callable[[int], None]],
        history: LocalFitHistory,
        last: torch.Tensor,
        active: torch.Tensor,
        steps: int,
        check_every: int,
        progress: bool,
    ) -> None:
        self.check, self.history, self.last, self.active = check, history, last, active
        self.steps, self.check_every = steps, check_every
        self.bar = tqdm(total=steps, desc="test-time inference", leave=False, disable=not progress)

    def on_start(self, trainer: Trainer, state: TrainState) -> None:
        if self.check is not None:
            self.check(0)

    def on_step_end(self, trainer: Trainer, state: TrainState, result: StepResult) -> None:
        step = state.global_step
        self.bar.update()
        if self.check is None:
            return
        frozen = self.last[~self.active].sum().item()
        self.history.step_elbo.append((frozen - result.loss) / trainer.num_data)
        if step % self.check_every == 0 or step == self.steps:
            self.check(step)
            self.bar.set_postfix(elbo=f"{self.history.elbo[-1]:.2f}", active=self.history.num_active[-1])
            if not self.active.any():
                state.request_stop("converged")

    def on_end(self, trainer: Trainer, state: TrainState) -> None:
        self.bar.close()


def _unit_scale(fn: Callable) -> Callable:
    # Undo the data plate's N/B: each row's gradient is that of its own ELBO however many rows
    # are still active, so Adam's moment estimates do not jump when points stop.
    def scaled(x: torch.Tensor, index: torch.Tensor, num_data: int) -> Any:
        with poutine.scale(scale=len(index) / num_data):
            return fn(x, index, num_data)

    return scaled


def _local_svi(
    model: Callable,
    guide: PerDatapointGuide,
    x: torch.Tensor,
    objective: str,
    num_particles: int,
    lr: float,
    lr_decay: float,
) -> tuple[SVI, list[torch.nn.Module]]:
    """SVI on ``guide``'s rows alone (each row driven by its own point's ELBO, lazy Adam), and the
    networks the model computes with (for :func:`_frozen_modules`)."""
    from pyrovae.infer.objectives import make_objective

    num_data = x.shape[0]
    local_model, local_guide = _unit_scale(poutine.block(model, hide_types=["param"])), _unit_scale(guide)
    index = torch.arange(num_data, device=x.device)
    # Pyro would guess the plate nesting by a dry run that draws random numbers; guessing it here
    # without drawing keeps the optimisation's draws a function of the seed alone. The same run
    # shows which networks the model computes with (to freeze them).
    with params.called_modules() as networks:
        nesting = guess_max_plate_nesting(local_model, local_guide, (x[:1], index[:1], num_data), {})
    loss = make_objective(objective, num_particles, max_plate_nesting=nesting)
    optim = make_pyro_optimizer(lr, lr_decay, lazy_params=guide.local_param_names)
    return SVI(local_model, local_guide, optim, loss=loss), networks


def _run_local(
    svi: SVI,
    networks: list[torch.nn.Module],
    guide: PerDatapointGuide,
    x: torch.Tensor,
    rows: Callable[[], torch.Tensor],
    steps: int,
    hook: Hook,
) -> None:
    """``steps`` SVI steps on the rows ``rows()`` (each step's), with every param but the guide's rows
    and the model's networks frozen."""
    num_data = x.shape[0]
    local_names = guide.local_param_names
    trainer = Trainer(
        lambda x_rows, index: StepResult(svi.step(x_rows, index, num_data)),
        x,
        batches=lambda state: (rows() for _ in range(steps)),
        hooks=[hook],
    )
    with pyro.validation_enabled(False), frozen_params(lambda name: name not in local_names), _frozen_modules(networks):
        trainer.run(TrainState(), epochs=1)


def fit_local_guide(
    model: Callable,
    guide: PerDatapointGuide,
    x: torch.Tensor,
    *,
    steps: int = 300,
    lr: float = 1e-2,
    lr_decay: float = 1.0,
    num_particles: int = 1,
    objective: str = "elbo",
    progress: bool = False,
) -> float:
    """Fit a per-datapoint guide of any family (:class:`~pyrovae.PerDatapointGuide` or a subclass:
    :class:`~pyrovae.guides.flows.PerDatapointFullCovarianceGuide`,
    :class:`~pyrovae.guides.flows.PerDatapointFlowGuide`) to the points ``x`` (row i of the guide
    to ``x[i]``), the model held fixed: ``steps`` full-batch Adam steps on the Monte Carlo ELBO
    (``num_particles`` draws per point), each row driven by its own point's ELBO. Its rows start
    where the param store has them (or at the guide's initialisation). :func:`optimize_local_guide`
    is the diagonal-Gaussian version with a closed-form KL and a stopping rule.

    :param objective: ``"elbo"``, or ``"elbo-stl"`` (sticking the landing: its gradient has zero
        variance where q equals the posterior, so a family that holds the posterior lands on it;
        refused for flow guides, whose log q cannot be re-scored with detached parameters).

    :return: the seconds taken.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if x.shape[0] != guide.num_data:
        raise ValueError(
            f"the guide has {guide.num_data} rows but x has {x.shape[0]} points: build it with num_data={x.shape[0]}"
        )
    if objective not in ("elbo", "elbo-stl"):
        raise ValueError(f"objective must be 'elbo' or 'elbo-stl', got {objective!r}")
    num_data = x.shape[0]
    index = torch.arange(num_data, device=x.device)
    svi, networks = _local_svi(model, guide, x, objective, num_particles, lr, lr_decay)
    bar = _Checks(None, LocalFitHistory(), torch.zeros(0), torch.ones(0, dtype=torch.bool), steps, 1, progress)
    start = time.perf_counter()
    _run_local(svi, networks, guide, x, lambda: index, steps, bar)
    return time.perf_counter() - start


def optimize_local_guide(
    model: Callable,
    x: torch.Tensor,
    z_dim: int,
    *,
    steps: int = 300,
    lr: float = 1e-2,
    lr_decay: float = 1.0,
    num_particles: int = 1,
    prefix: str = "test",
    beta: float = 1.0,
    progress: bool = False,
    init: str | Callable = "prior",
    tol: Optional[float] = None,
    check_every: int = 25,
    patience: int = 2,
    check_samples: int = 16,
    return_history: bool = False,
) -> PerDatapointGuide | tuple[PerDatapointGuide, LocalFitHistory]:
    """Fit a fresh per-datapoint guide to every point of ``x`` at once, the model held fixed.

    Full-batch Adam on the ELBO of all points together, vectorised over points: one tensor of
    ``(N, z_dim)`` means and scales, each row driven by its own point's ELBO only (the KL in closed
    form, ``num_particles`` draws for the expected log-likelihood). This is how a per-datapoint
    guide gets a posterior for points it was not trained on, e.g. the test set, and how q* — the
    best Gaussian for each point — is approximated when measuring the amortization gap.

    **Start.** ``init="prior"`` starts every q_i at N(0, I); a guide (e.g. the
    :class:`~pyrovae.guides.AmortizedGuide` of a trained VAE) starts q_i at what it gives x_i.

    **Stopping rule.** With ``tol`` set, every ``check_every`` steps each point's ELBO is
    estimated with ``check_samples`` draws that are the same at every check (common random
    numbers, so the change between checks is the change of q, not Monte Carlo noise). A point
    whose ELBO has gained less than ``tol`` nats over its best earlier check, ``patience`` checks
    in a row, stops: it leaves the batch, and the lazy Adam leaves its row and moments untouched.
    The run ends when every point has stopped, or after ``steps`` steps. Without ``tol`` it runs
    exactly ``steps`` steps (checks are still recorded if ``return_history``).

    :param steps: the (maximum) number of Adam steps.
    :param lr_decay: multiplicative learning-rate decay per step (1: constant). With one draw per
        step the gradient noise sets a floor a constant rate cannot get below.
    :param init: ``"prior"`` or a guide to start from.
    :param tol: stopping threshold in nats per ``check_every`` steps (``None``: no stopping).
    :param return_history: also return a :class:`LocalFitHistory`.
    :return: the guide, its params ``"<prefix>.z_loc"``/``"<prefix>.z_scale"`` in the param store
        (and the history with ``return_history=True``).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if tol is not None and not tol >= 0:
        raise ValueError(f"tol must be >= 0 nats (or None for a fixed number of steps), got {tol}")
    for name, value in (("check_every", check_every), ("patience", patience), ("check_samples", check_samples)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not (init == "prior" or callable(init)):
        raise ValueError(f"init must be 'prior' or a guide to start from, got {init!r}")
    num_data = x.shape[0]
    guide = PerDatapointGuide(num_data, z_dim, beta=beta, prefix=prefix)
    store = pyro.get_param_store()
    for name in guide.local_param_names:
        if name in store:
            del store[name]
    if callable(init):
        z_loc0, z_scale0 = gaussian_guide_params(init, x)
        if z_loc0.shape != (num_data, z_dim):
            raise ValueError(f"the init guide gives z of shape {tuple(z_loc0.shape[1:])}, expected ({z_dim},)")
    else:
        z_loc0 = torch.zeros(num_data, z_dim, device=x.device)
        z_scale0 = torch.ones(num_data, z_dim, device=x.device)
    pyro.param(f"{prefix}.z_loc", z_loc0.detach().clone(), event_dim=1)
    pyro.param(f"{prefix}.z_scale", z_scale0.detach().clone(), constraint=constraints.positive, event_dim=1)
    index = torch.arange(num_data, device=x.device)
    svi, networks = _local_svi(model, guide, x, "elbo-analytic", num_particles, lr, lr_decay)
    active = torch.ones(num_data, dtype=torch.bool, device=x.device)
    track = tol is not None or return_history
    history = LocalFitHistory()
    last = torch.zeros(num_data, device=x.device)
    if track:
        noise = torch.randn(check_samples, num_data, z_dim, device=x.device)
        best = torch.full((num_data,), -math.inf, device=x.device)
        strikes = torch.zeros(num_data, dtype=torch.long, device=x.device)
        stopped_at = torch.full((num_data,), steps, dtype=torch.long, device=x.device)
    start = time.perf_counter()

    def check(step: int) -> None:
        rows = index[active]
        with torch.no_grad():
            loc = pyro.param(f"{prefix}.z_loc").detach()[rows]
            scale = pyro.param(f"{prefix}.z_scale").detach()[rows]
            elbo = gaussian_elbo(model, x[rows], loc, scale, noise=noise[:, rows])
        if tol is not None and step > 0:
            gain = elbo - best[rows]
            strikes[rows] = torch.where(gain < tol, strikes[rows] + 1, torch.zeros_like(strikes[rows]))
            done = rows[strikes[rows] >= patience]
            active[done] = False
            stopped_at[done] = step
        best[rows] = torch.maximum(best[rows], elbo)
        last[rows] = elbo
        history.step.append(step)
        history.elbo.append(last.mean().item())
        history.num_active.append(int(active.sum()))
        history.seconds.append(time.perf_counter() - start)

    checks = _Checks(check if track else None, history, last, active, steps, check_every, progress)
    _run_local(svi, networks, guide, x, lambda: index[active], steps, checks)
    if track:
        history.stopped_at = stopped_at.cpu()
        history.final_elbo = last.cpu()
    return (guide, history) if return_history else guide
