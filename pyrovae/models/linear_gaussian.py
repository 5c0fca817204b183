"""The linear-Gaussian latent variable model, whose log p(x) and p(z|x) are known exactly."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.distributions import MultivariateNormal

from pyrovae.data import linear_gaussian_log_marginal, linear_gaussian_posterior
from pyrovae.models.vae import VAE


class LinearGaussian(VAE):
    r"""z ~ N(0, I_d), x | z ~ N(W z + b, σ² I): a VAE whose decoder is one linear layer.

    Then p(x) = N(b, W Wᵀ + σ² I) and p(z|x) = N(Σ Wᵀ(x - b)/σ², Σ) with Σ = (I + WᵀW/σ²)⁻¹,
    so every bound, estimator and gradient in pyrovae can be checked against the exact value.

    :param x_dim: data dimension.
    :param z_dim: latent dimension.
    :param noise_scale: σ (initial value if learned).
    :param weight: optional initial W ``(x_dim, z_dim)``; random (``nn.Linear`` init) if omitted.
    :param bias: optional initial b ``(x_dim,)``.
    :param learn_noise_scale: learn σ as the Pyro param ``"x_scale"``.
    :param beta: KL weight, as in :class:`~pyrovae.models.vae.VAE`.
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        noise_scale: float = 1.0,
        weight: Optional[torch.Tensor] = None,
        bias: Optional[torch.Tensor] = None,
        learn_noise_scale: bool = False,
        beta: float = 1.0,
        name: str = "decoder",
    ) -> None:
        decoder = nn.Linear(z_dim, x_dim)
        with torch.no_grad():
            if weight is not None:
                if weight.shape != (x_dim, z_dim):
                    raise ValueError(f"weight must have shape {(x_dim, z_dim)}, got {tuple(weight.shape)}")
                decoder.weight.copy_(weight)
            if bias is not None:
                if bias.shape != (x_dim,):
                    raise ValueError(f"bias must have shape {(x_dim,)}, got {tuple(bias.shape)}")
                decoder.bias.copy_(bias)
        super().__init__(
            decoder,
            z_dim,
            likelihood="gaussian",
            x_scale=noise_scale,
            learn_x_scale=learn_noise_scale,
            beta=beta,
            name=name,
        )

    def _params(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.decoder.weight, self.decoder.bias, self.x_scale(device)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) per row of ``x``, shape ``(B,)``."""
        weight, bias, noise_scale = self._params(x.device)
        return linear_gaussian_log_marginal(x, weight, bias, noise_scale)

    def posterior(self, x: torch.Tensor) -> MultivariateNormal:
        """Exact p(z|x) for each row of ``x`` (batch shape ``(B,)``, event ``(z_dim,)``)."""
        weight, bias, noise_scale = self._params(x.device)
        return linear_gaussian_posterior(x, weight, bias, noise_scale)
