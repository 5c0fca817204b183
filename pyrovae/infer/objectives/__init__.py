"""Objectives by name: ``make_objective("iwae", num_particles=5)`` returns a ``pyro.infer.ELBO``."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, Optional

from pyro.infer import ELBO

from pyrovae.infer.objectives.iwae import (
    IWAE,
    IWAE_ESTIMATORS,
    STLELBO,
    vimco_learning_signal,
)
from pyrovae.infer.objectives.quiet import QuietTrace_ELBO, QuietTraceEnum_ELBO, QuietTraceMeanField_ELBO
from pyrovae.infer.objectives.score import ScoreFunctionELBO
from pyrovae.infer.objectives.tighter import CIWAE, MIWAE, PIWAE
from pyrovae.protocols import Objective


# Pyro's ELBOs, whose first call guesses max_plate_nesting without a log line and without
# consuming random numbers (pyrovae.infer.objectives.quiet).
def _trace_elbo(num_particles: int, **kwargs: Any) -> Objective:
    return QuietTrace_ELBO(num_particles=num_particles, vectorize_particles=True, **kwargs)


def _mean_field_elbo(num_particles: int, **kwargs: Any) -> Objective:
    return QuietTraceMeanField_ELBO(num_particles=num_particles, vectorize_particles=True, **kwargs)


def _enum_elbo(num_particles: int, **kwargs: Any) -> Objective:
    # Pyro's TraceEnum_ELBO: guide sites marked infer={"enumerate": "parallel"} are summed out
    # exactly (the label of M2); `fit` sets max_plate_nesting from its dry run when it is not given.
    return QuietTraceEnum_ELBO(num_particles=num_particles, vectorize_particles=True, **kwargs)


#: name -> (constructor, one-line description)
OBJECTIVES: dict[str, tuple[Callable[..., Objective], str]] = {
    "elbo": (_trace_elbo, "ELBO with a Monte Carlo KL term (Pyro Trace_ELBO)"),
    "elbo-enum": (_enum_elbo, "ELBO with enumerated discrete guide sites summed out exactly (Pyro TraceEnum_ELBO)"),
    "elbo-analytic": (_mean_field_elbo, "ELBO with the KL in closed form (Pyro TraceMeanField_ELBO)"),
    "elbo-stl": (STLELBO, "ELBO with the sticking-the-landing gradient (log q with detached parameters)"),
    "iwae": (IWAE, "importance-weighted bound with K samples (VIMCO gradient for non-reparameterized sites)"),
    "iwae-stl": (functools.partial(IWAE, estimator="stl"), "IWAE bound, STL gradient (biased for K > 1)"),
    "iwae-dreg": (functools.partial(IWAE, estimator="dreg"), "IWAE bound, doubly reparameterized gradient (DReG)"),
    "score": (ScoreFunctionELBO, "ELBO with log-derivative-trick gradients and a baseline"),
    "miwae": (MIWAE, "mean of num_groups (M) IWAE bounds of K samples each (Rainforth et al. 2018)"),
    "piwae": (PIWAE, "decoder on IWAE with M*K samples, encoder on MIWAE(M, K), one pass (Rainforth et al. 2018)"),
    "ciwae": (CIWAE, "ciwae_beta * ELBO + (1 - ciwae_beta) * IWAE of the same K samples (Rainforth et al. 2018)"),
}

#: Parameters every objective takes (those of ``pyro.infer.ELBO``, which the ``elbo`` entries pass on).
_ELBO_PARAMETERS = frozenset(inspect.signature(ELBO.__init__).parameters) - {"self"}


def objective_parameters(name: str) -> Optional[frozenset[str]]:
    """The keyword parameters objective ``name``'s constructor takes besides ``num_particles``
    (fixed ones of a ``functools.partial`` entry excluded), or ``None`` if it takes any."""
    constructor = OBJECTIVES[name][0]
    fixed: set[str] = set()
    if isinstance(constructor, functools.partial):
        fixed = set(constructor.keywords)
    parameters = inspect.signature(constructor).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        if constructor in (_trace_elbo, _mean_field_elbo, _enum_elbo):
            return _ELBO_PARAMETERS - {"num_particles", "vectorize_particles"}
        return None
    return (
        frozenset(p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL)
        - fixed
        - {"num_particles"}
    )


def objectives_taking(parameter: str) -> list[str]:
    """The registered objectives whose constructor takes ``parameter`` by name."""
    return [name for name in OBJECTIVES if parameter in (objective_parameters(name) or ())]


def make_objective(name: str, num_particles: int = 1, **kwargs: Any) -> Objective:
    """Build an objective by name.

    :param name: one of :data:`OBJECTIVES`: ``elbo``, ``elbo-enum``, ``elbo-analytic``, ``elbo-stl``, ``iwae``,
        ``iwae-stl``, ``iwae-dreg``, ``score``, ``miwae``, ``piwae``, ``ciwae``.
    :param num_particles: Monte Carlo samples per data point (K for ``iwae``; K per group for
        ``miwae`` and ``piwae``, which draw ``num_groups`` × K).
    :param kwargs: passed to the objective (e.g. ``max_plate_nesting``; ``num_groups`` M for
        ``miwae``/``piwae``, ``ciwae_beta`` for ``ciwae``).
    :raises ValueError: an unknown name, a bad ``num_particles``, or a parameter the objective
        does not take (named, with the objectives that take it).
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    if not isinstance(num_particles, int) or isinstance(num_particles, bool) or num_particles < 1:
        raise ValueError(f"num_particles must be an integer >= 1, got {num_particles!r}")
    accepted = objective_parameters(name)
    for parameter in kwargs:
        if accepted is None or parameter in accepted:
            continue
        takers = objectives_taking(parameter)
        hint = f"it is a parameter of {', '.join(repr(n) for n in takers)}" if takers else "no objective takes it"
        raise ValueError(
            f"objective {name!r} takes no parameter {parameter!r} ({hint}); its parameters are "
            f"num_particles and {sorted(accepted)}"
        )
    return OBJECTIVES[name][0](num_particles=num_particles, **kwargs)


__all__ = [
    "CIWAE",
    "IWAE",
    "IWAE_ESTIMATORS",
    "MIWAE",
    "OBJECTIVES",
    "PIWAE",
    "STLELBO",
    "ScoreFunctionELBO",
    "make_objective",
    "objective_parameters",
    "objectives_taking",
    "vimco_learning_signal",
]
