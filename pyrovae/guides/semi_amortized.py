"""Semi-amortized inference: the encoder's q_φ(z|x) as the starting point, refined per batch by a
few stochastic-gradient steps on each point's own ELBO.

An amortized encoder gives q for any x in one pass but is only as good as one network can be for
all points (the *amortization gap*); a per-datapoint q_i can be optimised to the best member of
the family (q*) but costs many steps per point. Semi-amortized guides (Kim et al. 2018; Krishnan
et al. 2018) start from the encoder's output and take a few steps towards q*.

This module also holds :func:`gaussian_elbo`, the per-data-point ELBO of a diagonal Gaussian q
with the KL in closed form, which both the refinement here and the test-time optimisation in
:func:`pyrovae.infer.local.optimize_local_guide` climb.
"""

from __future__ import annotations

from typing import Optional, cast

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites
from torch import nn
from torch.distributions import kl_divergence

from pyrovae._typing import PyroFn
from pyrovae.distributions import diag_normal
from pyrovae.handlers import data_plate, latent_scale
from pyrovae.params import register

LATENT_SITE = "z"


def gaussian_elbo(
    model: PyroFn,
    x: torch.Tensor,
    z_loc: torch.Tensor,
    z_scale: torch.Tensor,
    num_particles: int = 1,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""The ELBO of each data point under q_i = N(z_loc_i, diag z_scale_i²):

    .. math:: \mathcal L_i = \mathbb E_{q_i}[\log p(x_i \mid z)] - \beta\,
       \mathrm{KL}(q_i \,\|\, p(z)),

    the expectation by Monte Carlo with reparameterized draws z = z_loc + z_scale · ε, the KL in
    closed form (``torch.distributions.kl_divergence`` against the model's prior site). The result
    is differentiable in ``z_loc`` and ``z_scale``; row i depends on row i only. β is the scale
    the model puts on its latent site (1 for a plain VAE).

    The model must have one latent site ``"z"`` of shape ``(B, z_dim)`` inside its data plate
    (:class:`pyrovae.models.VAE`, :class:`pyrovae.models.LinearGaussian`). It is run without
    ``index``, so no N/B subsampling scale enters, and under :func:`pyro.poutine.block`, so the
    call is invisible to any enclosing trace (e.g. the SVI step of a guide that calls this).

    :param model: the generative model.
    :param x: data ``(B, x_dim)``.
    :param z_loc: means ``(B, z_dim)``.
    :param z_scale: standard deviations ``(B, z_dim)``, positive.
    :param num_particles: S, draws of z per point (ignored when ``noise`` is given).
    :param noise: optional fixed ε ``(S, B, z_dim)``; the same ε at every call gives common random
        numbers, so differences between calls measure the change of q, not Monte Carlo noise.
    :return: ``(B,)`` per-point ELBO in nats.
    """
    if z_loc.shape != z_scale.shape or z_loc.dim() != 2 or z_loc.shape[0] != x.shape[0]:
        raise ValueError(
            f"z_loc and z_scale must both be (B, z_dim) with B = x.shape[0] = {x.shape[0]}; got "
            f"{tuple(z_loc.shape)} and {tuple(z_scale.shape)}"
        )
    if noise is None:
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be an integer >= 1, got {num_particles!r}")
        noise = torch.randn((num_particles, *z_loc.shape), dtype=z_loc.dtype, device=z_loc.device)
    if noise.shape[1:] != z_loc.shape:
        raise ValueError(f"noise must be (S, {', '.join(map(str, z_loc.shape))}), got {tuple(noise.shape)}")
    num_samples = noise.shape[0]
    z = z_loc + z_scale * noise
    # The S draws broadcast to the left of the data plate instead of living in a plate of their
    # own: a plate would claim a dimension an enclosing vectorized-particle plate may hold.
    with poutine.block():
        trace = poutine.trace(poutine.condition(model, data={LATENT_SITE: z})).get_trace(x)
    trace = prune_subsample_sites(trace)
    if LATENT_SITE not in trace.nodes:
        raise ValueError(f"the model has no latent site {LATENT_SITE!r}")
    log_lik = torch.zeros(num_samples, x.shape[0], dtype=z.dtype, device=z.device)
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and name != LATENT_SITE:
            if not site["is_observed"]:
                raise ValueError(
                    f"the model has a second latent site {name!r}; gaussian_elbo handles one latent site "
                    f"{LATENT_SITE!r}"
                )
            log_lik = log_lik + cast(dist.TorchDistribution, site["fn"]).log_prob(cast(torch.Tensor, site["value"]))
    prior_site = trace.nodes[LATENT_SITE]
    kl = kl_divergence(dist.Normal(z_loc, z_scale).to_event(1), cast(dist.TorchDistribution, prior_site["fn"]))
    assert log_lik.shape == (num_samples, x.shape[0]) and kl.shape == (x.shape[0],)
    return log_lik.mean(0) - prior_site["scale"] * kl


def refine_gaussian(
    model: PyroFn,
    x: torch.Tensor,
    z_loc: torch.Tensor,
    z_scale: torch.Tensor,
    num_steps: int,
    lr: float = 3e-2,
    num_particles: int = 1,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """``num_steps`` Adam steps on every point's own ELBO (:func:`gaussian_elbo`) from
    ``(z_loc, z_scale)``, the model held fixed.

    The variables are z_loc and log z_scale, one row per point, with Adam's state per element and
    fresh at each call, so every row follows the trajectory it would follow alone. The model's
    parameters get no gradient (``torch.autograd.grad`` with respect to the local variables only).
    The refinement is not differentiated through: the results are detached.

    :return: refined ``(z_loc, z_scale)`` (detached) and the mean single-draw ELBO estimate before
        each step (nats per point).
    """
    if not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be an integer >= 0, got {num_steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    beta1, beta2 = betas
    loc = z_loc.detach().clone().requires_grad_(True)
    log_scale = z_scale.detach().log().requires_grad_(True)
    moments = [(torch.zeros_like(loc), torch.zeros_like(loc)) for _ in range(2)]
    trajectory: list[float] = []
    with torch.enable_grad():
        for step in range(1, num_steps + 1):
            elbo = gaussian_elbo(model, x, loc, log_scale.exp(), num_particles)
            grads = torch.autograd.grad(elbo.sum(), [loc, log_scale])
            trajectory.append(elbo.detach().mean().item())
            with torch.no_grad():
                for variable, grad, (m, v) in zip((loc, log_scale), grads, moments):
                    m.lerp_(grad, 1 - beta1)
                    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    m_hat = m / (1 - beta1**step)
                    v_hat = v / (1 - beta2**step)
                    variable.add_(lr * m_hat / (v_hat.sqrt() + eps))  # ascent on the ELBO
    return loc.detach(), log_scale.detach().exp(), trajectory


class SemiAmortizedGuide:
    """q(z|x) = N(λ_T), where λ_0 = (z_loc, z_scale) = encoder(x) and λ_T follows from
    ``num_steps`` Adam steps on each point's ELBO in the current model (:func:`refine_gaussian`),
    run afresh on every call, i.e. on every minibatch.

    **Gradients.** The refinement is not differentiated through. The encoder gets the gradient of
    the refined ELBO as if λ_T − λ_0 did not depend on λ_0 (a straight-through estimator: λ =
    λ_0 + stop_gradient(λ_T − λ_0)), i.e. ∂L/∂λ evaluated at λ_T. This is the first-order
    approximation (dλ_T/dλ_0 ≈ I) of the unrolled gradient that SA-VAE (Kim et al. 2018) computes
    with Hessian-vector products. The model gets its usual gradient ∂L(θ, λ_T)/∂θ, as in SA-VAE
    and in Krishnan et al. (2018). With ``num_steps=0`` this is exactly
    :class:`~pyrovae.guides.AmortizedGuide`.

    :param encoder: ``torch.nn.Module`` mapping ``x`` to ``(z_loc, z_scale)``.
    :param model: the model whose per-point ELBO is refined (it must have one latent site ``"z"``,
        see :func:`gaussian_elbo`).
    :param num_steps: T, refinement steps per call.
    :param lr: Adam step size of the refinement (in the units of z_loc and log z_scale).
    :param num_particles: draws of z per point in each refinement step's ELBO estimate.
    :param beta: KL weight; must equal the model's β.
    :param name: name under which the encoder is registered with ``pyro.module``.

    **References**

    - [1] Y. Kim, S. Wiseman, A. C. Miller, D. Sontag, A. M. Rush, "Semi-Amortized Variational
      Autoencoders", ICML 2018.
    - [2] R. G. Krishnan, D. Liang, M. D. Hoffman, "On the challenges of learning with inference
      networks on sparse, high-dimensional data", AISTATS 2018.
    - [3] C. Cremer, X. Li, D. Duvenaud, "Inference Suboptimality in Variational Autoencoders",
      ICML 2018.
    """

    amortized = True

    def __init__(
        self,
        encoder: nn.Module,
        model: PyroFn,
        num_steps: int = 10,
        lr: float = 3e-2,
        num_particles: int = 1,
        beta: float = 1.0,
        name: str = "encoder",
    ) -> None:
        if not isinstance(num_steps, int) or num_steps < 0:
            raise ValueError(f"num_steps must be an integer >= 0, got {num_steps!r}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be an integer >= 1, got {num_particles!r}")
        self.encoder = encoder
        self.model = model
        self.num_steps = num_steps
        self.lr = float(lr)
        self.num_particles = num_particles
        self.beta = float(beta)
        self.name = name

    def refine(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The refined (z_loc, z_scale) for a batch, straight-through differentiable in the
        encoder's output (see the class docstring)."""
        z_loc0, z_scale0 = self.encoder(x)
        if self.num_steps == 0:
            return z_loc0, z_scale0
        z_loc, z_scale, _ = refine_gaussian(
            self.model, x, z_loc0, z_scale0, self.num_steps, self.lr, self.num_particles
        )
        z_loc = z_loc0 + (z_loc - z_loc0).detach()
        log_scale0 = z_scale0.log()
        z_scale = (log_scale0 + (z_scale.log() - log_scale0).detach()).exp()
        return z_loc, z_scale

    def __call__(
        self,
        x: Optional[torch.Tensor],
        index: Optional[torch.Tensor] = None,
        num_data: Optional[int] = None,
    ) -> torch.Tensor:
        if x is None:
            raise ValueError("the semi-amortized guide needs the data x: q(z|x) is refined on x")
        register(self.name, self.encoder)
        z_loc, z_scale = self.refine(x)
        with data_plate(x, index, num_data):
            with latent_scale(self.beta):
                return pyro.sample(LATENT_SITE, diag_normal(z_loc, z_scale))
