"""``model="linear"``: :class:`pyrovae.models.LinearGaussian`, x = W z + b + noise, whose log p(x) is
known in closed form (evaluation reports it beside the estimates)."""

from __future__ import annotations

from typing import Any

from pyrovae.app.registry import ModelSpec


def build_linear(config: Any, dataset: Any) -> Any:
    from pyrovae.models import LinearGaussian

    model = LinearGaussian(
        dataset.x_dim,
        config.z_dim,
        noise_scale=config.x_scale,
        learn_noise_scale=config.learn_x_scale,
        beta=config.beta,
    )
    model.decoder.to(config.device)
    return model


SPECS = (
    ModelSpec(
        name="linear",
        build=build_linear,
        help="linear-Gaussian model (exact log p(x))",
        likelihoods=("gaussian",),
    ),
)
