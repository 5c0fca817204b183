"""Graceful stopping: Ctrl-C (SIGINT) and SIGTERM end training at the next step boundary.

:func:`pyrovae.fit` runs its loop inside :class:`StopSignals`. A signal only sets a flag; the loop
looks at it after each completed optimizer step, writes a checkpoint that records the position
inside the epoch, and raises :class:`TrainingInterrupted`. Nothing is ever stopped half way through
an update, so ``resume=True`` continues exactly where the run stopped.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Any, Optional

logger = logging.getLogger(__name__)

__all__ = ["StopSignals", "TrainingInterrupted"]

#: A second signal this many seconds after the first stops at once, without a checkpoint. Signals
#: closer together are one request: a terminal's Ctrl-C reaches torchrun's workers both directly and
#: forwarded by torchrun.
FORCE_AFTER_SECONDS = 2.0


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM at a step boundary, after saving a checkpoint (if it had
    a checkpoint path). A ``KeyboardInterrupt``, so ``except Exception`` does not swallow it.

    :ivar signum: the signal that asked to stop.
    :ivar epoch: the 1-based epoch that was running.
    :ivar step: completed steps of that epoch.
    :ivar checkpoint_path: where the state was saved, or ``None``.
    """

    def __init__(self, message: str, *, signum: int, epoch: int, step: int, checkpoint_path: Optional[str]) -> None:
        super().__init__(message)
        self.signum = signum
        self.epoch = epoch
        self.step = step
        self.checkpoint_path = checkpoint_path

    @property
    def exit_code(self) -> int:
        """The shell convention for a process ended by a signal: 128 + signal number."""
        return 128 + self.signum

    def __str__(self) -> str:
        return str(self.args[0])


class StopSignals:
    """Within the ``with`` block, SIGINT and SIGTERM ask to stop (:attr:`requested`) instead of
    raising. Handlers can only be installed from the main thread; elsewhere this does nothing and
    signals keep their usual effect.

    :param enabled: ``False`` leaves the signal handlers alone.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.signum: Optional[int] = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signum is None:
            self.signum = signum
            self._first_at = time.monotonic()
            logger.warning(
                "%s received: stopping after the current step and saving a checkpoint "
                "(send it again to stop at once, without saving)",
                signal.Signals(signum).name,
            )
        elif time.monotonic() - self._first_at > FORCE_AFTER_SECONDS:
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} received twice: stopped without saving")

    def __enter__(self) -> StopSignals:
        if self.enabled and threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
