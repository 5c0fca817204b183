"""Conditional log-likelihoods log p(y|x_obs) of the quadrant task (:mod:`pyrovae.models.cvae`).

The CVAE's estimate needs nothing of its own: its model's only observed site is y and its prior
p(z|x_obs) is a sample site of the model, so :func:`pyrovae.log_likelihood` and
:func:`pyrovae.evaluate_dataset` importance-sample log p(y|x_obs) with the guide q(z|x_obs, y) as
proposal. The baseline has no latent: its log p(y|x_obs) is exact (:func:`baseline_log_likelihood`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from pyrovae.handlers import DATA_PLATE


def no_latents(
    x: Optional[torch.Tensor] = None, index: Optional[torch.Tensor] = None, num_data: Optional[int] = None
) -> None:
    """The empty guide: for a model without latent sites (:class:`pyrovae.models.cvae.CVAEBaseline`)
    the ELBO is then log p of its observed sites, and ``Trace_ELBO`` trains it by maximum likelihood."""


@torch.no_grad()
def baseline_log_likelihood(baseline: Any, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """log p(y|x_obs) of each row of ``x`` (whole images) under a model with no latent sites, e.g. the
    :class:`~pyrovae.models.cvae.CVAEBaseline`: the log-density of its observed sites, unscaled, ``(N,)``."""
    out = []
    for index in torch.arange(x.shape[0], device=x.device).split(batch_size):
        trace = poutine.trace(baseline).get_trace(x[index], index, x.shape[0])
        total = torch.zeros(index.shape[0], dtype=x.dtype, device=x.device)
        for site in trace.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if not site["is_observed"]:
                raise ValueError(
                    f"baseline_log_likelihood takes a model with no latent sites; {site['name']!r} is latent: "
                    "use pyrovae.log_likelihood with a guide"
                )
            if DATA_PLATE not in {frame.name for frame in site["cond_indep_stack"]}:
                raise ValueError(f"site {site['name']!r} is outside the {DATA_PLATE!r} plate")
            total = total + site["fn"].log_prob(site["value"])
        out.append(total)
    log_p = torch.cat(out)
    assert log_p.shape == (x.shape[0],)
    return log_p


__all__ = ["baseline_log_likelihood", "no_latents"]
