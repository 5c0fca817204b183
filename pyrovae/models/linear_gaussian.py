"""The linear-Gaussian latent variable model, whose log p(x) and p(z|x) are known exactly."""

from __future__ import annotations

import math
from typing import Optional, cast

import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.distributions import MultivariateNormal

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

    @classmethod
    def random(
        cls,
        z_dim: int,
        x_dim: int,
        num_points: int,
        signal: float = 9.0,
        noise_scale: float = 1.0,
        seed: int = 0,
    ) -> tuple[LinearGaussian, torch.Tensor]:
        r"""A random model x = W z + b + σ ε with W_ij ~ N(0, signal / x_dim), b_i ~ N(0, 1), and
        ``num_points`` points drawn from it, all from one seeded generator (torch's global RNG is
        not touched).

        The 1/x_dim variance keeps diag(WᵀW) ≈ ``signal``, so every latent coordinate is pinned
        down about equally well whatever the dimensions (posterior precision ≈ 1 + signal/σ² per
        coordinate); only the number of coordinates changes with ``z_dim``.

        :return: the model (parameters in the current default dtype) and ``x`` of shape
            ``(num_points, x_dim)``.
        """
        for name, value in (("z_dim", z_dim), ("x_dim", x_dim), ("num_points", num_points)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not signal > 0 or not noise_scale > 0:
            raise ValueError(f"signal and noise_scale must be positive, got {signal}, {noise_scale}")
        generator = torch.Generator().manual_seed(seed)
        dtype = torch.get_default_dtype()
        weight = torch.randn(x_dim, z_dim, generator=generator, dtype=dtype) * math.sqrt(signal / x_dim)
        bias = torch.randn(x_dim, generator=generator, dtype=dtype)
        z = torch.randn(num_points, z_dim, generator=generator, dtype=dtype)
        noise = torch.randn(num_points, x_dim, generator=generator, dtype=dtype)
        x = z @ weight.T + bias + noise_scale * noise
        return cls(x_dim, z_dim, noise_scale, weight=weight, bias=bias), x

    def _params(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        decoder = cast(nn.Linear, self.decoder)  # built in __init__
        return decoder.weight, decoder.bias, self.x_scale(device)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) per row of ``x``, shape ``(B,)``."""
        weight, bias, noise_scale = self._params(x.device)
        return linear_gaussian_log_marginal(x, weight, bias, noise_scale)

    def posterior(self, x: torch.Tensor) -> MultivariateNormal:
        """Exact p(z|x) for each row of ``x`` (batch shape ``(B,)``, event ``(z_dim,)``)."""
        weight, bias, noise_scale = self._params(x.device)
        return linear_gaussian_posterior(x, weight, bias, noise_scale)


def _check_linear_gaussian_args(x: Tensor, weight: Tensor, bias: Tensor, noise_scale: float | Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(
            f"weight must have shape (x_dim, z_dim), got {tuple(weight.shape)}; pass dataset.truth['weight']."
        )
    if bias.shape != weight.shape[:1]:
        raise ValueError(
            f"bias must have shape ({weight.shape[0]},) to match weight {tuple(weight.shape)}, got {tuple(bias.shape)}."
        )
    if x.dim() != 2 or x.shape[1] != weight.shape[0]:
        raise ValueError(
            f"x must have shape (num_points, {weight.shape[0]}), got {tuple(x.shape)}; reshape single "
            f"points with x.reshape(1, -1)."
        )
    if not noise_scale > 0:
        raise ValueError(f"noise_scale must be positive, got {noise_scale}.")


def linear_gaussian_log_marginal(x: Tensor, weight: Tensor, bias: Tensor, noise_scale: float | Tensor) -> Tensor:
    r"""Exact log marginal likelihood of the linear-Gaussian model, one value per row of ``x``.

    .. math:: \log p(x) = \log \mathcal{N}(x;\ b,\ W W^\top + \sigma^2 I)

    :param x: observations, shape ``(num_points, x_dim)``.
    :param weight: :math:`W`, shape ``(x_dim, z_dim)``.
    :param bias: :math:`b`, shape ``(x_dim,)``.
    :param noise_scale: :math:`\sigma`.
    :returns: ``log p(x)``, shape ``(num_points,)``.
    """
    _check_linear_gaussian_args(x, weight, bias, noise_scale)
    eye = torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device)
    marginal = dist.MultivariateNormal(bias, covariance_matrix=weight @ weight.T + noise_scale**2 * eye)
    log_px = marginal.log_prob(x)
    assert log_px.shape == (x.shape[0],)
    return log_px


def linear_gaussian_posterior(
    x: Tensor, weight: Tensor, bias: Tensor, noise_scale: float | Tensor
) -> torch.distributions.MultivariateNormal:
    r"""Exact posterior :math:`p(z \mid x)` of the linear-Gaussian model, batched over rows of ``x``.

    .. math::
        \Sigma = (I + W^\top W / \sigma^2)^{-1}, \qquad \mu = \Sigma W^\top (x - b) / \sigma^2

    :param x: observations, shape ``(num_points, x_dim)``.
    :param weight: :math:`W`, shape ``(x_dim, z_dim)``.
    :param bias: :math:`b`, shape ``(x_dim,)``.
    :param noise_scale: :math:`\sigma`.
    :returns: a ``MultivariateNormal`` with batch shape ``(num_points,)`` and event shape
        ``(z_dim,)``.
    """
    _check_linear_gaussian_args(x, weight, bias, noise_scale)
    z_dim = weight.shape[1]
    eye = torch.eye(z_dim, dtype=weight.dtype, device=weight.device)
    precision = eye + weight.T @ weight / noise_scale**2
    precision_tril = torch.linalg.cholesky(precision)
    # Solving with the Cholesky factor avoids forming the inverse just to multiply by it.
    loc = torch.cholesky_solve(weight.T @ (x - bias).T / noise_scale**2, precision_tril).T
    assert loc.shape == (x.shape[0], z_dim)
    return dist.MultivariateNormal(loc, precision_matrix=precision)
