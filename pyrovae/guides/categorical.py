"""Guides for a discrete latent z ∈ {0, ..., K-1}: the prior of a mixture, and an amortized
categorical q_φ(z|x)."""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.handlers import batch_device, data_plate
from pyrovae.params import register


class MixturePriorGuide:
    """q(z|x) = p(z) = Categorical(π), reading π from a mixture model such as
    :class:`pyrovae.models.GaussianMixture`.

    As a proposal it is the "sample z from the prior" estimator: with the IWAE objective and K
    particles the bound is L_K = log (1/K) Σ_k p(x | z_k), z_k ~ π (the prior terms of the
    weights cancel).

    By default π is *not* detached, so the gradient is that of E[L_K] itself: μ and Σ get
    Σ_k w̃_k ∇ log p(x | z_k), and π, through which the particles are drawn, gets VIMCO's
    score-function term (the pathwise terms ∇ log π_z - ∇ log π_z cancel). With ``detach=True``
    the guide is a fixed proposal at each step instead: π gets the self-normalized estimate
    Σ_k w̃_k ∇ log π_{z_k} of ∇ log p(x), as with any other guide, which is not the gradient of
    any single objective.

    :param model: anything with a ``weights(device)`` method returning π, ``(K,)``.
    :param detach: read π detached (the guide then passes no gradient to it).
    """

    amortized = True

    def __init__(self, model, detach: bool = False) -> None:
        if not hasattr(model, "weights"):
            raise ValueError(f"{type(model).__name__} has no weights(): pass a mixture model")
        self.model = model
        self.detach = detach

    def __call__(
        self,
        x: Optional[torch.Tensor] = None,
        index: Optional[torch.Tensor] = None,
        num_data: Optional[int] = None,
    ) -> torch.Tensor:
        weights = self.model.weights(batch_device(x, index))
        if self.detach:
            weights = weights.detach()
        with data_plate(x, index, num_data):
            return pyro.sample("z", dist.Categorical(probs=weights))


class CategoricalGuide:
    """The amortized q_φ(z|x) = Categorical(logits = encoder(x)).

    z is discrete, so there is no pathwise gradient: with pyrovae's IWAE objective the network
    gets VIMCO's leave-one-out score-function gradient (unbiased for K >= 2).

    :param encoder: ``torch.nn.Module`` mapping ``(B, D)`` to ``(B, K)`` logits, e.g.
        ``pyrovae.nets.MLP(D, [32], K)``.
    :param name: name under which the encoder is registered with ``pyro.module``.

    **References**

    - [1] A. Mnih, D. J. Rezende, "Variational Inference for Monte Carlo Objectives", ICML 2016.
    """

    amortized = True

    def __init__(self, encoder: nn.Module, name: str = "categorical_encoder") -> None:
        self.encoder = encoder
        self.name = name

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of q_φ(z|x), ``(B, K)``."""
        return self.encoder(x)

    def __call__(
        self,
        x: Optional[torch.Tensor],
        index: Optional[torch.Tensor] = None,
        num_data: Optional[int] = None,
    ) -> torch.Tensor:
        if x is None:
            raise ValueError("the categorical guide needs the data x: q(z|x) is a function of x")
        register(self.name, self.encoder)
        with data_plate(x, index, num_data):
            logits = self.encoder(x)
            if logits.shape[:-1] != x.shape[:-1]:
                raise ValueError(f"the encoder must map x {tuple(x.shape)} to logits (B, K), got {tuple(logits.shape)}")
            return pyro.sample("z", dist.Categorical(logits=logits))
