"""``guide="amortized"``: an encoder q(z|x). The model family may bring its own
(``ModelSpec.amortized_guide``, e.g. the hierarchical or the VQ encoder); otherwise a Gaussian
encoder, MLP or convolutional (:class:`pyrovae.AmortizedGuide`)."""

from __future__ import annotations

from typing import Any

from pyrovae.app.registry import GuideSpec, image_shape, model_spec


def gaussian_encoder(config: Any, dataset: Any) -> Any:
    """The MLP or convolutional Gaussian encoder the config describes, on ``config.device``."""
    from pyrovae.nets import ConvGaussianEncoder, GaussianEncoder, _conv_width

    shape = image_shape(config, dataset)
    encoder = (
        GaussianEncoder(dataset.x_dim, config.z_dim, config.hidden_sizes, config.activation)
        if shape is None
        else ConvGaussianEncoder(shape, config.z_dim, _conv_width(config.hidden_sizes), activation=config.activation)
    )
    return encoder.to(config.device)


def gaussian_encoder_guide(config: Any, dataset: Any, model: Any) -> Any:
    from pyrovae.guides import AmortizedGuide

    return AmortizedGuide(gaussian_encoder(config, dataset), beta=config.beta, reparameterized=config.reparameterized)


def build_amortized(config: Any, dataset: Any, model: Any) -> Any:
    own = model_spec(config.model).amortized_guide
    return (own or gaussian_encoder_guide)(config, dataset, model)


SPECS = (GuideSpec(name="amortized", build=build_amortized, help="an encoder network q(z|x)"),)
