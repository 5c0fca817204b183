"""The guide of the CVAE (Sohn et al. 2015): the recognition network q_φ(z|x_obs, y), and
:func:`cvae_pair`, the MLP networks of the quadrant task (:mod:`pyrovae.models.cvae`).

Usage::

    from pyrovae import cvae_pair
    model, guide = cvae_pair(num_quadrants=2, z_dim=50, hidden_sizes=(500, 500))
    # model: CVAE with model.baseline (CVAEBaseline); guide: CVAEGuide; both take whole images
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional

import pyro
import torch
from torch import nn

from pyrovae.distributions import diag_normal
from pyrovae.handlers import data_plate
from pyrovae.models.cvae import CVAE, NEEDS_X, CVAEBaseline
from pyrovae.params import register


@dataclasses.dataclass
class CVAEGuide:
    r"""q_φ(z|x_obs, y) = N(recognition_net(x)): site ``"z"`` in the data plate.

    The recognition network reads the whole row x: x_obs with its unobserved pixels filled by y,
    which is how Pyro's example puts the two "together in the same image" (its ``Encoder(x, y)``).

    :param recognition_net: ``nn.Module`` ``(..., D) -> (z_loc, z_scale)``, e.g.
        :class:`pyrovae.nets.GaussianEncoder`.
    :param name: its ``pyro.module`` name.
    """

    recognition_net: nn.Module
    name: str = "recognition_net"
    amortized = True

    def __call__(
        self, x: Optional[torch.Tensor], index: Optional[torch.Tensor] = None, num_data: Optional[int] = None
    ) -> torch.Tensor:
        if x is None:
            raise ValueError(NEEDS_X)
        register(self.name, self.recognition_net)
        z_loc, z_scale = self.recognition_net(x)
        with data_plate(x, index, num_data):
            return pyro.sample("z", diag_normal(z_loc, z_scale))


def cvae_pair(
    num_quadrants: int = 1,
    z_dim: int = 50,
    hidden_sizes: Sequence[int] = (500, 500),
    activation: str = "relu",
    image_shape: Sequence[int] = (28, 28),
) -> tuple[CVAE, CVAEGuide]:
    """A CVAE and its guide for the quadrant task, with MLP networks of ``hidden_sizes`` (Pyro's
    example: 500 500 ReLU, z_dim 200): the baseline x_obs -> y, the prior network x̃ -> z, the
    generation network (z, x_obs) -> y, the recognition network x -> z.

    :param num_quadrants: the observed quadrants, 1, 2 or 3 (:func:`pyrovae.models.quadrants.quadrant_mask`).
    :return: ``(model, guide)``; ``model.baseline`` is the :class:`~pyrovae.models.cvae.CVAEBaseline`,
        to be trained first (:func:`pyrovae.train.baseline.fit_baseline`).
    """
    from pyrovae.models.quadrants import quadrant_mask
    from pyrovae.nets import MLP, GaussianEncoder

    mask = quadrant_mask(num_quadrants, image_shape)
    x_dim = int(mask.shape[0])
    baseline = CVAEBaseline(MLP(x_dim, hidden_sizes, x_dim, activation), mask)
    prior_net = GaussianEncoder(x_dim, z_dim, hidden_sizes, activation)
    generation_net = MLP(z_dim + x_dim, hidden_sizes, x_dim, activation)
    model = CVAE(prior_net, generation_net, mask, z_dim, baseline=baseline)
    return model, CVAEGuide(GaussianEncoder(x_dim, z_dim, hidden_sizes, activation))


__all__ = ["CVAEGuide", "cvae_pair"]
