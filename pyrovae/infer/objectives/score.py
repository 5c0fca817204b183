"""The ELBO with the log-derivative (score-function, REINFORCE) gradient estimator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Optional

import torch

from pyrovae.handlers import DATA_PLATE, score_function
from pyrovae.infer.objectives.base import PerDatapointObjective
from pyrovae.infer.weights import LogWeights

Baseline = Literal["auto", "none", "leave-one-out", "moving-average"]
BASELINES: tuple[str, ...] = ("auto", "none", "leave-one-out", "moving-average")


class ScoreFunctionELBO(PerDatapointObjective):
    r"""The ELBO, with gradients for the guide from the log-derivative trick only,

    .. math:: \nabla_φ \mathbb E_q[f] = \mathbb E_q[(f - b)\, \nabla_φ \log q_φ(z)],
       \qquad f = \log p_θ(x, z) - \log q_φ(z \mid x),

    whatever the guide: every latent sample is made non-reparameterized, so no pathwise gradient
    flows. Each data point gets its own learning signal f_kb (the plate's conditional independence
    keeps other points' terms out). The baseline b is the mean of the other K-1 particles' f for
    the same point (K >= 2), or an exponential moving average of past batch means (K = 1); both are
    independent of z_kb, so the estimator stays unbiased.

    :param num_particles: K.
    :param baseline_decay: decay of the moving-average baseline.
    :param baseline: ``"auto"`` (leave-one-out for K >= 2, moving average for K = 1),
        ``"leave-one-out"`` (needs K >= 2), ``"moving-average"`` (an exponential moving average of
        past batch means of f, one scalar for the whole batch), or ``"none"`` (b = 0, the plain
        REINFORCE estimator, for comparisons).

    **References**

    - [1] R. J. Williams, "Simple statistical gradient-following algorithms for connectionist
      reinforcement learning", Machine Learning 1992.
    - [2] J. Paisley, D. Blei, M. Jordan, "Variational Bayesian Inference with Stochastic Search",
      ICML 2012.
    """

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float = float("inf"),
        plate_name: str = DATA_PLATE,
        baseline_decay: float = 0.9,
        baseline: Baseline = "auto",
    ) -> None:
        if not 0 <= baseline_decay < 1:
            raise ValueError(f"baseline_decay must be in [0, 1), got {baseline_decay}")
        if baseline not in BASELINES:
            raise ValueError(f"unknown baseline {baseline!r}; choose one of {BASELINES}")
        if baseline == "leave-one-out" and num_particles < 2:
            raise ValueError(
                "the leave-one-out baseline needs num_particles >= 2; use baseline='moving-average' "
                "(or 'auto') with one particle"
            )
        super().__init__(num_particles, max_plate_nesting, plate_name)
        self.baseline_decay = baseline_decay
        if baseline == "auto":
            baseline = "leave-one-out" if num_particles > 1 else "moving-average"
        self.baseline = baseline
        self._moving_baseline: Optional[float] = None

    def get_state(self) -> dict[str, Optional[float]]:
        """The moving-average baseline, for checkpoints (a resumed run continues it exactly)."""
        return {"moving_baseline": self._moving_baseline}

    def set_state(self, state: dict[str, Optional[float]]) -> None:
        """Restore the state returned by :meth:`get_state`."""
        self._moving_baseline = state["moving_baseline"]

    def wrap_guide(self, guide: Callable) -> Callable:
        return score_function(guide)

    def value_and_score_term(self, weights: LogWeights) -> tuple[torch.Tensor, torch.Tensor]:
        log_w = weights.log_w
        num_particles = log_w.shape[0]
        value = weights.plate_scale * log_w.mean(0).sum()
        f = log_w.detach()
        if self.baseline == "none":
            baseline = torch.zeros_like(f)
        elif self.baseline == "leave-one-out":
            baseline = (f.sum(0, keepdim=True) - f) / (num_particles - 1)
        else:
            baseline = torch.full_like(f, self._moving_baseline or 0.0)
            if torch.is_grad_enabled():
                batch_mean = f.mean().item()
                self._moving_baseline = (
                    batch_mean
                    if self._moving_baseline is None
                    else self.baseline_decay * self._moving_baseline + (1 - self.baseline_decay) * batch_mean
                )
        assert weights.score_log_q is not None
        score_term = ((f - baseline) * weights.score_log_q).mean(0).sum()
        return value, weights.plate_scale * score_term
