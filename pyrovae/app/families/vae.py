"""``model="vae"``: :class:`pyrovae.models.VAE`, an MLP or convolutional decoder p(x|z) under N(0, I) or
a learned prior (``prior``: :mod:`pyrovae.models.priors`).

With ``prior="vamp"`` the model is built with the Gaussian encoder (the VampPrior's components are its
posteriors at the pseudo-inputs) and the amortized guide is built around that same module, under the
same ``pyro.module`` name, so the param store holds each encoder tensor once."""

from __future__ import annotations

import dataclasses
from typing import Any

from pyrovae.app.config import ConfigError
from pyrovae.app.registry import ModelSpec, image_shape

#: The options each learned prior reads (``prior="normal"`` reads none of them).
PRIOR_OPTIONS: dict[str, tuple[str, ...]] = {
    "vamp": ("num_pseudo_inputs", "pseudo_input_init"),
    "mog": ("prior_components",),
    "flow": ("prior_flow", "prior_flow_layers"),
}


def pseudo_input_bounds(config: Any, dataset: Any) -> Any:
    """The range of the VampPrior's pseudo-inputs: [0, 1] for MNIST and Bernoulli data (images), none
    for real-valued data. Read from the data set's name and the likelihood, not from its values, so a
    checkpoint's model is rebuilt alike without the data (``pyrovae sample``)."""
    return (0.0, 1.0) if dataset.name == "mnist" or config.likelihood == "bernoulli" else None


def build_prior(config: Any, dataset: Any) -> Any:
    """The learned prior ``config.prior`` names (``None`` for N(0, I)), on ``config.device``."""
    from pyrovae.models.priors import FlowPrior, MixturePrior, VampPrior

    if config.prior == "normal":
        return None
    if config.prior == "vamp":
        from pyrovae.app.families.amortized import gaussian_encoder

        return VampPrior(
            gaussian_encoder(config, dataset),
            dataset.x_dim,
            config.num_pseudo_inputs,
            bounds=pseudo_input_bounds(config, dataset),
        ).to(config.device)
    if config.prior == "mog":
        return MixturePrior(config.z_dim, config.prior_components).to(config.device)
    return FlowPrior(config.z_dim, config.prior_flow_layers, kind=config.prior_flow).to(config.device)


def build_vae(config: Any, dataset: Any) -> Any:
    from pyrovae.models import VAE
    from pyrovae.nets import ConvDecoder, Decoder, _conv_width

    shape = image_shape(config, dataset)
    decoder = (
        Decoder(config.z_dim, dataset.x_dim, config.hidden_sizes, config.activation)
        if shape is None
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
        prior=build_prior(config, dataset),
    )


def vae_amortized_guide(config: Any, dataset: Any, model: Any) -> Any:
    """``guide="amortized"``: a Gaussian encoder; with a VampPrior, the prior's encoder under its name."""
    from pyrovae.app.families.amortized import gaussian_encoder_guide
    from pyrovae.guides import AmortizedGuide
    from pyrovae.models.priors import VampPrior

    prior = getattr(model, "latent_prior", None)
    if isinstance(prior, VampPrior):
        return AmortizedGuide(
            prior.encoder, beta=config.beta, reparameterized=config.reparameterized, name=prior.encoder_name
        )
    return gaussian_encoder_guide(config, dataset, model)


def start_at_the_data_mean(config: Any, dataset: Any, model: Any) -> None:
    """``data_bias=True``: the MLP decoder's output bias becomes the logit of the mean training image."""
    from pyrovae.nets import init_output_bias_

    if config.data_bias:
        init_output_bias_(model.decoder, dataset.train.mean(0), config.likelihood)


def start_from_the_data(config: Any, dataset: Any, model: Any) -> None:
    """``data_bias`` (:func:`start_at_the_data_mean`) and ``pseudo_input_init="data"``: the VampPrior's
    pseudo-inputs start at random training points plus N(0, 0.01²) noise."""
    from pyrovae.models.priors import pseudo_inputs_from_data

    start_at_the_data_mean(config, dataset, model)
    if config.prior == "vamp" and config.pseudo_input_init == "data":
        model.latent_prior.init_pseudo_inputs_(pseudo_inputs_from_data(config.num_pseudo_inputs, dataset.train))


def check_data_bias(config: Any) -> None:
    if config.data_bias and config.network != "mlp":
        raise ConfigError(
            f"data_bias=True sets the output bias of an MLP decoder; network={config.network!r} has none: "
            "drop it, or choose network='mlp'",
            "data_bias",
            "network",
        )


def check_prior(config: Any) -> None:
    """The options of a prior other than the chosen one stay at their defaults; the VampPrior needs the
    amortized Gaussian encoder; guide='prior' is N(0, I); the flow prior is autoregressive."""
    from pyrovae.app.config import ModelConfig

    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    for kind, names in PRIOR_OPTIONS.items():
        if kind == config.prior:
            continue
        for name in names:
            value = getattr(config, name)
            if value != defaults[name]:
                raise ConfigError(
                    f"{name}={value!r} is an option of prior={kind!r}; prior={config.prior!r} has none: drop it, "
                    f"or choose prior={kind!r}",
                    name,
                    "prior",
                )
    if config.prior == "vamp" and config.guide != "amortized":
        raise ConfigError(
            f"prior='vamp' is a mixture of the amortized Gaussian encoder's posteriors and shares that encoder "
            f"with the guide; guide={config.guide!r} has no such encoder: use guide='amortized', or prior='mog' "
            "or prior='flow'",
            "prior",
            "guide",
        )
    if config.prior != "normal" and config.guide == "prior":
        raise ConfigError(
            f"guide='prior' samples N(0, I), which is the prior only for prior='normal'; prior={config.prior!r} "
            "is learned: choose another guide, or prior='normal'",
            "guide",
            "prior",
        )
    if config.prior == "flow" and config.z_dim < 2:
        raise ConfigError(
            f"prior='flow' is autoregressive and needs z_dim ≥ 2, got z_dim={config.z_dim}: choose prior='mog' "
            "for one latent dimension",
            "z_dim",
            "prior",
        )


def check_vae(config: Any) -> None:
    check_data_bias(config)
    check_prior(config)


#: The options the MLP/conv VAEs read that other families do not.
DECODER_OPTIONS = ("network", "data_bias", "x_scale_shape")

SPECS = (
    ModelSpec(
        name="vae",
        build=build_vae,
        help="MLP or convolutional decoder, z ~ N(0, I) or a learned prior (prior)",
        options=(*DECODER_OPTIONS, "prior", *(name for names in PRIOR_OPTIONS.values() for name in names)),
        amortized_guide=vae_amortized_guide,
        check=check_vae,
        data_init=start_from_the_data,
    ),
)
