"""Training the CVAE's deterministic baseline (:class:`pyrovae.models.cvae.CVAEBaseline`) by maximum
likelihood: :func:`pyrovae.fit` with the empty guide and ``Trace_ELBO``, whose loss is then exactly
-log p(y|x_obs) (Pyro's ``examples/cvae/baseline.py`` minimises the same masked cross-entropy)."""

from __future__ import annotations

from typing import Any

from pyro.infer import Trace_ELBO

from pyrovae.infer.conditional import no_latents
from pyrovae.infer.loop import History
from pyrovae.train.trainer import fit


def fit_baseline(baseline: Any, data: Any, **fit_options: Any) -> History:
    """Train ``baseline`` on ``data`` (a :class:`~pyrovae.data.Dataset`, tensor or ``(train, test)``,
    whole images) with :func:`pyrovae.fit`; ``fit_options`` are ``fit``'s (``epochs``, ``lr``,
    ``checkpoint_path``, ``resume``, ...). The history's bound is the mean log p(y|x_obs)."""
    return fit(baseline, no_latents, data, Trace_ELBO(), **fit_options)


__all__ = ["fit_baseline"]
