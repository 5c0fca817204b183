"""A VAE with several stochastic layers: p(z_L) p(z_{L-1} | z_L) ... p(z_1 | z_2) p(x | z_1)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from pyrovae.models.vae import VAE, Likelihood
from pyrovae.nets import HierarchicalDecoder


def latent_site_names(num_layers: int) -> tuple[str, ...]:
    """Site names from the bottom layer up: ``"z"`` (the layer the decoder reads, so code written
    for the one-layer VAE finds it), then ``"z2"``, ``"z3"``, ..."""
    return ("z",) + tuple(f"z{level}" for level in range(2, num_layers + 1))


class HierarchicalVAE(VAE):
    r"""The generative model of a VAE with L Gaussian stochastic layers, as a Pyro function.

    .. math:: z_L \sim \mathcal N(0, I), \quad
       z_l \mid z_{l+1} \sim \mathcal N(\mu_l(z_{l+1}), \mathrm{diag}\, \sigma_l(z_{l+1})^2), \quad
       x \mid z_1 \sim p_θ(x \mid z_1)

    with the MLPs of a :class:`~pyrovae.nets.HierarchicalDecoder`. Latent sites are named by
    :func:`latent_site_names` (``"z"`` is z_1, next to x); the observed site is ``"x"``; all sit in
    the plate ``data``, so every pyrovae objective and evaluation applies unchanged. Pair it with
    :class:`~pyrovae.guides.HierarchicalGuide`. With ``beta != 1`` every latent log-density is
    scaled by β (the KL of every layer is weighted alike).

    Burda et al.'s two-layer MNIST model is ``HierarchicalDecoder(784, (100, 50), (200, 200),
    (100, 100), "tanh")``.

    **References**

    - [1] Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
    - [2] C. K. Sønderby et al., "Ladder Variational Autoencoders", NeurIPS 2016.
    - [3] A. Vahdat, J. Kautz, "NVAE: A Deep Hierarchical Variational Autoencoder", NeurIPS 2020.
    """

    decoder: HierarchicalDecoder

    def __init__(
        self,
        decoder: HierarchicalDecoder,
        likelihood: Likelihood = "bernoulli",
        x_scale: float = 1.0,
        learn_x_scale: bool = False,
        beta: float = 1.0,
        name: str = "decoder",
        x_scale_shape: str = "shared",
    ) -> None:
        if not isinstance(decoder, HierarchicalDecoder):
            raise TypeError(f"decoder must be a pyrovae.nets.HierarchicalDecoder, got {type(decoder).__name__}")
        super().__init__(decoder, decoder.z_dims[0], likelihood, x_scale, learn_x_scale, beta, name, x_scale_shape)
        self.z_dims = decoder.z_dims
        self.site_names = latent_site_names(len(self.z_dims))

    def prior(self, batch_size: int, device: torch.device) -> dist.TorchDistribution:
        """p(z_L) = N(0, I) of the top layer for a batch."""
        zeros = torch.zeros(batch_size, self.z_dims[-1], device=device)
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)

    def sample_latents(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """z_L ~ N(0, I), then z_l ~ p(z_l | z_{l+1}) down to z_1, which is returned."""
        z = pyro.sample(self.site_names[-1], self.prior(batch_size, device))
        for level in reversed(range(len(self.z_dims) - 1)):
            loc, scale = self.decoder.priors[level](z)
            z = pyro.sample(self.site_names[level], dist.Normal(loc, scale).to_event(1))
        return z
