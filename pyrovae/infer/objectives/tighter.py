r"""MIWAE, PIWAE and CIWAE: the bounds of Rainforth, Kosiorek, Le, Maddison, Igl, Wood & Teh (2018),
"Tighter variational bounds are not necessarily better".

Write ℓ_kb = log w_kb = log p(x_b, z_kb) - log q(z_kb | x_b) for the per-data-point log-weights
(:mod:`pyrovae.infer.weights`; β-scaled latent sites scaled by β) and IWAE_K(x) = log (1/K) Σ_k w_k.
On a minibatch of B of N points each bound is (N/B) Σ_b of its per-point value, the plate's N/B
outside every log-sum-exp (as in :class:`~pyrovae.infer.objectives.iwae.IWAE`), so the minibatch
estimate is unbiased for the full-data bound:

- **MIWAE(M, K)** = (1/M) Σ_{m=1}^M log (1/K) Σ_{k=1}^K w_mk: M independent IWAE_K estimates
  averaged, from M·K draws. MIWAE(1, K) = IWAE_K, MIWAE(M, 1) = the ELBO with M particles.
- **CIWAE(β)** = β ELBO + (1 - β) IWAE_K, both from the same K draws (the ELBO being
  (1/K) Σ_k log w_k). CIWAE(1) = ELBO, CIWAE(0) = IWAE_K.
- **PIWAE(M, K)**: the model (decoder) is trained on IWAE_{MK} of all M·K draws, the guide
  (encoder) on MIWAE(M, K) of the same draws, in one backward pass; its value is IWAE_{MK}.

Gradients. Reparameterized guide sites get the pathwise gradient of the bound; non-reparameterized
ones the score-function gradient with VIMCO's leave-one-out signal within each group of K (K >= 2)
or no baseline (K = 1) for the IWAE parts, and a leave-one-out baseline (K >= 2) for CIWAE's ELBO
part. All are unbiased for the gradient of their bound.

PIWAE routes its two gradients with one extra pass of the model at the detached samples: with
ℓ the log-weights as drawn and ℓ^θ = log p_θ(x, sg z) - sg log q(z|x) (``sg``: detached; its
values equal ℓ's, and only the model's parameters θ reach it), the surrogate

.. math:: S = \mathrm{IWAE}_{MK}(ℓ^θ) + \mathrm{MIWAE}_{M,K}(ℓ) - \mathrm{MIWAE}_{M,K}(ℓ^θ)

has the value IWAE_{MK}, the model-parameter gradient ∇_θ IWAE_{MK} (the last two terms have the
same θ-gradient, z not depending on θ) and the guide-parameter gradient ∇_φ MIWAE (ℓ^θ has none).
"Model" and "guide" parameters are those the model's and the guide's computation reach; a
parameter both use (e.g. an encoder shared by a VampPrior) gets the sum of both routes.

**References**

- [1] T. Rainforth, A. R. Kosiorek, T. A. Le, C. J. Maddison, M. Igl, F. Wood, Y. W. Teh, "Tighter
  Variational Bounds are Not Necessarily Better", ICML 2018.
- [2] Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites

from pyrovae.handlers import DATA_PLATE
from pyrovae.infer.objectives.base import PerDatapointObjective
from pyrovae.infer.objectives.iwae import iwae_value_and_score_term
from pyrovae.infer.weights import (
    PARTICLE_PLATE,
    LogWeights,
    guess_max_plate_nesting,
    per_datapoint_log_weights,
    vectorized_traces,
)

__all__ = ["CIWAE", "MIWAE", "PIWAE", "group_log_weights"]


def _check_count(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def group_log_weights(weights: LogWeights, num_groups: int) -> LogWeights:
    """``(M·K, B)`` log-weights as M groups of K for each point: ``(K, M·B)``, column ``m·B + b``
    holding group m of point b (draw ``m·K + k`` is particle k of group m), the plate scale
    divided by M. Then :func:`~pyrovae.infer.objectives.iwae.iwae_value_and_score_term` of the
    result is MIWAE(M, K), its score term VIMCO within each group."""
    draws, batch = weights.log_w.shape
    if draws % num_groups:
        raise ValueError(f"{draws} draws do not split into num_groups={num_groups} groups")
    k = draws // num_groups

    def regroup(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(num_groups, k, batch).transpose(0, 1).reshape(k, num_groups * batch)

    score = None if weights.score_log_q is None else regroup(weights.score_log_q)
    return LogWeights(regroup(weights.log_w), score, weights.plate_scale / num_groups)


def miwae_value_and_score_term(weights: LogWeights, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MIWAE(M, K) = (N/B) Σ_b (1/M) Σ_m log (1/K) Σ_k w_mkb of ``(M·K, B)`` log-weights, and its
    score-function surrogate (VIMCO within each group)."""
    return iwae_value_and_score_term(group_log_weights(weights, num_groups))


class MIWAE(PerDatapointObjective):
    r"""The multiply importance-weighted bound (Rainforth et al. 2018),

    .. math:: \mathrm{MIWAE}(M, K) = \sum_n \frac1M \sum_{m=1}^M \log \frac1K \sum_{k=1}^K
       \frac{p_θ(x_n, z_{nmk})}{q_φ(z_{nmk} \mid x_n)}, \qquad z_{nmk} \sim q_φ(z \mid x_n),

    from M·K vectorized draws per point (:mod:`pyrovae.infer.objectives.tighter`), with the data
    plate's N/B outside the log-sum-exp. MIWAE(1, K) is IWAE_K; MIWAE(M, 1) the M-particle ELBO.

    :param num_particles: K, the particles of each importance-weighted estimate.
    :param max_plate_nesting: plates nested in model and guide (guessed if omitted).
    :param plate_name: the plate over data points.
    :param num_groups: M, the number of independent IWAE_K estimates averaged.
    """

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float = float("inf"),
        plate_name: str = DATA_PLATE,
        num_groups: int = 1,
    ) -> None:
        _check_count("num_groups", num_groups)
        super().__init__(num_particles, max_plate_nesting, plate_name)
        self.num_groups = num_groups

    @property
    def num_draws(self) -> int:
        return self.num_groups * self.num_particles

    @property
    def bound_name(self) -> str:
        return f"MIWAE (M={self.num_groups}, K={self.num_particles})"

    def value_and_score_term(self, weights: LogWeights) -> tuple[torch.Tensor, torch.Tensor]:
        return miwae_value_and_score_term(weights, self.num_groups)


class CIWAE(PerDatapointObjective):
    r"""The combination importance-weighted bound (Rainforth et al. 2018),

    .. math:: \mathrm{CIWAE}(β) = β\, \mathrm{ELBO} + (1 - β)\, \mathrm{IWAE}_K
       = \sum_n \Big[\frac{β}{K} \sum_k \log w_{nk} + (1 - β) \log \frac1K \sum_k w_{nk}\Big],

    both terms from the same K draws per point. Its β (``ciwae_beta``) is not the KL weight of a
    β-VAE (which scales the latent sites inside every log w).

    :param num_particles: K.
    :param max_plate_nesting: plates nested in model and guide (guessed if omitted).
    :param plate_name: the plate over data points.
    :param ciwae_beta: β in [0, 1], the ELBO's weight: 1 gives the ELBO, 0 the IWAE bound.
    """

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float = float("inf"),
        plate_name: str = DATA_PLATE,
        ciwae_beta: float = 0.5,
    ) -> None:
        if isinstance(ciwae_beta, bool) or not isinstance(ciwae_beta, (int, float)) or not 0 <= ciwae_beta <= 1:
            raise ValueError(f"ciwae_beta must be a number in [0, 1], got {ciwae_beta!r}")
        super().__init__(num_particles, max_plate_nesting, plate_name)
        self.ciwae_beta = float(ciwae_beta)

    @property
    def bound_name(self) -> str:
        return f"CIWAE (β={self.ciwae_beta:g}, K={self.num_particles})"

    def value_and_score_term(self, weights: LogWeights) -> tuple[torch.Tensor, torch.Tensor]:
        beta = self.ciwae_beta
        log_w = weights.log_w
        elbo = weights.plate_scale * log_w.mean(0).sum()
        iwae, iwae_score = iwae_value_and_score_term(weights)
        value = beta * elbo + (1 - beta) * iwae
        if weights.score_log_q is None:
            return value, torch.zeros((), device=log_w.device)
        # The ELBO's score term: (1/K) Σ_k (ℓ_k - b_k) ∇ log q_k, with b_k the mean of the other
        # K - 1 particles' ℓ (independent of z_k) for K >= 2, no baseline for K = 1.
        f = log_w.detach()
        num_particles = f.shape[0]
        baseline = (f.sum(0, keepdim=True) - f) / (num_particles - 1) if num_particles > 1 else 0.0
        elbo_score = weights.plate_scale * ((f - baseline) * weights.score_log_q).mean(0).sum()
        return value, beta * elbo_score + (1 - beta) * iwae_score


class PIWAE(MIWAE):
    r"""The partially importance-weighted objective (Rainforth et al. 2018): from the same M·K draws
    per point, the model's parameters θ ascend IWAE_{MK} and the guide's parameters φ ascend
    MIWAE(M, K), in one backward pass. The model is run a second time on the detached draws for the
    routing (:mod:`pyrovae.infer.objectives.tighter`), so a step costs about two model passes.

    ``loss`` and ``differentiable_loss`` have the value -IWAE_{MK}.

    :param num_particles: K, the particles of each of the encoder's IWAE estimates.
    :param max_plate_nesting: plates nested in model and guide (guessed if omitted).
    :param plate_name: the plate over data points.
    :param num_groups: M: the encoder's MIWAE averages M estimates of K; the decoder's IWAE uses
        all M·K draws.
    """

    @property
    def bound_name(self) -> str:
        return f"PIWAE (M={self.num_groups}, K={self.num_particles}; IWAE with {self.num_draws} samples)"

    def value_and_score_term(self, weights: LogWeights) -> tuple[torch.Tensor, torch.Tensor]:
        # The value: IWAE_{MK}. (Its gradient is routed in differentiable_loss.)
        return iwae_value_and_score_term(weights)[0], torch.zeros((), device=weights.log_w.device)

    def routed_log_weights(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> tuple[LogWeights, torch.Tensor]:
        """The log-weights ℓ of M·K fresh draws, and ℓ^θ: the same values, computed by replaying the
        model at the detached draws with the guide's log-densities detached, so only the model's
        parameters reach it."""
        guide = self.wrap_guide(guide)
        if self.max_plate_nesting == float("inf"):
            self.max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
        nesting = int(self.max_plate_nesting)
        recorded = poutine.trace_messenger.TraceMessenger()  # the guide's whole trace
        model_trace, guide_trace = vectorized_traces(model, recorded(guide), args, kwargs, self.num_draws, nesting)
        weights = per_datapoint_log_weights(model_trace, guide_trace, self.num_draws, nesting, self.plate_name)

        full = recorded.trace.copy()  # with the subsample sites, so the model's plates replay them
        for name, site in full.nodes.items():
            if site["type"] == "sample" and isinstance(site["value"], torch.Tensor):
                full.nodes[name] = {**site, "value": site["value"].detach()}

        def particles(*a: Any, **k: Any) -> Any:
            with pyro.plate(PARTICLE_PLATE, self.num_draws, dim=-(nesting + 1)):
                return model(*a, **k)

        replayed = poutine.trace(poutine.replay(particles, trace=full)).get_trace(*args, **kwargs)
        replayed = prune_subsample_sites(replayed)
        replayed.compute_log_prob()
        detached_guide = guide_trace.copy()
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"]:
                detached_guide.nodes[name] = {
                    **site,
                    "value": site["value"].detach(),
                    "unscaled_log_prob": site["unscaled_log_prob"].detach(),
                }
        model_only = per_datapoint_log_weights(replayed, detached_guide, self.num_draws, nesting, self.plate_name)
        return weights, model_only.log_w

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        weights, model_only = self.routed_log_weights(model, guide, args, kwargs)
        theta = LogWeights(model_only, None, weights.plate_scale)
        decoder, _ = iwae_value_and_score_term(theta)  # ∇θ IWAE_{MK}
        encoder, encoder_score = miwae_value_and_score_term(weights, self.num_groups)  # ∇θ,φ MIWAE
        encoder_theta, _ = miwae_value_and_score_term(theta, self.num_groups)  # its ∇θ, to cancel
        surrogate = decoder + encoder - encoder_theta + encoder_score
        value = iwae_value_and_score_term(weights)[0].detach()
        return -(value + (surrogate - surrogate.detach()))
