r"""The conditional VAE of Sohn, Lee & Yan (2015) on the quadrant task (:mod:`pyrovae.models.quadrants`),
and the deterministic baseline it is built on (Pyro's ``examples/cvae``).

Given the observed quadrants x_obs of an image, the model of the unobserved pixels y is

.. math:: z \mid x_{obs} \sim \mathcal N(\mu_θ(\tilde x), \operatorname{diag} σ_θ(\tilde x)^2), \qquad
   y \mid x_{obs}, z \sim \mathrm{Bernoulli}(\sigma(g_θ(z, x_{obs}))),

with the prior network p_θ(z|x_obs) reading x̃: x_obs with its unobserved pixels filled by the
baseline's prediction ŷ(x_obs) (Pyro's "recurrent connection"; without a baseline, x_obs as it is,
its unobserved pixels at -1). The guide (:class:`pyrovae.guides.cvae.CVAEGuide`) is the recognition
network q_φ(z|x_obs, y).

**How the data reach the model.** As with every pyrovae model, ``model(x, index, num_data)``: a row
of ``x`` is the *whole* image; the model splits it with its fixed quadrant mask into x_obs and y
(:func:`pyrovae.models.quadrants.split_quadrants`). So minibatches, dynamic binarization,
checkpoints and resume need nothing of their own.

**Sites**, in the ``data`` plate: ``"z"`` (latent, drawn from the prior network) and ``"y"`` (observed:
the unobserved pixels). The model has no site for x_obs, so its log p is the *conditional*
log p(y|x_obs), and pyrovae's importance-sampling estimator (:func:`pyrovae.log_likelihood`,
:func:`pyrovae.evaluate_dataset`) with K draws of the guide,

.. math:: \log \hat p(y \mid x_{obs}) = \log \frac1K \sum_k
   \frac{p_θ(z_k \mid x_{obs})\, p_θ(y \mid x_{obs}, z_k)}{q_φ(z_k \mid x_{obs}, y)}, \quad z_k \sim q_φ,

is Sohn et al.'s importance-sampled conditional log-likelihood (their Eq. 9/10; tested against a
closed-form linear-Gaussian CVAE in ``tests/test_cvae.py``). The baseline :class:`CVAEBaseline` is a
model with the same site ``"y"`` and no latent: trained with the empty guide
(:func:`pyrovae.infer.conditional.no_latents`) its loss is exactly -log p(y|x_obs), and its NLL needs
no sampling (:func:`pyrovae.infer.conditional.baseline_log_likelihood`).

Usage::

    from pyrovae import cvae_pair, fit_baseline, fit, make_objective, evaluate_dataset
    model, guide = cvae_pair(num_quadrants=1, z_dim=50)        # model.baseline: the deterministic net
    fit_baseline(model.baseline, data, epochs=10)              # -log p(y|x_obs) by maximum likelihood
    fit(model, guide, data, make_objective("elbo"), epochs=10) # the baseline stays as trained
    report = evaluate_dataset(model, guide, x_test, num_samples=100)   # log p̂(y|x_obs) per point
    completions = model.complete(x_test[:10], num_samples=3)   # (3, 10, 784) images

**Departure from Pyro's example.** Its generation network reads z alone; here it reads (z, x_obs),
the p(y|x, z) of the paper. Its baseline is frozen inside the CVAE, as here: the CVAE's steps do
not move it (its output enters the prior network detached).

**References**

- [1] K. Sohn, H. Lee, X. Yan, "Learning Structured Output Representation using Deep Conditional
  Generative Models", NeurIPS 2015.
- [2] Pyro example ``examples/cvae`` (``cvae.py``, ``baseline.py``).
"""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.util import is_validation_enabled
from torch import nn

from pyrovae.checks import check_data
from pyrovae.distributions import BernoulliEvent, diag_normal
from pyrovae.handlers import data_plate
from pyrovae.models.m2 import concat_broadcast
from pyrovae.models.quadrants import join_quadrants, split_quadrants
from pyrovae.params import register

#: The likelihoods p(y|...) of the unobserved pixels: Bernoulli logits, or N(mean, y_scale² I).
CVAE_LIKELIHOODS: tuple[str, ...] = ("bernoulli", "gaussian")

NEEDS_X = (
    "the CVAE models the unobserved quadrants given the observed ones, so it needs the images x "
    "(whole rows; see pyrovae.models.quadrants); to draw completions use model.complete(x)"
)


def y_distribution(out: torch.Tensor, likelihood: str, y_scale: float = 1.0) -> dist.TorchDistribution:
    """p(y|...) of the unobserved pixels from a network's outputs ``(..., D_y)``: independent
    Bernoulli(logits) or N(out, y_scale²) pixels, one event."""
    if likelihood == "bernoulli":
        return BernoulliEvent(out)
    if likelihood == "gaussian":
        return dist.Normal(out, y_scale * torch.ones_like(out)).to_event(1)
    raise ValueError(f"likelihood={likelihood!r} is not one of {CVAE_LIKELIHOODS}")


def _mean(out: torch.Tensor, likelihood: str) -> torch.Tensor:
    return torch.sigmoid(out) if likelihood == "bernoulli" else out


class _Conditional:
    """What the baseline and the CVAE share: the mask, the likelihood and the checks of x."""

    def __init__(self, mask: torch.Tensor, likelihood: str, y_scale: float) -> None:
        if mask.dtype != torch.bool or mask.dim() != 1 or not mask.any() or mask.all():
            raise ValueError(
                "mask must be a 1-D boolean tensor with observed (True) and unobserved (False) "
                "pixels, e.g. pyrovae.models.quadrants.quadrant_mask(1)"
            )
        if likelihood not in CVAE_LIKELIHOODS:
            raise ValueError(f"likelihood={likelihood!r} is not one of {CVAE_LIKELIHOODS}")
        if not y_scale > 0:
            raise ValueError(f"y_scale must be positive, got {y_scale}")
        self.mask, self.likelihood, self.y_scale = mask, likelihood, float(y_scale)

    @property
    def x_dim(self) -> int:
        return int(self.mask.shape[0])

    def split(self, x: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if x is None:
            raise ValueError(NEEDS_X)
        if is_validation_enabled() and self.likelihood == "bernoulli":
            check_data(x, "bernoulli")
        return split_quadrants(x, self.mask)

    def sample(self, num_samples: int, device: torch.device | str = "cpu") -> None:
        raise ValueError(f"model.sample({num_samples}) has nothing to condition on: {NEEDS_X}")


class CVAEBaseline(_Conditional):
    r"""The deterministic baseline: y ~ p(y|x_obs) = Bernoulli(σ(f(x_obs))) with no latent, a Pyro
    model ``model(x, index, num_data)`` with the one site ``"y"``. Trained with the empty guide its
    ELBO is log p(y|x_obs) itself (Pyro's ``baseline.py`` minimises the same masked cross-entropy).

    :param net: ``nn.Module`` ``(..., D) -> (..., D)``: x_obs (unobserved pixels at -1) to an output
        per pixel, of which the unobserved ones are used (logits, or means if Gaussian).
    :param mask: ``(D,)`` boolean, ``True`` where observed (:func:`pyrovae.models.quadrants.quadrant_mask`).
    :param likelihood: ``"bernoulli"`` or ``"gaussian"`` (N(f(x_obs), y_scale² I)).
    :param name: the ``pyro.module`` name of ``net``.
    """

    def __init__(
        self,
        net: nn.Module,
        mask: torch.Tensor,
        likelihood: str = "bernoulli",
        y_scale: float = 1.0,
        name: str = "baseline_net",
    ) -> None:
        super().__init__(mask, likelihood, y_scale)
        self.net, self.name = net, name

    def __call__(
        self, x: Optional[torch.Tensor], index: Optional[torch.Tensor] = None, num_data: Optional[int] = None
    ) -> torch.Tensor:
        register(self.name, self.net)
        x_obs, y = self.split(x)
        out = self.net(x_obs)[..., ~self.mask.to(x_obs.device)]
        with data_plate(x, index, num_data):
            pyro.sample("y", y_distribution(out, self.likelihood, self.y_scale), obs=y)
        return out

    def predict(self, x_obs: torch.Tensor) -> torch.Tensor:
        """The mean of p(y|x_obs), ``(..., D_y)``, from x_obs (``(..., D)``, unobserved pixels at -1)."""
        return _mean(self.net(x_obs)[..., ~self.mask.to(x_obs.device)], self.likelihood)

    @torch.no_grad()
    def complete(self, x: torch.Tensor) -> torch.Tensor:
        """Whole images ``(B, D)``: x's observed pixels and the baseline's prediction in the others."""
        x_obs, _ = split_quadrants(x, self.mask)
        return join_quadrants(x_obs, self.predict(x_obs), self.mask)


class CVAE(_Conditional):
    r"""The CVAE's model p_θ(z|x_obs) p_θ(y|x_obs, z) as a Pyro function ``model(x, index, num_data)``;
    see :mod:`pyrovae.models.cvae` for its sites and how x_obs and y are passed.

    :param prior_net: ``nn.Module`` ``(..., D) -> (z_loc, z_scale)``, the prior network, reading x_obs
        with its unobserved pixels filled by the baseline's prediction (or at -1 without a baseline),
        e.g. :class:`pyrovae.nets.GaussianEncoder`.
    :param generation_net: ``nn.Module`` ``(..., z_dim + D) -> (..., D)``: (z, x_obs) to an output per
        pixel (logits, or means if Gaussian), of which the unobserved ones are used.
    :param mask: ``(D,)`` boolean, ``True`` where observed.
    :param z_dim: latent dimension.
    :param baseline: a (trained) :class:`CVAEBaseline` whose prediction fills x_obs for the prior
        network; registered under its name, and held fixed (its output enters detached).
    :param likelihood: ``"bernoulli"`` or ``"gaussian"`` (N(g(z, x_obs), y_scale² I)).
    """

    def __init__(
        self,
        prior_net: nn.Module,
        generation_net: nn.Module,
        mask: torch.Tensor,
        z_dim: int,
        baseline: Optional[CVAEBaseline] = None,
        likelihood: str = "bernoulli",
        y_scale: float = 1.0,
        prior_name: str = "prior_net",
        generation_name: str = "generation_net",
    ) -> None:
        super().__init__(mask, likelihood, y_scale)
        if baseline is not None and not torch.equal(baseline.mask.cpu(), mask.cpu()):
            raise ValueError("the baseline observes other pixels than the CVAE: build both with one mask")
        self.prior_net, self.generation_net, self.baseline = prior_net, generation_net, baseline
        self.z_dim = int(z_dim)
        self.prior_name, self.generation_name = prior_name, generation_name

    def prior_input(self, x_obs: torch.Tensor) -> torch.Tensor:
        """x̃: x_obs with its unobserved pixels filled by the baseline's prediction (detached, so the
        CVAE's steps leave the baseline as trained); x_obs itself without a baseline."""
        if self.baseline is None:
            return x_obs
        return join_quadrants(x_obs, self.baseline.predict(x_obs).detach(), self.mask)

    def prior(self, x_obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_loc, z_scale)`` of p_θ(z|x_obs)."""
        return self.prior_net(self.prior_input(x_obs))

    def __call__(
        self, x: Optional[torch.Tensor], index: Optional[torch.Tensor] = None, num_data: Optional[int] = None
    ) -> torch.Tensor:
        register(self.prior_name, self.prior_net)
        register(self.generation_name, self.generation_net)
        if self.baseline is not None:
            register(self.baseline.name, self.baseline.net)
        x_obs, y = self.split(x)
        z_loc, z_scale = self.prior(x_obs)
        with data_plate(x, index, num_data):
            z = pyro.sample("z", diag_normal(z_loc, z_scale))
            out = self.generation_net(concat_broadcast(z, x_obs))[..., ~self.mask.to(x_obs.device)]
            pyro.sample("y", y_distribution(out, self.likelihood, self.y_scale), obs=y)
        return out

    def decode(self, z: torch.Tensor, x_obs: torch.Tensor) -> torch.Tensor:
        """The mean of p_θ(y|x_obs, z), ``(..., D_y)``."""
        out = self.generation_net(concat_broadcast(z, x_obs))[..., ~self.mask.to(x_obs.device)]
        return _mean(out, self.likelihood)

    @torch.no_grad()
    def complete(self, x: torch.Tensor, num_samples: int = 1) -> torch.Tensor:
        """``num_samples`` completions of each image, ``(S, B, D)``: x's observed pixels, and in the
        others the mean of p_θ(y|x_obs, z) at z ~ p_θ(z|x_obs) (as Pyro's example draws them). Only
        x's observed pixels are read."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        x_obs, _ = split_quadrants(x, self.mask)
        z_loc, z_scale = self.prior(x_obs)
        z = torch.distributions.Normal(z_loc, z_scale).sample((num_samples,))
        assert z.shape == (num_samples, x.shape[0], self.z_dim)
        return join_quadrants(x_obs, self.decode(z, x_obs), self.mask)


__all__ = ["CVAE", "CVAEBaseline", "CVAE_LIKELIHOODS", "y_distribution"]
