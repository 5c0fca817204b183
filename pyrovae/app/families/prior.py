"""``guide="prior"``: q(z) = p(z) (:class:`pyrovae.PriorGuide`), the baseline of importance sampling."""

from __future__ import annotations

from typing import Any

from pyrovae.app.registry import GuideSpec


def build_prior(config: Any, dataset: Any, model: Any) -> Any:
    from pyrovae.guides import PriorGuide

    return PriorGuide(config.z_dim, beta=config.beta)


SPECS = (GuideSpec(name="prior", build=build_prior, help="q(z) = p(z), no parameters"),)
