"""Training: :func:`fit` (SVI over shuffled index batches with checkpoints and exact resume) and the
opened-up SVI step it takes (:class:`~pyrovae.train.step.GradientStep`)."""

from pyrovae.train.trainer import History, bound_name, dataset_bound, evaluation_data, fit
from pyrovae.train.step import GradientStep, StepResult

__all__ = ["GradientStep", "History", "StepResult", "bound_name", "dataset_bound", "evaluation_data", "fit"]
