"""The importance-weighted bound (IWAE), right under subsampling and for discrete guides."""

from __future__ import annotations

import math

import torch

from pyrovae.objectives.base import PerDatapointObjective, log_mean_exp
from pyrovae.objectives.weights import LogWeights


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

    **References**

    [1] Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
    [2] A. Mnih, D. J. Rezende, "Variational Inference for Monte Carlo Objectives", ICML 2016.
    """

    def value_and_score_term(self, weights: LogWeights) -> tuple[torch.Tensor, torch.Tensor]:
        log_w = weights.log_w
        bound = log_mean_exp(log_w)
        assert bound.shape == log_w.shape[-1:]
        value = weights.plate_scale * bound.sum()
        if weights.score_log_q is None:
            return value, torch.zeros((), device=log_w.device)
        if self.num_particles == 1:
            signal = bound.detach().unsqueeze(0)
        else:
            signal = vimco_learning_signal(log_w)
        return value, weights.plate_scale * (signal * weights.score_log_q).sum()
