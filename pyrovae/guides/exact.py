"""The exact posterior of the linear-Gaussian model as a guide (for zero-variance checks)."""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch

from pyrovae.handlers import data_plate, latent_scale


class ExactPosteriorGuide:
    """q(z|x) = p(z|x), computed in closed form by ``model.posterior(x)``.

    With this guide every importance weight equals p(x), so the ELBO, every IWAE bound and the
    importance-sampling estimate equal log p(x) exactly, for every sample.

    :param model: a model with a ``posterior(x)`` method, e.g.
        :class:`pyrovae.models.LinearGaussian`.
    """

    amortized = True

    def __init__(self, model) -> None:  # type: ignore[no-untyped-def]
        if not hasattr(model, "posterior"):
            raise ValueError(f"{type(model).__name__} has no closed-form posterior(x)")
        self.model = model
        self.beta = getattr(model, "beta", 1.0)

    def __call__(
        self,
        x: Optional[torch.Tensor],
        index: Optional[torch.Tensor] = None,
        num_data: Optional[int] = None,
    ) -> torch.Tensor:
        if x is None:
            raise ValueError("the exact posterior needs the data x")
        with data_plate(x, index, num_data):
            with latent_scale(self.beta):
                posterior = self.model.posterior(x)
                return pyro.sample(
                    "z", dist.MultivariateNormal(posterior.loc, scale_tril=posterior.scale_tril)
                )
