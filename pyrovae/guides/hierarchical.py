"""Amortized inference for hierarchical VAEs: q(z_1 | x) q(z_2 | z_1) ... q(z_L | z_{L-1})."""

from __future__ import annotations

from typing import Optional

import pyro
import torch

from pyrovae.distributions import diag_normal
from pyrovae.handlers import data_plate, latent_scale
from pyrovae.models.hierarchical import latent_site_names
from pyrovae.nets import HierarchicalEncoder
from pyrovae.params import register


class HierarchicalGuide:
    """The bottom-up guide of a :class:`~pyrovae.models.HierarchicalVAE` (Burda et al. 2016):
    each layer a diagonal Gaussian whose parameters are an MLP of the layer below (x for z_1).

    :param encoder: a :class:`~pyrovae.nets.HierarchicalEncoder`.
    :param beta: KL weight; must equal the model's β.
    :param reparameterized: ``False`` draws every layer without a pathwise gradient.
    :param name: name under which the networks are registered with ``pyro.module``.
    """

    amortized = True

    def __init__(
        self, encoder: HierarchicalEncoder, beta: float = 1.0, reparameterized: bool = True, name: str = "encoder"
    ) -> None:
        if not isinstance(encoder, HierarchicalEncoder):
            raise TypeError(f"encoder must be a pyrovae.nets.HierarchicalEncoder, got {type(encoder).__name__}")
        self.encoder = encoder
        self.beta = float(beta)
        self.reparameterized = reparameterized
        self.name = name
        self.site_names = latent_site_names(len(encoder.z_dims))

    def __call__(
        self, x: Optional[torch.Tensor], index: Optional[torch.Tensor] = None, num_data: Optional[int] = None
    ) -> torch.Tensor:
        if x is None:
            raise ValueError("the hierarchical guide needs the data x: q(z_1|x) is a function of x")
        register(self.name, self.encoder)
        h = x
        with data_plate(x, index, num_data):
            with latent_scale(self.beta):
                for site, net in zip(self.site_names, self.encoder.nets):
                    loc, scale = net(h)
                    h = pyro.sample(site, diag_normal(loc, scale, self.reparameterized))
        return h
