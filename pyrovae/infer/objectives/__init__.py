"""Objectives by name: ``make_objective("iwae", num_particles=5)`` returns a ``pyro.infer.ELBO``."""

from __future__ import annotations

from typing import Any, Callable

from pyro.infer import ELBO

from pyrovae.infer.objectives.iwae import (
    IWAE,
    IWAE_ESTIMATORS,
    STLELBO,
    vimco_learning_signal,
)
from pyrovae.infer.objectives.quiet import QuietTrace_ELBO, QuietTraceMeanField_ELBO
from pyrovae.infer.objectives.score import ScoreFunctionELBO


# Pyro's ELBOs, whose first call guesses max_plate_nesting without a log line and without
# consuming random numbers (pyrovae.infer.objectives.quiet).
def _trace_elbo(num_particles: int, **kwargs: Any) -> ELBO:
    return QuietTrace_ELBO(num_particles=num_particles, vectorize_particles=True, **kwargs)


def _mean_field_elbo(num_particles: int, **kwargs: Any) -> ELBO:
    return QuietTraceMeanField_ELBO(num_particles=num_particles, vectorize_particles=True, **kwargs)


#: name -> (constructor, one-line description)
OBJECTIVES: dict[str, tuple[Callable[..., ELBO], str]] = {
    "elbo": (_trace_elbo, "ELBO with a Monte Carlo KL term (Pyro Trace_ELBO)"),
    "elbo-analytic": (_mean_field_elbo, "ELBO with the KL in closed form (Pyro TraceMeanField_ELBO)"),
    "elbo-stl": (STLELBO, "ELBO with the sticking-the-landing gradient (log q with detached parameters)"),
    "iwae": (IWAE, "importance-weighted bound with K samples (VIMCO gradient for non-reparameterized sites)"),
    "iwae-stl": (lambda **kw: IWAE(estimator="stl", **kw), "IWAE bound, STL gradient (biased for K > 1)"),
    "iwae-dreg": (lambda **kw: IWAE(estimator="dreg", **kw), "IWAE bound, doubly reparameterized gradient (DReG)"),
    "score": (ScoreFunctionELBO, "ELBO with log-derivative-trick gradients and a baseline"),
}


def make_objective(name: str, num_particles: int = 1, **kwargs: Any) -> ELBO:
    """Build an objective by name.

    :param name: one of :data:`OBJECTIVES`: ``elbo``, ``elbo-analytic``, ``elbo-stl``, ``iwae``,
        ``iwae-stl``, ``iwae-dreg``, ``score``.
    :param num_particles: Monte Carlo samples per data point (K for ``iwae``).
    :param kwargs: passed to the objective (e.g. ``max_plate_nesting``).
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    if not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be an integer >= 1, got {num_particles!r}")
    return OBJECTIVES[name][0](num_particles=num_particles, **kwargs)


__all__ = ["IWAE", "IWAE_ESTIMATORS", "OBJECTIVES", "STLELBO", "ScoreFunctionELBO", "make_objective", "vimco_learning_signal"]
