"""``model="hvae"``: :class:`pyrovae.models.HierarchicalVAE`, several stochastic layers, trained with
its bottom-up :class:`pyrovae.HierarchicalGuide` (the amortized guide of this family)."""

from __future__ import annotations

from typing import Any

from pyrovae.app.families.vae import DECODER_OPTIONS, check_data_bias, start_at_the_data_mean
from pyrovae.app.registry import ModelSpec, image_shape


def build_hvae(config: Any, dataset: Any) -> Any:
    from pyrovae.models import HierarchicalVAE
    from pyrovae.nets import HierarchicalDecoder

    decoder = HierarchicalDecoder(
        dataset.x_dim,
        (config.z_dim, *config.upper_z_dims),
        config.hidden_sizes,
        config.upper_hidden_sizes,
        config.activation,
        image_shape=image_shape(config, dataset),
    )
    return HierarchicalVAE(
        decoder.to(config.device),
        likelihood=config.likelihood,
        x_scale=config.x_scale,
        learn_x_scale=config.learn_x_scale,
        beta=config.beta,
        x_scale_shape=config.x_scale_shape,
    )


def build_hierarchical_guide(config: Any, dataset: Any, model: Any) -> Any:
    from pyrovae.guides import HierarchicalGuide
    from pyrovae.nets import HierarchicalEncoder

    encoder = HierarchicalEncoder(
        dataset.x_dim,
        model.z_dims,
        config.hidden_sizes,
        config.upper_hidden_sizes,
        config.activation,
        image_shape=image_shape(config, dataset),
    )
    return HierarchicalGuide(encoder.to(config.device), beta=config.beta, reparameterized=config.reparameterized)


def default_layers(config: dict[str, Any]) -> dict[str, Any]:
    """One upper layer of ``z_dim // 2``; hidden widths half of ``hidden_sizes``."""
    more: dict[str, Any] = {}
    if not config["upper_z_dims"]:
        more["upper_z_dims"] = (max(1, config["z_dim"] // 2),)
    if config["upper_hidden_sizes"] is None:
        more["upper_hidden_sizes"] = tuple(max(1, h // 2) for h in config["hidden_sizes"])
    return more


SPECS = (
    ModelSpec(
        name="hvae",
        build=build_hvae,
        help="several stochastic layers z_L -> ... -> z_1 -> x (upper_z_dims)",
        options=(*DECODER_OPTIONS, "upper_z_dims", "upper_hidden_sizes"),
        guides=("amortized",),
        amortized_guide=build_hierarchical_guide,
        check=check_data_bias,
        data_init=start_at_the_data_mean,
        defaults=default_layers,
    ),
)
