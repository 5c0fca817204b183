"""Training: one loop (:class:`~pyrovae.infer.loop.Trainer`) with hooks
(:mod:`pyrovae.train.hooks`) over a small state (:class:`~pyrovae.infer.loop.TrainState`; the loop
itself lives in :mod:`pyrovae.infer.loop`, so that test-time inference in ``infer`` uses it too);
:func:`fit` (SVI over shuffled index batches with checkpoints and exact resume) is a use of it, and
takes the opened-up SVI step (:class:`~pyrovae.train.step.GradientStep`)."""

from pyrovae.infer.loop import (
    History,
    Hook,
    ShuffledBatches,
    StepResult,
    Trainer,
    TrainState,
)
from pyrovae.train.step import GradientStep
from pyrovae.train.trainer import bound_name, dataset_bound, evaluation_data, fit

__all__ = [
    "GradientStep",
    "History",
    "Hook",
    "ShuffledBatches",
    "StepResult",
    "TrainState",
    "Trainer",
    "bound_name",
    "dataset_bound",
    "evaluation_data",
    "fit",
]
