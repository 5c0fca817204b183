"""Input checks shared by models and data sets: what a data tensor must be for a given likelihood;
and whether a step is being traced (:func:`tracing`), when checks that read values are skipped."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Literal, get_args

import torch
from torch import Tensor

Likelihood = Literal["bernoulli", "gaussian"]


def check_data(x: Tensor, likelihood: str, name: str = "x") -> None:
    """Check that ``x`` can be fed to a model with the given observation likelihood.

    :param x: the data, expected to be a floating tensor of shape ``(num_points, num_features)``.
    :param likelihood: ``"bernoulli"`` (values must lie in ``[0, 1]``) or ``"gaussian"``.
    :param name: how to call ``x`` in error messages.
    :raises ValueError: with a message that names the fix, when ``x`` is not a 2-D floating tensor,
        holds NaN or infinite entries, or (Bernoulli) holds values outside ``[0, 1]``.
    """
    if likelihood not in get_args(Likelihood):
        raise ValueError(f"Unknown likelihood {likelihood!r}; use one of {', '.join(map(repr, get_args(Likelihood)))}.")
    if not isinstance(x, Tensor):
        raise ValueError(
            f"{name} must be a torch.Tensor of shape (num_points, num_features), got "
            f"{type(x).__name__}; convert it with torch.as_tensor({name}, dtype=torch.float32)."
        )
    if x.dim() != 2:
        raise ValueError(
            f"{name} must be 2-D with shape (num_points, num_features), got shape {tuple(x.shape)}; "
            f"flatten each data point with {name}.reshape(len({name}), -1)."
        )
    if not x.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor, got dtype {x.dtype}; convert it with "
            f"{name}.float() (and divide raw 0-255 pixel values by 255)."
        )
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); it needs at least one data point and one feature.")
    # A NaN or inf entry makes the sum non-finite, so one cheap reduction clears the common case;
    # the exact count is only taken when something is wrong (or the sum merely overflowed).
    num_bad = 0 if torch.isfinite(x.sum()) else int((~torch.isfinite(x)).sum())
    if num_bad:
        raise ValueError(
            f"{name} has {num_bad} NaN or infinite entries (of {x.numel()}); drop or impute those "
            f"entries before fitting, e.g. keep rows {name}[torch.isfinite({name}).all(1)]."
        )
    if likelihood == "bernoulli":
        low, high = (float(value) for value in torch.aminmax(x))
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"{name} has values in [{low:g}, {high:g}], but the Bernoulli likelihood needs values "
                f"in [0, 1]; divide raw pixel values by 255, or use likelihood='gaussian' for "
                f"real-valued data."
            )


_trace = threading.local()


def tracing() -> bool:
    """Whether :mod:`pyrovae.infer.replay` is tracing a training step in this thread.

    A trace records tensor operations only: a check that reads a tensor's value into Python (an
    index range, a data range) cannot be part of it and would stop the trace. Such checks skip
    themselves while tracing; they run on the eager steps (the first step of every structure,
    and the one that verifies the replay), and an out-of-range index still fails in the replayed
    indexing kernels.
    """
    return getattr(_trace, "active", False)


@contextlib.contextmanager
def tracing_step() -> Iterator[None]:
    """Mark this thread as tracing (:func:`tracing`) inside."""
    previous = tracing()
    _trace.active = True
    try:
        yield
    finally:
        _trace.active = previous
