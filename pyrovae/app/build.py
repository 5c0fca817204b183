"""Build a (model, guide) pair from a :class:`~pyrovae.app.config.TrainConfig`, through registries."""

from __future__ import annotations

from typing import Any, Callable

import torch

from pyrovae.app.config import TrainConfig
from pyrovae.data import Dataset
from pyrovae.guides import (
    AmortizedGuide,
    HierarchicalGuide,
    PerDatapointGuide,
    PriorGuide,
)
from pyrovae.models import VAE, HierarchicalVAE, LinearGaussian
from pyrovae.models.vqvae import (
    VQVAE,
    VQVAE2,
    VQ2Guide,
    VQ2Networks,
    VQDecoder,
    VQEncoder,
    VQGuide,
)
from pyrovae.nets import (
    ConvDecoder,
    ConvGaussianEncoder,
    Decoder,
    GaussianEncoder,
    HierarchicalDecoder,
    HierarchicalEncoder,
    _conv_width,
    glorot_init_,
    init_output_bias_,
)


def _image_shape(config: TrainConfig, dataset: Dataset) -> Any:
    """The image shape for convolutional networks (``None`` for MLPs)."""
    if config.network != "conv":
        return None
    if dataset.image_shape is None:
        raise ValueError(f"--network conv needs image data; the {dataset.name} data set has no image shape")
    return dataset.image_shape


def _vae(config: TrainConfig, dataset: Dataset) -> VAE:
    image_shape = _image_shape(config, dataset)
    decoder = (
        Decoder(config.z_dim, dataset.x_dim, config.hidden_sizes, config.activation) if image_shape is None
        else ConvDecoder(config.z_dim, image_shape, _conv_width(config.hidden_sizes), activation=config.activation)
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


def _hvae(config: TrainConfig, dataset: Dataset) -> HierarchicalVAE:
    decoder = HierarchicalDecoder(
        dataset.x_dim, (config.z_dim, *config.upper_z_dims), config.hidden_sizes,
        config.upper_hidden_sizes, config.activation, image_shape=_image_shape(config, dataset),
    )
    return HierarchicalVAE(
        decoder.to(config.device),
        likelihood=config.likelihood,
        x_scale=config.x_scale,
        learn_x_scale=config.learn_x_scale,
        beta=config.beta,
        x_scale_shape=config.x_scale_shape,
    )


def _vqvae(config: TrainConfig, dataset: Dataset) -> VQVAE:
    if dataset.image_shape is None:
        raise ValueError(f"the VQ-VAE is convolutional and needs image data; {dataset.name} has no image shape")
    decoder = VQDecoder(dataset.image_shape, config.z_dim, activation=config.activation)
    grid = VQEncoder(dataset.image_shape, config.z_dim).grid
    model = VQVAE(decoder, config.num_codes, config.z_dim, grid, likelihood=config.likelihood,
                  x_scale=config.x_scale, learn_x_scale=config.learn_x_scale, ema_decay=config.codebook_ema)
    decoder.to(config.device)  # after the codebook is added to it
    return model


def _vqvae2(config: TrainConfig, dataset: Dataset) -> VQVAE2:
    if dataset.image_shape is None:
        raise ValueError(f"the VQ-VAE-2 is convolutional and needs image data; {dataset.name} has no image shape")
    networks = VQ2Networks(dataset.image_shape, config.z_dim, config.num_codes_top or config.num_codes,
                           config.num_codes, activation=config.activation, ema_decay=config.codebook_ema)
    return VQVAE2(networks.to(config.device), likelihood=config.likelihood, x_scale=config.x_scale,
                  learn_x_scale=config.learn_x_scale)


def _linear(config: TrainConfig, dataset: Dataset) -> LinearGaussian:
    if config.likelihood != "gaussian":
        raise ValueError("the linear model has a Gaussian likelihood; use --likelihood gaussian")
    model = LinearGaussian(
        dataset.x_dim,
        config.z_dim,
        noise_scale=config.x_scale,
        learn_noise_scale=config.learn_x_scale,
        beta=config.beta,
    )
    model.decoder.to(config.device)
    return model


def _amortized(config: TrainConfig, dataset: Dataset, model: Any) -> AmortizedGuide | HierarchicalGuide:
    if isinstance(model, VQVAE2):
        return VQ2Guide(model, commitment=config.commitment)
    if isinstance(model, VQVAE):
        encoder = VQEncoder(dataset.image_shape, config.z_dim, activation=config.activation)
        return VQGuide(encoder.to(config.device), model, commitment=config.commitment)
    if isinstance(model, HierarchicalVAE):
        encoder = HierarchicalEncoder(
            dataset.x_dim, model.z_dims, config.hidden_sizes, config.upper_hidden_sizes, config.activation,
            image_shape=_image_shape(config, dataset),
        )
        return HierarchicalGuide(encoder.to(config.device), beta=config.beta, reparameterized=config.reparameterized)
    image_shape = _image_shape(config, dataset)
    encoder = (
        GaussianEncoder(dataset.x_dim, config.z_dim, config.hidden_sizes, config.activation) if image_shape is None
        else ConvGaussianEncoder(image_shape, config.z_dim, _conv_width(config.hidden_sizes), activation=config.activation)
    )
    return AmortizedGuide(
        encoder.to(config.device), beta=config.beta, reparameterized=config.reparameterized
    )


def _per_datapoint(config: TrainConfig, dataset: Dataset, model: Any) -> PerDatapointGuide:
    return PerDatapointGuide(
        dataset.num_train, config.z_dim, beta=config.beta, reparameterized=config.reparameterized
    )


def _prior(config: TrainConfig, dataset: Dataset, model: Any) -> PriorGuide:
    return PriorGuide(config.z_dim, beta=config.beta)


MODELS: dict[str, Callable[[TrainConfig, Dataset], Any]] = {
    "vae": _vae, "hvae": _hvae, "vqvae": _vqvae, "vqvae2": _vqvae2, "linear": _linear,
}
GUIDES: dict[str, Callable[[TrainConfig, Dataset, Any], Any]] = {
    "amortized": _amortized,
    "per-datapoint": _per_datapoint,
    "prior": _prior,
}


def build_model(config: TrainConfig, dataset: Dataset) -> Any:
    """The model alone (e.g. to sample from a checkpoint without building a guide)."""
    config = config.resolved()
    return MODELS[config.model](config, dataset)


def check_combination(config: TrainConfig) -> None:
    """Refuse combinations of model, guide, objective and options that do not go together, with
    what to use instead (no data needed, so the command line can check before it writes anything)."""
    config = config.resolved()
    if config.x_scale_shape == "pixel" and config.model == "linear":
        raise ValueError("the linear model has one noise scale; drop --x-scale-shape pixel")
    if config.network == "conv" and config.model == "linear":
        raise ValueError("the linear model has no network to make convolutional; drop --network conv")
    if config.model in ("vqvae", "vqvae2"):
        if config.guide != "amortized" or config.objective != "elbo" or config.num_particles != 1:
            raise ValueError(
                "the VQ-VAE is trained with its deterministic encoder and Trace_ELBO, one particle (its guide's "
                "codebook and commitment losses are a guide factor, which only 'elbo' counts): use --guide "
                "amortized --objective elbo --num-particles 1"
            )
        if config.beta != 1.0:
            raise ValueError("the VQ-VAE's KL is a constant; --beta does not apply (use --commitment)")
    elif config.codebook_ema is not None:
        raise ValueError(f"--codebook-ema updates the codebook of a VQ-VAE; model={config.model!r} has none: drop it")
    if config.data_bias and (config.model not in ("vae", "hvae") or config.network != "mlp"):
        raise ValueError(
            f"--data-bias sets the output bias of an MLP decoder (model vae or hvae, --network mlp); "
            f"model={config.model!r} with --network {config.network} has none: drop --data-bias"
        )
    if config.model == "hvae" and config.guide != "amortized":
        raise ValueError(
            f"model='hvae' is trained with its amortized bottom-up guide; --guide {config.guide} has one "
            "latent layer. Use --guide amortized"
        )


def build(config: TrainConfig, dataset: Dataset) -> tuple[Any, Any]:
    """The model and guide that ``config`` names, with networks on ``config.device``.

    Network initialisation draws from torch's global RNG: seed it (``pyro.set_rng_seed``) first.
    """
    config = config.resolved()
    if config.likelihood != dataset.likelihood:
        raise ValueError(
            f"the {dataset.name} data set needs likelihood={dataset.likelihood!r}, "
            f"got {config.likelihood!r}"
        )
    check_combination(config)
    model = MODELS[config.model](config, dataset)
    guide = GUIDES[config.guide](config, dataset, model)
    if config.weight_init == "glorot":
        for module in modules_of(model, guide).values():
            glorot_init_(module)
    if config.data_bias:
        init_output_bias_(model.decoder, dataset.train.mean(0), config.likelihood)
    return model, guide


def modules_of(*fns: Any) -> dict[str, torch.nn.Module]:
    """The ``torch.nn.Module``s of pyrovae models/guides, by their ``pyro.module`` names."""
    found: dict[str, torch.nn.Module] = {}
    for fn in fns:
        for attr in ("decoder", "encoder"):
            module = getattr(fn, attr, None)
            if isinstance(module, torch.nn.Module):
                found[fn.name] = module
    return found
