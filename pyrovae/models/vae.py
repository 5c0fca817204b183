"""The standard VAE model p(z) p_θ(x|z), with a N(0, I) prior or a learned one
(:mod:`pyrovae.models.priors`)."""

from __future__ import annotations

from typing import Any, Literal, Optional, cast

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.util import is_validation_enabled
from torch import nn
from torch.distributions import constraints

from pyrovae.checks import check_data
from pyrovae.distributions import BernoulliEvent
from pyrovae.handlers import batch_device, data_plate, latent_scale
from pyrovae.params import register

Likelihood = Literal["bernoulli", "gaussian"]
LIKELIHOODS: tuple[str, ...] = ("bernoulli", "gaussian")


class VAE:
    r"""The generative model of a VAE, as a Pyro function.

    .. math:: z \sim p(z) = \mathcal N(0, I)\ \text{(or a learned prior)}, \qquad x \mid z \sim \mathrm{Bernoulli}(\sigma(f_θ(z)))
       \ \text{or}\ \mathcal N(f_θ(z), \sigma_x^2 I).

    Calling ``model(x, index, num_data)`` runs the model inside the plate ``data`` (rightmost batch
    dimension, subsampled by ``index`` out of ``num_data`` points). The latent site is ``"z"``,
    the observed site ``"x"``. With ``beta != 1`` the prior term log p(z) is scaled by β, and a guide
    built with the same β scales log q(z|x): the β-VAE objective E[log p(x|z)] - β KL(q ‖ p).

    :param decoder: ``torch.nn.Module`` mapping ``(..., z_dim)`` to ``(..., x_dim)`` logits/means.
    :param z_dim: latent dimension.
    :param likelihood: ``"bernoulli"`` (decoder outputs logits) or ``"gaussian"`` (means).
    :param x_scale: σ_x of the Gaussian likelihood (initial value if learned).
    :param learn_x_scale: learn σ_x as the Pyro param ``"x_scale"``.
    :param x_scale_shape: ``"shared"`` (one σ_x) or ``"pixel"`` (one learned σ per pixel).
    :param beta: weight of the KL term (β-VAE); 1 is the plain VAE.
    :param name: name under which the decoder is registered with ``pyro.module``.
    :param prior: a learned prior p(z) (:mod:`pyrovae.models.priors`: :class:`~pyrovae.models.priors.VampPrior`,
        :class:`~pyrovae.models.priors.MixturePrior`, :class:`~pyrovae.models.priors.FlowPrior`),
        any callable ``prior(batch_size, device) -> distribution`` of batch shape ``(batch_size,)`` and
        event shape ``(z_dim,)``; ``None`` is N(0, I). Sampling, the ELBO and importance sampling
        all use it (it is the :meth:`prior` hook).

    **References**

    - [1] D. P. Kingma, M. Welling, "Auto-Encoding Variational Bayes", ICLR 2014.
    - [2] I. Higgins et al., "β-VAE: Learning Basic Visual Concepts with a Constrained Variational
      Framework", ICLR 2017.
    """

    def __init__(
        self,
        decoder: nn.Module,
        z_dim: int,
        likelihood: Likelihood = "bernoulli",
        x_scale: float = 1.0,
        learn_x_scale: bool = False,
        beta: float = 1.0,
        name: str = "decoder",
        x_scale_shape: str = "shared",
        prior: Optional[Any] = None,
    ) -> None:
        if x_scale_shape not in ("shared", "pixel"):
            raise ValueError(f"x_scale_shape must be 'shared' or 'pixel', got {x_scale_shape!r}")
        if x_scale_shape == "pixel" and not learn_x_scale:
            raise ValueError("a per-pixel σ_x is learned: x_scale_shape='pixel' needs learn_x_scale=True")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}; choose one of {LIKELIHOODS}")
        if not x_scale > 0:
            raise ValueError(f"x_scale must be positive, got {x_scale}")
        if not beta > 0:
            raise ValueError(f"beta must be positive, got {beta}; beta=1 is the plain VAE")
        if likelihood == "bernoulli" and learn_x_scale:
            raise ValueError("learn_x_scale only applies to the gaussian likelihood")
        self.decoder = decoder
        self.z_dim = int(z_dim)
        self.likelihood = likelihood
        self.x_scale_init = float(x_scale)
        self.learn_x_scale = learn_x_scale
        self.x_scale_shape = x_scale_shape
        self.beta = float(beta)
        self.name = name
        if prior is not None and getattr(prior, "z_dim", self.z_dim) != self.z_dim:
            raise ValueError(f"the prior is over {prior.z_dim} latent dimensions but z_dim={self.z_dim}")
        self.latent_prior = prior

    def x_scale(
        self, device: torch.device, dtype: Optional[torch.dtype] = None, x_dim: Optional[int] = None
    ) -> torch.Tensor:
        """σ_x of the Gaussian likelihood (the Pyro param ``"x_scale"`` when learned: a scalar, or
        one per pixel with ``x_scale_shape="pixel"``, shape ``(x_dim,)``), fixed σ_x in ``dtype``."""
        if self.learn_x_scale:
            shape: tuple[int, ...] = ()
            if self.x_scale_shape == "pixel":
                if x_dim is None:
                    raise ValueError("a per-pixel σ_x needs x_dim")
                shape = (x_dim,)
            return pyro.param(
                "x_scale",
                lambda: torch.full(shape, self.x_scale_init, device=device, dtype=dtype),
                constraint=constraints.positive,
            )
        return torch.tensor(self.x_scale_init, device=device, dtype=dtype)

    def likelihood_dist(self, out: torch.Tensor) -> dist.TorchDistribution:
        """p_θ(x|z) given the decoder output ``out``."""
        if self.likelihood == "bernoulli":
            # Bernoulli(logits=out).to_event(1) with a fused log-density (pyrovae.distributions).
            # Pixel intensities in [0, 1] are allowed as targets (greyscale MNIST without
            # binarization); torch's Boolean support check would reject them.
            return BernoulliEvent(out)
        return dist.Normal(out, self.x_scale(out.device, out.dtype, out.shape[-1])).to_event(1)

    def prior(self, batch_size: int, device: torch.device) -> dist.TorchDistribution:
        """p(z) for a batch: N(0, I), or the learned prior given as ``prior``."""
        if self.latent_prior is not None:
            return self.latent_prior(batch_size, device)
        zeros = torch.zeros(batch_size, self.z_dim, device=device)
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)

    def __call__(
        self,
        x: Optional[torch.Tensor] = None,
        index: Optional[torch.Tensor] = None,
        num_data: Optional[int] = None,
    ) -> torch.Tensor:
        register(self.name, self.decoder)
        if x is not None and is_validation_enabled():
            check_data(x, self.likelihood)
        device = batch_device(x, index)
        with data_plate(x, index, num_data) as batch_index:
            assert batch_index is not None  # a vectorized plate yields its indices
            with latent_scale(self.beta):
                z = self.sample_latents(batch_index.size(0), device)
            out = self.decoder(z)
            pyro.sample("x", self.likelihood_dist(out), obs=x)
        return out

    def sample_latents(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """Sample the latent sites of a batch (inside the data plate) and return the latent the
        decoder reads: here z ~ p(z) at site ``"z"``; models with more layers override this."""
        return pyro.sample("z", self.prior(batch_size, device))

    def decode(self, z: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The mean of p_θ(x|z): probabilities (Bernoulli) or means (Gaussian). ``z`` is what the
        decoder reads: a tensor, or a tuple for a decoder of several latents (VQ-VAE-2's)."""
        out = self.decoder(z)
        return torch.sigmoid(out) if self.likelihood == "bernoulli" else out

    @torch.no_grad()
    def sample(
        self, num_samples: int, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ancestral sampling from the decoder alone: z ~ p(z), x ~ p_θ(x|z).

        :return: ``(z, x_mean, x)`` with shapes ``(n, z_dim)``, ``(n, x_dim)``, ``(n, x_dim)``.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        index = torch.arange(num_samples, device=device)
        trace = poutine.trace(self).get_trace(None, index=index, num_data=num_samples)
        z = cast(torch.Tensor, trace.nodes["z"]["value"])
        return z, self.decode(z), cast(torch.Tensor, trace.nodes["x"]["value"])
