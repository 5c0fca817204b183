"""The training loop, once: epochs of batches, one step each, and hooks around them.

:class:`Trainer` owns nothing but the loop over a small :class:`TrainState`. What a step is (an
SVI step, a data-parallel :class:`~pyrovae.train.step.GradientStep`, local refinements first),
which batches an epoch visits (shuffled index batches by default) and everything around the steps
(checkpoints, progress, signals, evaluations, budgets) are given to it as a step function and
:class:`Hook` s. :func:`pyrovae.fit` (with the hooks of :mod:`pyrovae.train.hooks`), test-time
inference (:func:`pyrovae.infer.local.optimize_local_guide`) and the studies' loops are uses of it.

It knows nothing of Pyro, models or guides; it sits in ``infer`` (beside the optimizer,
:mod:`pyrovae.infer.optim`) so that test-time inference may use it, and ``train`` above it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from pyrovae.data import index_batches

__all__ = [
    "EvalSchedule",
    "History",
    "Hook",
    "ShuffledBatches",
    "StepBudget",
    "StepResult",
    "TimeBudget",
    "TrainState",
    "Trainer",
]


@dataclass
class StepResult:
    """:ivar loss: the loss of the global batch (what one process with the whole batch reports).
    :ivar stop: some process asked to stop (see :class:`pyrovae.runtime.interrupt.StopSignals`).
    :ivar problem: why no update was made (a non-finite loss or gradient), else ``None``.
    :ivar grad_norm: the global L2 norm of the gradient before clipping, as a 0-dim tensor on the
        parameters' device, not read back (``.item()`` syncs the device: read it only when needed),
        or ``None`` when the step does not report it."""

    loss: float
    stop: bool = False
    problem: Optional[str] = None
    grad_norm: Optional[torch.Tensor] = None


@dataclass
class History:
    """Per-epoch record of a run, in nats per data point (bounds, so higher is better)."""

    epoch: list[int] = field(default_factory=list)
    train_bound: list[float] = field(default_factory=list)
    test_bound: list[Optional[float]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    bound_name: str = "ELBO"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        return cls(**data)


@dataclass
class TrainState:
    """The state of a :class:`~pyrovae.train.trainer.Trainer` run between two steps.

    :ivar epoch: epochs completed.
    :ivar step: steps completed in the current epoch (0 at an epoch boundary).
    :ivar global_step: steps completed in this run (every epoch, this session only).
    :ivar order: the current epoch's visiting order of the training points (``None`` between
        epochs); its batches are ``order.split(batch_size)``.
    :ivar total: the epoch's summed loss so far, ``Σ loss · |batch| / N`` (nats).
    :ivar seen: points visited in the epoch so far.
    :ivar seconds: wall-clock seconds spent in the epoch so far (earlier sessions included).
    :ivar step_seconds: wall-clock seconds spent inside steps (batch preparation included), this
        session; :ivar step_cpu_seconds: the same in process CPU time.
    :ivar history: one entry per completed epoch.
    :ivar generator: orders the epochs and draws dynamic binarizations.
    :ivar stop: why the run stops early (``"signal"``, ``"budget"``, ...), else ``None``.
    """

    generator: torch.Generator = field(default_factory=torch.Generator)
    history: History = field(default_factory=History)
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    order: Optional[torch.Tensor] = None
    total: float = 0.0
    seen: int = 0
    seconds: float = 0.0
    step_seconds: float = 0.0
    step_cpu_seconds: float = 0.0
    stop: Optional[str] = None

    @property
    def mid_epoch(self) -> bool:
        """Stopped inside an epoch (some of its steps taken, not all)."""
        return self.order is not None and self.step > 0

    def request_stop(self, reason: str) -> None:
        """Stop at the end of this step (the first reason given is kept)."""
        if self.stop is None:
            self.stop = reason

    def position(self) -> dict[str, Any]:
        """Where inside the epoch the run is, for a checkpoint (see :meth:`restore_position`)."""
        assert self.order is not None
        return {
            "step": self.step,
            "order": self.order.cpu(),
            "total": self.total,
            "seen": self.seen,
            "seconds": self.seconds,
        }

    def restore_position(self, position: Optional[dict[str, Any]], device: Any) -> None:
        if position is None:
            return
        self.order = position["order"].to(device)
        self.step, self.total, self.seen = position["step"], position["total"], position["seen"]
        self.seconds = position["seconds"]


class Hook:
    """Called by the trainer at each event; every method does nothing unless overridden."""

    def on_start(self, trainer: Trainer, state: TrainState) -> None: ...

    def on_epoch_start(self, trainer: Trainer, state: TrainState) -> None: ...

    def on_step_end(self, trainer: Trainer, state: TrainState, result: StepResult) -> None: ...

    def on_epoch_end(self, trainer: Trainer, state: TrainState) -> None: ...

    def on_end(self, trainer: Trainer, state: TrainState) -> None: ...

    def note(self, state: TrainState) -> Optional[str]:
        """A sentence for the error that stops a run (e.g. which checkpoint is intact), or ``None``."""
        return None


class StepBudget(Hook):
    """Stop after ``max_steps`` steps of this run."""

    def __init__(self, max_steps: int) -> None:
        if not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}")
        self.max_steps = max_steps

    def on_step_end(self, trainer: Trainer, state: TrainState, result: StepResult) -> None:
        if state.global_step >= self.max_steps:
            state.request_stop("budget")


class TimeBudget(Hook):
    """Stop once the steps have taken ``max_seconds``: of process CPU time (``clock="cpu"``: on one
    thread, what the run would take on an idle core) or of wall-clock time (``"wall"``). Only the
    time inside steps counts, not evaluations or checkpoints."""

    def __init__(self, max_seconds: float, clock: str = "wall") -> None:
        if clock not in ("cpu", "wall"):
            raise ValueError(f"clock must be 'cpu' or 'wall', got {clock!r}")
        if not max_seconds > 0:
            raise ValueError(f"max_seconds must be positive, got {max_seconds}")
        self.max_seconds, self.clock = max_seconds, clock

    def spent(self, state: TrainState) -> float:
        return state.step_cpu_seconds if self.clock == "cpu" else state.step_seconds

    def on_step_end(self, trainer: Trainer, state: TrainState, result: StepResult) -> None:
        if self.spent(state) >= self.max_seconds:
            state.request_stop("budget")


class EvalSchedule(Hook):
    """Call ``evaluate(state)`` at the start of the run, after every step for which ``when(state)``
    holds, and at the end of the run unless its last step was just evaluated."""

    def __init__(
        self,
        evaluate: Callable[[TrainState], Any],
        when: Callable[[TrainState], bool],
        at_start: bool = True,
        at_end: bool = True,
    ) -> None:
        self.evaluate, self.when, self.at_start, self.at_end = evaluate, when, at_start, at_end
        self._last: Optional[int] = None

    def _run(self, state: TrainState) -> None:
        self.evaluate(state)
        self._last = state.global_step

    def on_start(self, trainer: Trainer, state: TrainState) -> None:
        if self.at_start:
            self._run(state)

    def on_step_end(self, trainer: Trainer, state: TrainState, result: StepResult) -> None:
        if self.when(state):
            self._run(state)

    def on_end(self, trainer: Trainer, state: TrainState) -> None:
        if self.at_end and self._last != state.global_step:
            self._run(state)


#: ``step(x_batch, batch_index) -> StepResult``: one update on the (prepared) batch.
Step = Callable[[torch.Tensor, torch.Tensor], StepResult]


class ShuffledBatches:
    """Each epoch visits every training point once, in an order drawn from the state's generator
    (on the data's device, as :func:`pyrovae.data.index_batches`), in batches of ``batch_size``.
    The order is kept in the state, so a checkpoint taken inside an epoch continues it."""

    def __init__(self, num_data: int, batch_size: int, device: torch.device | str = "cpu") -> None:
        self.num_data, self.batch_size, self.device = num_data, batch_size, device

    def __len__(self) -> int:
        return math.ceil(self.num_data / self.batch_size)

    def __call__(self, state: TrainState) -> Sequence[torch.Tensor]:
        if state.order is None:
            batches = index_batches(self.num_data, self.batch_size, generator=state.generator, device=self.device)
            state.order = torch.cat(list(batches))
        return state.order.split(self.batch_size)


class Trainer:
    """Run ``step`` over the batches of ``data``, epoch after epoch, with ``hooks`` around.

    Per step: the batch's points ``data[batch_index]`` are prepared (``prepare(x, generator)``,
    e.g. :meth:`pyrovae.data.Dataset.batch` for dynamic binarization), stepped, then the hooks'
    :meth:`~pyrovae.train.hooks.Hook.on_step_end` run. A step that reports a non-finite loss or
    gradient (:class:`~pyrovae.train.step.StepResult`) was not applied; the run stops with a
    ``FloatingPointError`` naming the epoch and step, what the hooks add (e.g. which checkpoint is
    intact) and ``advice``. A hook stops the run with :meth:`TrainState.request_stop`: at the end
    of that step, or of the epoch when it asks in :meth:`~pyrovae.train.hooks.Hook.on_epoch_end`.

    :param step: ``step(x_batch, batch_index) -> StepResult``.
    :param data: the training points ``(N, ...)``, indexed by the batches.
    :param batches: ``batches(state)``: the epoch's batches of indices (all of them, also when the
        state is inside the epoch: the first ``state.step`` are skipped); default
        :class:`ShuffledBatches` of ``batch_size``. A lazily generated iterable is fine (e.g. the
        points still active).
    :param prepare: ``prepare(x, generator)`` turns stored points into what the model sees.
    :param hooks: run in this order at every event.
    :param advice: the last sentence of a ``FloatingPointError`` (what to change).
    """

    def __init__(
        self,
        step: Step,
        data: torch.Tensor,
        *,
        batch_size: Optional[int] = None,
        batches: Optional[Callable[[TrainState], Iterable[torch.Tensor]]] = None,
        prepare: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = None,
        hooks: Sequence[Hook] = (),
        advice: str = "",
    ) -> None:
        if batches is None:
            if batch_size is None:
                raise ValueError("give batch_size (shuffled batches) or batches(state)")
            batches = ShuffledBatches(len(data), batch_size, data.device)
        self.step, self.data, self.batches = step, data, batches
        self.num_data = len(data)
        self.prepare = prepare
        self.hooks = list(hooks)
        self.advice = advice
        self.epochs: Optional[int] = None

    @property
    def steps_per_epoch(self) -> Optional[int]:
        return len(self.batches) if hasattr(self.batches, "__len__") else None

    def run(self, state: TrainState, epochs: Optional[int] = None) -> TrainState:
        """Train until ``epochs`` epochs are complete (``None``: until a hook stops the run)."""
        self.epochs = epochs
        for hook in self.hooks:
            hook.on_start(self, state)
        while state.stop is None and (epochs is None or state.epoch < epochs):
            self._epoch(state)
        for hook in self.hooks:
            hook.on_end(self, state)
        return state

    def _epoch(self, state: TrainState) -> None:
        batches = self.batches(state)
        start = time.perf_counter() - state.seconds
        for hook in self.hooks:
            hook.on_epoch_start(self, state)
        for batch_index in itertools.islice(batches, state.step, None):
            wall, cpu = time.perf_counter(), time.process_time()
            x = self.data[batch_index]
            if self.prepare is not None:
                x = self.prepare(x, state.generator)
            result = self.step(x, batch_index)
            state.step_seconds += time.perf_counter() - wall
            state.step_cpu_seconds += time.process_time() - cpu
            if result.problem is not None:
                raise FloatingPointError(self._problem(state, result.problem))
            state.step += 1
            state.global_step += 1
            state.total += result.loss * len(batch_index) / self.num_data
            state.seen += len(batch_index)
            state.seconds = time.perf_counter() - start
            for hook in self.hooks:
                hook.on_step_end(self, state, result)
            if state.stop is not None:
                return
        state.history.epoch.append(state.epoch + 1)
        state.history.train_bound.append(-state.total / max(state.seen, 1))
        state.history.seconds.append(time.perf_counter() - start)
        state.epoch += 1
        state.order, state.step, state.total, state.seen, state.seconds = None, 0, 0.0, 0, 0.0
        for hook in self.hooks:
            hook.on_epoch_end(self, state)

    def _problem(self, state: TrainState, problem: str) -> str:
        steps = self.steps_per_epoch
        where = f"epoch {state.epoch + 1}, step {state.step + 1}" + (f" of {steps}" if steps else "")
        notes = [note for note in (hook.note(state) for hook in self.hooks) if note]
        return " ".join([f"{problem} at {where}; this step was not applied.", *notes, self.advice]).strip()
