"""The importance-weighted bound (IWAE), right under subsampling and for discrete guides."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional

import torch

from pyrovae.handlers import DATA_PLATE
from pyrovae.infer.objectives.base import PerDatapointObjective, log_mean_exp
from pyrovae.infer.objectives.pathwise import stick_the_landing_
from pyrovae.infer.weights import LogWeights

#: Gradient estimators of :class:`IWAE` for reparameterized guide sites.
IWAE_ESTIMATORS: tuple[str, ...] = ("standard", "stl", "dreg")


def vimco_learning_signal(log_w: torch.Tensor) -> torch.Tensor:
    r"""VIMCO's per-sample learning signal L - L̂_{-k} for the score-function term.

    L = log (1/K) Σ_j w_j and L̂_{-k} replaces w_k by the geometric mean of the other weights, so
    it does not depend on z_k and subtracting it keeps the gradient unbiased.

    :param log_w: ``(K, B)`` log-weights, K >= 2.
    :return: ``(K, B)``, detached.
    """
    log_w = log_w.detach()
    num_particles, batch = log_w.shape
    if num_particles < 2:
        raise ValueError("the leave-one-out signal needs at least 2 particles")
    bound = log_mean_exp(log_w)
    mean_of_others = (log_w.sum(0, keepdim=True) - log_w) / (num_particles - 1)
    leave_one_out = log_w.unsqueeze(0).repeat(num_particles, 1, 1)  # [k, j, b]
    diagonal = torch.arange(num_particles, device=log_w.device)
    leave_one_out[diagonal, diagonal] = mean_of_others
    signal = bound - (torch.logsumexp(leave_one_out, 1) - math.log(num_particles))
    assert signal.shape == (num_particles, batch)
    return signal


def iwae_value_and_score_term(weights: LogWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """The IWAE bound (N/B) Σ_b log (1/K) Σ_k w_kb of ``(K, B)`` log-weights, and its score-function
    surrogate: VIMCO's leave-one-out signal for K >= 2, the bound itself (no baseline) for K = 1."""
    log_w = weights.log_w
    bound = log_mean_exp(log_w)
    assert bound.shape == log_w.shape[-1:]
    value = weights.plate_scale * bound.sum()
    if weights.score_log_q is None:
        return value, torch.zeros((), device=log_w.device)
    if log_w.shape[0] == 1:
        signal = bound.detach().unsqueeze(0)
    else:
        signal = vimco_learning_signal(log_w)
    return value, weights.plate_scale * (signal * weights.score_log_q).sum()


class IWAE(PerDatapointObjective):
    r"""The importance-weighted autoencoder bound with K samples,

    .. math:: \mathcal L_K = \sum_{n} \log \frac1K \sum_{k=1}^K
       \frac{p_θ(x_n, z_{nk})}{q_φ(z_{nk} \mid x_n)}, \qquad z_{nk} \sim q_φ(z \mid x_n),

    estimated on a minibatch of B out of N points as (N/B) Σ_{b} log (1/K) Σ_k w_kb: the plate's
    N/B scale is applied *outside* the logsumexp, so the estimate is unbiased for the full-data
    bound. (Pyro's ``RenyiELBO(alpha=0)`` puts the scale inside, and gives no gradient to
    non-reparameterized guide sites.) Other site scales (β) stay inside, on each log-density.

    Reparameterized sites get the pathwise gradient; non-reparameterized sites the score-function
    gradient with VIMCO's leave-one-out baseline (K >= 2) or no baseline (K = 1), both unbiased.

    :param num_particles: K.
    :param max_plate_nesting: plates nested in model and guide (guessed if omitted).
    :param estimator: the gradient of reparameterized guide sites: ``"standard"`` (the pathwise
        gradient of the bound), ``"stl"`` (log q with detached parameters; biased for K > 1) or
        ``"dreg"`` (doubly reparameterized, unbiased; :mod:`pyrovae.infer.objectives.pathwise`).

    **References**

    - [1] Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
    - [2] A. Mnih, D. J. Rezende, "Variational Inference for Monte Carlo Objectives", ICML 2016.
    """

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float = float("inf"),
        plate_name: str = DATA_PLATE,
        estimator: str = "standard",
    ) -> None:
        if estimator not in IWAE_ESTIMATORS:
            raise ValueError(f"unknown IWAE gradient estimator {estimator!r}; choose one of {IWAE_ESTIMATORS}")
        super().__init__(num_particles, max_plate_nesting, plate_name)
        self.estimator = estimator

    def prepare_traces(self, model_trace: Any, guide_trace: Any) -> Optional[Callable[[LogWeights], None]]:
        if self.estimator == "standard":
            return None
        names = stick_the_landing_(guide_trace)
        if self.estimator != "dreg" or not torch.is_grad_enabled():
            return None
        values = [guide_trace.nodes[name]["value"] for name in names]

        def weight_the_sample_gradients(weights: LogWeights) -> None:
            # Weight the gradient reaching each sample z_k by w̃_k: the surrogate's Σ w̃_k ∂log w_k
            # then gives the encoder Σ w̃_k² ∂log w_k/∂z_k ∂z_k/∂φ (DReG); the decoder's gradient
            # does not pass through z and stays Σ w̃_k ∇θ log w_k.
            normalized = torch.softmax(weights.log_w.detach(), dim=0)  # (K, B)
            for value in values:
                if not value.requires_grad:
                    continue
                if tuple(value.shape[:2]) != tuple(normalized.shape):
                    raise ValueError(
                        f"DReG needs latent samples of shape (K, B, ...), got {tuple(value.shape)} for "
                        f"(K, B) = {tuple(normalized.shape)}"
                    )
                factor = normalized.reshape(normalized.shape + (1,) * (value.dim() - 2))
                value.register_hook(lambda grad, factor=factor: grad * factor)

        return weight_the_sample_gradients

    def value_and_score_term(self, weights: LogWeights) -> tuple[torch.Tensor, torch.Tensor]:
        return iwae_value_and_score_term(weights)


class STLELBO(PerDatapointObjective):
    r"""The K-sample ELBO (1/K) Σ_k log w_k with the "sticking the landing" gradient (Roeder et al.
    2017): log q is evaluated with its parameters detached, so the guide's gradient flows only
    through the samples. Unbiased for the ELBO's gradient, and of zero variance when q is the exact
    posterior. Needs a reparameterized guide with one latent site
    (:func:`pyrovae.infer.objectives.pathwise.stick_the_landing_`). The value is the ELBO itself.

    :param num_particles: K.
    """

    def prepare_traces(self, model_trace: Any, guide_trace: Any) -> None:
        stick_the_landing_(guide_trace)

    def value_and_score_term(self, weights: LogWeights) -> tuple[torch.Tensor, torch.Tensor]:
        value = weights.plate_scale * weights.log_w.mean(0).sum()
        return value, torch.zeros((), device=value.device)
