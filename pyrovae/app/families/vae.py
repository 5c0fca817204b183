"""``model="vae"``: :class:`pyrovae.models.VAE`, an MLP or convolutional decoder p(x|z) under N(0, I)."""

from __future__ import annotations

from typing import Any

from pyrovae.app.config import ConfigError
from pyrovae.app.registry import ModelSpec, image_shape


def build_vae(config: Any, dataset: Any) -> Any:
    from pyrovae.models import VAE
    from pyrovae.nets import ConvDecoder, Decoder, _conv_width

    shape = image_shape(config, dataset)
    decoder = (
        Decoder(config.z_dim, dataset.x_dim, config.hidden_sizes, config.activation) if shape is None
        else ConvDecoder(config.z_dim, shape, _conv_width(config.hidden_sizes), activation=config.activation)
    )
    return VAE(
        decoder.to(config.device),
        config.z_dim,
        likelihood=config.likelihood,
        x_scale=config.x_scale,
        learn_x_scale=config.learn_x_scale,
        beta=config.beta,
        x_scale_shape=config.x_scale_shape,
    )


def start_at_the_data_mean(config: Any, dataset: Any, model: Any) -> None:
    """``data_bias=True``: the MLP decoder's output bias becomes the logit of the mean training image."""
    from pyrovae.nets import init_output_bias_

    if config.data_bias:
        init_output_bias_(model.decoder, dataset.train.mean(0), config.likelihood)


def check_data_bias(config: Any) -> None:
    if config.data_bias and config.network != "mlp":
        raise ConfigError(
            f"data_bias=True sets the output bias of an MLP decoder; network={config.network!r} has none: "
            "drop it, or choose network='mlp'", "data_bias", "network",
        )


#: The options the MLP/conv VAEs read that other families do not.
DECODER_OPTIONS = ("network", "data_bias", "x_scale_shape")

SPECS = (
    ModelSpec(
        name="vae",
        build=build_vae,
        help="MLP or convolutional decoder, z ~ N(0, I)",
        options=DECODER_OPTIONS,
        check=check_data_bias,
        data_init=start_at_the_data_mean,
    ),
)
