"""``model="vqvae"`` and ``model="vqvae2"``: discrete codes (:mod:`pyrovae.models.vqvae`), one or two
levels, trained with their deterministic encoders and ``Trace_ELBO``, evaluated with their own bound
(a point-mass guide makes importance sampling repeat one draw)."""

from __future__ import annotations

from typing import Any

from pyrovae.app.config import ConfigError
from pyrovae.app.registry import ModelSpec

VQ_OPTIONS = ("num_codes", "commitment", "codebook_ema")


def build_vqvae(config: Any, dataset: Any) -> Any:
    from pyrovae.models.vqvae import VQVAE, VQDecoder, VQEncoder

    decoder = VQDecoder(dataset.image_shape, config.z_dim, activation=config.activation)
    grid = VQEncoder(dataset.image_shape, config.z_dim).grid
    model = VQVAE(
        decoder,
        config.num_codes,
        config.z_dim,
        grid,
        likelihood=config.likelihood,
        x_scale=config.x_scale,
        learn_x_scale=config.learn_x_scale,
        ema_decay=config.codebook_ema,
    )
    decoder.to(config.device)  # after the codebook is added to it
    return model


def build_vq_guide(config: Any, dataset: Any, model: Any) -> Any:
    from pyrovae.models.vqvae import VQEncoder, VQGuide

    encoder = VQEncoder(dataset.image_shape, config.z_dim, activation=config.activation)
    return VQGuide(encoder.to(config.device), model, commitment=config.commitment)


def build_vqvae2(config: Any, dataset: Any) -> Any:
    from pyrovae.models.vqvae import VQVAE2, VQ2Networks

    networks = VQ2Networks(
        dataset.image_shape,
        config.z_dim,
        config.num_codes_top or config.num_codes,
        config.num_codes,
        activation=config.activation,
        ema_decay=config.codebook_ema,
    )
    return VQVAE2(
        networks.to(config.device),
        likelihood=config.likelihood,
        x_scale=config.x_scale,
        learn_x_scale=config.learn_x_scale,
    )


def build_vq2_guide(config: Any, dataset: Any, model: Any) -> Any:
    from pyrovae.models.vqvae import VQ2Guide

    return VQ2Guide(model, commitment=config.commitment)


def check_vq(config: Any) -> None:
    if config.objective != "elbo" or config.num_particles != 1:
        raise ConfigError(
            f"model={config.model!r} is trained with its deterministic encoder and Trace_ELBO, one particle "
            "(its guide's codebook and commitment losses are a guide factor, which only 'elbo' counts): use "
            "objective='elbo', num_particles=1",
            "objective",
            "num_particles",
        )
    if config.beta != 1.0:
        raise ConfigError(
            f"the KL of model={config.model!r} is a constant, so beta={config.beta!r} does not apply: drop it "
            "(the encoder's pull towards its codes is `commitment`)",
            "beta",
        )


def _metrics(vq: dict[str, Any], num_test: int) -> dict[str, Any]:
    extra: dict[str, Any] = {k: vq[k] for k in ("perplexity_top", "codes_used_top", "num_codes_top") if k in vq}
    return {
        **extra,
        "test_elbo": vq["bound"],
        "test_log_likelihood": vq["bound"],
        "test_nll": -vq["bound"],
        "test_reconstruction_log_lik": vq["reconstruction_log_lik"],
        "test_squared_error": vq["squared_error"],
        "kl": vq["kl_uniform_prior"],
        "perplexity": vq["perplexity"],
        "codes_used": vq["codes_used"],
        "num_codes": vq["num_codes"],
        "active_units": vq["codes_used"],
        "num_test": num_test,
        "test_guide": "VQ encoder (nearest codes); log-likelihood = the bound log p(x|z_q) - H'W' log K",
    }


def evaluate_vqvae(model: Any, guide: Any, x_test: Any) -> dict[str, Any]:
    from pyrovae.models.vqvae import vq_metrics

    return _metrics(vq_metrics(model, guide, x_test), int(x_test.shape[0]))


def evaluate_vqvae2(model: Any, guide: Any, x_test: Any) -> dict[str, Any]:
    from pyrovae.models.vqvae import vq2_metrics

    return _metrics(vq2_metrics(model, guide, x_test), int(x_test.shape[0]))


SPECS = (
    ModelSpec(
        name="vqvae",
        build=build_vqvae,
        help="discrete codes on a grid (VQ-VAE): a codebook of num_codes vectors of size z_dim",
        options=VQ_OPTIONS,
        guides=("amortized",),
        needs_images=True,
        amortized_guide=build_vq_guide,
        check=check_vq,
        evaluate=evaluate_vqvae,
    ),
    ModelSpec(
        name="vqvae2",
        build=build_vqvae2,
        help="two levels of discrete codes (VQ-VAE-2; num_codes_top at the top)",
        options=(*VQ_OPTIONS, "num_codes_top"),
        guides=("amortized",),
        needs_images=True,
        amortized_guide=build_vq2_guide,
        check=check_vq,
        evaluate=evaluate_vqvae2,
    ),
)
