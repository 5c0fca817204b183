"""Cremer, Li & Duvenaud (2018), Table 2: log p̂(x), L[q*_Flow], L[q*_FFG] and L[q] of a trained
decoder, and its approximation and amortization gaps (:mod:`experiments.inference_gaps`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Settings:
    """How the gaps of one decoder are measured (the script's flags)."""

    num_points: int = 1000
    elbo_draws: int = 1000
    is_samples: int = 5000
    local_steps: int = 3000
    local_particles: int = 8
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
