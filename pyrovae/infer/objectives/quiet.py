"""Pyro's own ELBOs, with their ``max_plate_nesting`` guessed quietly.

Pyro's ``ELBO._guess_max_plate_nesting`` (run on the first call of an ELBO built without
``max_plate_nesting`` and with ``vectorize_particles=True``) runs the model and guide once, which
draws random numbers, and logs ``Guessed max_plate_nesting = ...`` at INFO level: a line on every
fresh objective, and a shifted random stream (a resumed run would not replay an uninterrupted
one). The classes here make the same guess, with Pyro's own code and shape checks, but restore
torch's random state afterwards and drop that log line.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from pyro.infer import Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO

from pyrovae.infer.weights import rng_preserved

__all__ = [
    "QuietPlateNesting",
    "QuietTraceEnum_ELBO",
    "QuietTraceMeanField_ELBO",
    "QuietTrace_ELBO",
    "quiet_plate_nesting_guess",
]

_PYRO_ELBO_LOGGER = logging.getLogger("pyro.infer.elbo")


class _DropGuessLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Guessed max_plate_nesting")


@contextlib.contextmanager
def quiet_plate_nesting_guess() -> Iterator[None]:
    """Inside: Pyro's ``Guessed max_plate_nesting`` line is not logged and torch's random state
    is restored on exit (other Pyro log lines pass)."""
    line_filter = _DropGuessLine()
    _PYRO_ELBO_LOGGER.addFilter(line_filter)
    try:
        with rng_preserved():
            yield
    finally:
        _PYRO_ELBO_LOGGER.removeFilter(line_filter)


class QuietPlateNesting:
    """Mixin for a ``pyro.infer.ELBO`` subclass: guess ``max_plate_nesting`` as Pyro does, without
    the log line and without consuming random numbers."""

    def _guess_max_plate_nesting(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> Any:
        with quiet_plate_nesting_guess():
            return super()._guess_max_plate_nesting(model, guide, args, kwargs)  # type: ignore[misc]


class QuietTrace_ELBO(QuietPlateNesting, Trace_ELBO):
    """``pyro.infer.Trace_ELBO``, guessing ``max_plate_nesting`` quietly (:class:`QuietPlateNesting`)."""


class QuietTraceMeanField_ELBO(QuietPlateNesting, TraceMeanField_ELBO):
    """``pyro.infer.TraceMeanField_ELBO``, guessing ``max_plate_nesting`` quietly."""


class QuietTraceEnum_ELBO(QuietPlateNesting, TraceEnum_ELBO):
    """``pyro.infer.TraceEnum_ELBO``, guessing ``max_plate_nesting`` quietly."""
