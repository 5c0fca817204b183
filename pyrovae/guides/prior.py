"""The naive proposal q(z|x) = p(z): sampling latents from the prior."""

from __future__ import annotations

from typing import Optional

import pyro
import torch

from pyrovae.distributions import diag_normal
from pyrovae.handlers import batch_device, data_plate, latent_scale


class PriorGuide:
    """q(z|x) = N(0, I), the model's prior, ignoring x.

    As a proposal for log p(x) it is the "sample z from the prior" Monte Carlo estimator, whose
    variance grows quickly with the latent dimension; as a guide its ELBO is E_p(z)[log p(x|z)].
    It has no parameters.

    :param z_dim: latent dimension.
    :param beta: KL weight; must equal the model's β.
    """

    amortized = True

    def __init__(self, z_dim: int, beta: float = 1.0) -> None:
        self.z_dim = int(z_dim)
        self.beta = float(beta)

    def __call__(
        self,
        x: Optional[torch.Tensor] = None,
        index: Optional[torch.Tensor] = None,
        num_data: Optional[int] = None,
    ) -> torch.Tensor:
        device = batch_device(x, index)
        with data_plate(x, index, num_data) as batch_index:
            assert batch_index is not None  # a vectorized plate yields its indices
            zeros = torch.zeros(batch_index.size(0), self.z_dim, device=device)
            with latent_scale(self.beta):
                return pyro.sample("z", diag_normal(zeros, torch.ones_like(zeros)))
