"""The hooks :func:`pyrovae.fit` is made of: the test bound per epoch, progress, stop signals,
checkpoints; and :class:`FitHook`, a hook that ``fit`` tells what it trains (:class:`FitContext`).
(Budgets and evaluation schedules, which any loop may use, are in :mod:`pyrovae.infer.loop`.)"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, Optional

import torch
from tqdm.auto import tqdm

from pyrovae.infer.loop import Hook, StepResult, Trainer, TrainState
from pyrovae.runtime.checkpoint import save_checkpoint
from pyrovae.runtime.distributed import World, all_reduce_sum_, barrier
from pyrovae.runtime.interrupt import StopSignals

__all__ = ["Checkpoint", "EpochLog", "FitContext", "FitHook", "Progress", "StopOnSignal", "TestBound"]

logger = logging.getLogger("pyrovae.train")


@dataclass
class FitContext:
    """What :func:`pyrovae.fit` trains, for the hooks that need more than the state (:class:`FitHook`).

    :ivar model: the model; :ivar guide: the guide; :ivar objective: the ``pyro.infer.ELBO``.
    :ivar train: the training points as stored ``(N, ...)``; ``prepare(x, generator)`` turns them
        into what the model sees (dynamic binarization), ``None``: as they are.
    :ivar test: the test points as evaluated (one fixed binarization), or ``None`` (none given, or
        ``test_bound=False``).
    :ivar generalises: the guide has no per-datapoint rows, so it can be evaluated on new points.
    :ivar image_shape: ``(C, H, W)`` of one point when the data are images, else ``None``.
    :ivar lr: Adam's initial step size; it is multiplied by ``lr_decay`` over each epoch.
    :ivar settings: fit's own arguments (epochs, batch_size, lr, ...) by name.
    :ivar config: the ``config`` passed to ``fit`` (``None`` if none was).
    :ivar is_main: this process is rank 0 (or the only one): the one that writes files.
    """

    model: Callable
    guide: Callable
    objective: Any
    train: torch.Tensor
    prepare: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]]
    test: Optional[torch.Tensor]
    generalises: bool
    image_shape: Optional[tuple[int, ...]]
    lr: float
    lr_decay: float
    seed: int
    settings: dict[str, Any] = field(default_factory=dict)
    config: Optional[dict[str, Any]] = None
    is_main: bool = True

    def epoch_lr(self, epoch: int) -> float:
        """The step size at the start of ``epoch`` (1-based): ``lr · lr_decay^(epoch - 1)``."""
        return self.lr * self.lr_decay ** (epoch - 1)


class FitHook(Hook):
    """A hook that needs the model, guide and data: :func:`pyrovae.fit` calls :meth:`bind` with its
    :class:`FitContext` before the run starts (a :class:`~pyrovae.infer.loop.Trainer` of one's own
    calls it itself)."""

    context: Optional[FitContext] = None

    def bind(self, context: FitContext) -> None:
        self.context = context


class TestBound(Hook):
    """Append the test-set bound to the history after every epoch (``None`` when ``bound`` is
    ``None``: no test data, or a guide without parameters for new points)."""

    __test__ = False  # not a pytest test class

    def __init__(self, bound: Optional[Callable[[], float]]) -> None:
        self.bound = bound

    def on_epoch_end(self, trainer: Trainer, state: TrainState) -> None:
        state.history.test_bound.append(None if self.bound is None else self.bound())


def _epoch_line(state: TrainState, epochs: Optional[int]) -> str:
    history = state.history
    test = history.test_bound[-1] if history.test_bound else None
    return (
        f"epoch {history.epoch[-1]}/{epochs or '?'}: train {history.bound_name} {history.train_bound[-1]:.3f}, "
        f"test {'n/a' if test is None else f'{test:.3f}'} ({history.seconds[-1]:.1f} s)"
    )


class Progress(Hook):
    """Progress on ``stream`` (standard error by default): tqdm bars for epochs and steps on a
    terminal; elsewhere (a log file, a pipe) one line per epoch and nothing in between."""

    def __init__(self, stream: Optional[IO[str]] = None, bars: Optional[bool] = None) -> None:
        self.stream = stream
        isatty = getattr(self.out, "isatty", None)
        self.bars = bool(isatty and isatty()) if bars is None else bars
        self._epochs: Any = None
        self._steps: Any = None

    @property
    def out(self) -> IO[str]:
        return self.stream if self.stream is not None else sys.stderr

    def on_start(self, trainer: Trainer, state: TrainState) -> None:
        if self.bars:
            self._epochs = tqdm(total=trainer.epochs, initial=state.epoch, desc="epochs", file=self.out)

    def on_epoch_start(self, trainer: Trainer, state: TrainState) -> None:
        if self.bars:
            self._steps = tqdm(
                total=trainer.steps_per_epoch,
                initial=state.step,
                desc=f"epoch {state.epoch + 1}",
                leave=False,
                file=self.out,
            )

    def on_step_end(self, trainer: Trainer, state: TrainState, result: StepResult) -> None:
        if self._steps is not None:
            self._steps.update()
            self._steps.set_postfix(bound=f"{-state.total / state.seen:.2f}")

    def on_epoch_end(self, trainer: Trainer, state: TrainState) -> None:
        if not self.bars:
            print(_epoch_line(state, trainer.epochs), file=self.out, flush=True)
            return
        self._close_steps()
        test = state.history.test_bound[-1] if state.history.test_bound else None
        self._epochs.update()
        self._epochs.set_postfix(train=f"{state.history.train_bound[-1]:.2f}", test=f"{test or float('nan'):.2f}")

    def on_end(self, trainer: Trainer, state: TrainState) -> None:
        self._close_steps()
        if self._epochs is not None:
            self._epochs.close()
            self._epochs = None

    def _close_steps(self) -> None:
        if self._steps is not None:
            self._steps.close()
            self._steps = None


class EpochLog(Hook):
    """One ``logging`` INFO line per epoch (logger ``pyrovae.train``)."""

    def on_epoch_end(self, trainer: Trainer, state: TrainState) -> None:
        logger.info("%s", _epoch_line(state, trainer.epochs))


class StopOnSignal(Hook):
    """Turn SIGINT/SIGTERM (seen by any process) into a stop at a step boundary.

    The step itself carries the request across processes (``step(..., stop=signals.requested)``
    all-reduces it with the gradients, :class:`~pyrovae.train.step.GradientStep`): a request seen
    in a step stops the run after it, or, in the epoch's last step, after the epoch's bookkeeping
    (history, checkpoint), where the processes agree once more."""

    def __init__(self, signals: StopSignals, world: World = World(), device: Any = "cpu") -> None:
        self.signals, self.world, self.device = signals, world, device

    def on_step_end(self, trainer: Trainer, state: TrainState, result: StepResult) -> None:
        if result.stop and state.step < (trainer.steps_per_epoch or math.inf):
            state.request_stop("signal")

    def on_epoch_end(self, trainer: Trainer, state: TrainState) -> None:
        flag = torch.tensor([float(self.signals.requested)], dtype=torch.float64, device=self.device)
        all_reduce_sum_([flag], self.world)
        if flag.item() > 0:
            state.request_stop("signal")

    def on_end(self, trainer: Trainer, state: TrainState) -> None:
        if state.stop == "signal":
            barrier(self.world)


class Checkpoint(Hook):
    """Write a checkpoint after every epoch, and when the run stops inside an epoch (with the
    position in it, so that resuming continues exactly there).

    The file holds the state's counters, history, order and generator, and ``contents()`` (the
    param store, optimizer, RNG states, ... — called on every process, since gathering RNG states
    is collective); rank 0 alone writes, atomically (:func:`pyrovae.runtime.checkpoint.save_checkpoint`).

    :param path: the checkpoint file, or ``None`` to write nothing.
    :param last_saved: the epoch of the checkpoint already on disk (when resuming).
    """

    def __init__(
        self,
        path: Any,
        contents: Callable[[], dict[str, Any]],
        world: World = World(),
        last_saved: Optional[int] = None,
    ) -> None:
        self.path, self.contents, self.world, self.last_saved = path, contents, world, last_saved

    def save(self, state: TrainState) -> None:
        if self.path is None:
            return
        payload = self.contents()
        if not self.world.is_main:
            return
        save_checkpoint(
            self.path,
            {
                **payload,
                "epoch": state.epoch,
                "position": state.position() if state.mid_epoch else None,
                "history": state.history.to_dict(),
                "generator": state.generator.get_state(),
            },
        )

    def on_epoch_end(self, trainer: Trainer, state: TrainState) -> None:
        self.save(state)
        if self.path is not None:
            self.last_saved = state.epoch

    def on_end(self, trainer: Trainer, state: TrainState) -> None:
        if state.mid_epoch:
            self.save(state)

    def note(self, state: TrainState) -> Optional[str]:
        if self.path is not None and self.last_saved is not None:
            return f"The last checkpoint, {self.path} (epoch {self.last_saved}), is intact."
        return "No checkpoint had been written yet."
