"""The base class of pyrovae's per-data-point objectives."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional

import torch
from pyro.infer import ELBO
from pyro.infer.enum import get_importance_trace

from pyrovae.handlers import DATA_PLATE
from pyrovae.infer.replay import reported_loss
from pyrovae.infer.weights import (
    LogWeights,
    guess_max_plate_nesting,
    per_datapoint_log_weights,
    vectorized_traces,
)


class PerDatapointObjective(ELBO):
    """A Pyro ELBO whose bound is a sum over the ``data`` plate of per-data-point terms.

    Subclasses implement :meth:`value_and_score_term` on the ``(K, B)`` log-weights. The loss is
    ``-(value + (score_term - score_term.detach()))``: numerically the negative bound, with the
    gradient of the pathwise part plus the log-derivative part, all from one pass of K vectorized
    particles.

    :param num_particles: K, the number of importance samples per data point.
    :param max_plate_nesting: plates nested in model and guide; guessed by a dry run if omitted.
    :param plate_name: the plate over data points.
    """

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float = float("inf"),
        plate_name: str = DATA_PLATE,
    ) -> None:
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be an integer >= 1, got {num_particles!r}")
        super().__init__(num_particles=num_particles, vectorize_particles=True)
        # Unlike pyro.infer.ELBO, this counts the model's plates only; the particle plate goes
        # to their left.
        self.max_plate_nesting = max_plate_nesting
        self.plate_name = plate_name

    def _get_trace(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> Any:
        # Required by pyro.infer.ELBO; pyrovae objectives draw their particles in log_weights.
        return get_importance_trace("flat", self.max_plate_nesting, model, guide, args, kwargs)

    def _guess_max_plate_nesting(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> None:
        self.max_plate_nesting = guess_max_plate_nesting(model, self.wrap_guide(guide), args, kwargs)

    @property
    def num_draws(self) -> int:
        """Samples drawn per data point in one evaluation: K here; objectives that draw several
        groups of K (MIWAE, PIWAE) draw more."""
        return self.num_particles

    def wrap_guide(self, guide: Callable) -> Callable:
        """Hook for objectives that change how the guide samples (e.g. cut pathwise gradients)."""
        return guide

    def log_weights(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> LogWeights:
        """Draw :attr:`num_draws` vectorized particles and reduce them to per-data-point log-weights."""
        guide = self.wrap_guide(guide)
        if self.max_plate_nesting == float("inf"):
            self.max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)

        model_trace, guide_trace = vectorized_traces(
            model, guide, args, kwargs, self.num_draws, int(self.max_plate_nesting)
        )
        refuse_enumerated_sites(guide_trace, type(self).__name__)
        finish = self.prepare_traces(model_trace, guide_trace)
        weights = per_datapoint_log_weights(
            model_trace, guide_trace, self.num_draws, int(self.max_plate_nesting), self.plate_name
        )
        if finish is not None:
            finish(weights)
        return weights

    def prepare_traces(self, model_trace: Any, guide_trace: Any) -> Optional[Callable[[LogWeights], None]]:
        """Hook: change the traces' log-densities before they are reduced to log-weights (STL).
        It may return a function that is called with the log-weights once they exist (DReG
        weights the gradient reaching each sample by its normalized weight)."""
        return None

    def value_and_score_term(self, weights: LogWeights) -> tuple[torch.Tensor, torch.Tensor]:
        """The bound (differentiable along pathwise gradients) and the score-function surrogate
        term (its value is irrelevant, only its gradient counts)."""
        raise NotImplementedError

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        value, score_term = self.value_and_score_term(self.log_weights(model, guide, args, kwargs))
        return -(value + (score_term - score_term.detach()))

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        with torch.no_grad():
            value, _ = self.value_and_score_term(self.log_weights(model, guide, args, kwargs))
        return -value.item()

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return reported_loss(loss)  # type: ignore[return-value]  # a tensor only while a replay traces


def refuse_enumerated_sites(guide_trace: Any, objective: str) -> None:
    """Refuse a guide site marked for enumeration (``infer={"enumerate": ...}``): a per-data-point
    objective draws every guide site from its K importance samples and sums none out, so it would
    sample the site while the guide asks for its exact sum, silently.

    :raises ValueError: naming the site and the two fixes.
    """
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"] and site["infer"].get("enumerate"):
            raise ValueError(
                f"guide site {name!r} is marked for enumeration (infer={{'enumerate': "
                f"{site['infer']['enumerate']!r}}}), but {objective} samples every guide site and sums "
                "none out, so it would sample it instead; sum it out with pyro.infer.TraceEnum_ELBO("
                "max_plate_nesting=1) (make_objective('elbo-enum')), or drop the mark to sample it on "
                "purpose (for M2: guide.with_mode('score') or guide.with_mode('gumbel'))"
            )


def log_mean_exp(log_w: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """log (1/K) Σ_k exp(log_w_k) along ``dim``, stably."""
    return torch.logsumexp(log_w, dim) - math.log(log_w.shape[dim])
