"""The exact posterior of the linear-Gaussian model as a guide (for zero-variance checks), and
Gaussian guides whose mismatch with it is known exactly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import MultivariateNormal

from pyrovae.handlers import data_plate, latent_scale


class ExactPosteriorGuide:
    """q(z|x) = p(z|x), computed in closed form by ``model.posterior(x)``, or a known transform of it.

    With the exact posterior every importance weight equals p(x), so the ELBO, every IWAE bound and
    the importance-sampling estimate equal log p(x) exactly, for every sample. With ``transform``
    (e.g. :meth:`studies.importance.Proposal.distribution`: shifted, widened, mean-field)
    q is a Gaussian whose KL to the posterior is known in closed form.

    The scale factor is sampled unbroadcast, so a factor shared by all rows stays one ``(d, d)``
    matrix in the log-densities of K × B draws.

    :param model: a model with a ``posterior(x)`` method, e.g.
        :class:`pyrovae.models.LinearGaussian`.
    :param transform: maps the batched posterior (a ``MultivariateNormal``) to q; ``None`` for q = p(z|x).
    """

    amortized = True

    def __init__(self, model, transform: Optional[Callable[[MultivariateNormal], MultivariateNormal]] = None) -> None:
        if not hasattr(model, "posterior"):
            raise ValueError(f"{type(model).__name__} has no closed-form posterior(x)")
        self.model = model
        self.transform = transform
        self.beta = getattr(model, "beta", 1.0)

    def distribution(self, x: torch.Tensor) -> MultivariateNormal:
        """q(z|x) for each row of ``x``, as a torch distribution (for closed-form KLs)."""
        posterior = self.model.posterior(x)
        return posterior if self.transform is None else self.transform(posterior)

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
                q = self.distribution(x)
                return pyro.sample("z", dist.MultivariateNormal(q.loc, scale_tril=q._unbroadcasted_scale_tril))
