"""Amortized inference: one encoder network q_φ(z|x) for all data points."""

from __future__ import annotations

from typing import Optional

import pyro
import torch
from torch import nn

from pyrovae.distributions import diag_normal
from pyrovae.handlers import data_plate, latent_scale
from pyrovae.params import register


class AmortizedGuide:
    """q_φ(z|x) = N(z_loc(x), diag z_scale(x)²), with ``(z_loc, z_scale) = encoder(x)``.

    Same signature and site name (``"z"``) as the pyrovae models, so it swaps with any other guide.

    :param encoder: ``torch.nn.Module`` mapping ``x`` to ``(z_loc, z_scale)``
        (e.g. :class:`pyrovae.nets.GaussianEncoder`).
    :param beta: KL weight; must equal the model's β.
    :param reparameterized: ``False`` draws z without a pathwise gradient, so gradients reach φ
        only through the log-derivative (score-function) trick.
    :param name: name under which the encoder is registered with ``pyro.module``.
    """

    amortized = True

    def __init__(
        self,
        encoder: nn.Module,
        beta: float = 1.0,
        reparameterized: bool = True,
        name: str = "encoder",
    ) -> None:
        self.encoder = encoder
        self.beta = float(beta)
        self.reparameterized = reparameterized
        self.name = name

    def __call__(
        self,
        x: Optional[torch.Tensor],
        index: Optional[torch.Tensor] = None,
        num_data: Optional[int] = None,
    ) -> torch.Tensor:
        if x is None:
            raise ValueError("the amortized guide needs the data x: q(z|x) is a function of x")
        register(self.name, self.encoder)
        with data_plate(x, index, num_data):
            z_loc, z_scale = self.encoder(x)
            with latent_scale(self.beta):
                return pyro.sample("z", diag_normal(z_loc, z_scale, self.reparameterized))
