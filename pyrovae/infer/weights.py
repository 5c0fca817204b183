"""Per-data-point importance log-weights from a pair of vectorized model/guide traces.

This is the machinery shared by :class:`~pyrovae.infer.objectives.iwae.IWAE`,
:class:`~pyrovae.infer.objectives.score.ScoreFunctionELBO` and :mod:`pyrovae.infer.evaluate`: for K particles
and a batch of B data points it returns

    log w[k, b] = Σ_model sites log p(site) - Σ_guide sites log q(site),

summed over everything belonging to data point b (event dims and any plates nested in ``data``),
*without* the plate's N/B subsampling scale, which the caller applies outside any logsumexp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer.enum import get_importance_trace
from pyro.poutine.util import prune_subsample_sites

from pyrovae.handlers import DATA_PLATE

PARTICLE_PLATE = "num_particles_vectorized"


@dataclass
class LogWeights:
    """Per-data-point terms of K importance samples for a batch of B points.

    :ivar log_w: ``(K, B)`` log p(x, z_k) - log q(z_k | x) per particle and data point
        (with β-scaled latent sites scaled by β when ``use_scale``).
    :ivar score_log_q: ``(K, B)`` log q of the non-reparameterized guide sites (unscaled), the
        term the log-derivative trick multiplies by a learning signal; ``None`` if every guide site
        is reparameterized.
    :ivar plate_scale: N/B, the data plate's subsampling scale (1 without subsampling).
    """

    log_w: torch.Tensor
    score_log_q: Optional[torch.Tensor]
    plate_scale: float


def rng_preserved() -> Any:
    """A context that restores torch's random state on exit (CPU and the current CUDA device),
    so dry runs do not shift the random stream and a resumed run replays an uninterrupted one."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=devices)


def guess_max_plate_nesting(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> int:
    """The number of plates the model and guide nest (a dry run of both, as Pyro's ELBO does,
    but without consuming random numbers)."""
    with poutine.block(), torch.no_grad(), rng_preserved():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    depth = 0
    for trace in (prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)):
        for site in trace.nodes.values():
            if site["type"] == "sample":
                depth = max(depth, sum(1 for f in site["cond_indep_stack"] if f.vectorized))
    return depth


def vectorized_traces(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_particles: int,
    max_plate_nesting: int,
) -> tuple[Any, Any]:
    """Run the guide and the replayed model with ``num_particles`` vectorized particles in a plate
    at dim ``-(max_plate_nesting + 1)``; log-densities are computed on the returned traces."""

    def vectorize(fn: Callable) -> Callable:
        def wrapped(*a: Any, **k: Any) -> Any:
            with pyro.plate(PARTICLE_PLATE, num_particles, dim=-(max_plate_nesting + 1)):
                return fn(*a, **k)

        return wrapped

    return get_importance_trace(
        "flat", max_plate_nesting + 1, vectorize(model), vectorize(guide), args, kwargs
    )


def _data_frame(site: dict, plate_name: str):  # type: ignore[no-untyped-def]
    for frame in site["cond_indep_stack"]:
        if frame.name == plate_name:
            return frame
    raise ValueError(
        f"site {site['name']!r} is outside the plate {plate_name!r}: per-data-point objectives "
        f"(iwae, score, log_likelihood) need every sample site inside "
        f"pyro.plate({plate_name!r}, num_data, subsample=index)"
    )


def reduce_to_datapoints(
    tensor: torch.Tensor,
    site: dict,
    num_particles: int,
    max_plate_nesting: int,
    plate_name: str = DATA_PLATE,
) -> torch.Tensor:
    """Sum a site's batch-shaped ``tensor`` (e.g. its log-density or a KL) over everything but
    particles and data points: the result has shape ``(K, B)``."""
    frame = _data_frame(site, plate_name)
    ndim = max_plate_nesting + 1
    if tensor.dim() > ndim:
        raise ValueError(
            f"site {site['name']!r} has batch shape {tuple(tensor.shape)}, more batch dims than "
            f"max_plate_nesting={max_plate_nesting} plates allow; raise max_plate_nesting"
        )
    tensor = tensor.reshape((1,) * (ndim - tensor.dim()) + tensor.shape).movedim(frame.dim, -1)
    if ndim > 2:
        tensor = tensor.sum(dim=tuple(range(1, ndim - 1)))
    return tensor.expand(num_particles, frame.size)


def _site_term(
    site: dict,
    plate_name: str,
    num_particles: int,
    max_plate_nesting: int,
    use_scale: bool,
) -> tuple[torch.Tensor, float]:
    """Log-density of one site reduced to ``(K, B)``, and the data plate's N/B."""
    frame = _data_frame(site, plate_name)
    plate_scale = (frame.full_size or frame.size) / frame.size
    log_p = scale_and_mask(site["unscaled_log_prob"], mask=site["mask"])
    if use_scale:
        # The site's scale is N/B times any other scale (β); only the latter goes into log w.
        log_p = log_p * (site["scale"] / plate_scale)
    return reduce_to_datapoints(log_p, site, num_particles, max_plate_nesting, plate_name), plate_scale


def _same_scale(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return bool(torch.all(torch.as_tensor(a) == torch.as_tensor(b)))
    return math.isclose(float(a), float(b), rel_tol=1e-12)


def per_datapoint_log_weights(
    model_trace: Any,
    guide_trace: Any,
    num_particles: int,
    max_plate_nesting: int,
    plate_name: str = DATA_PLATE,
    use_scale: bool = True,
) -> LogWeights:
    """Reduce a pair of vectorized traces to per-data-point log-weights.

    :param use_scale: apply each site's scale other than the data plate's N/B (e.g. β of a
        β-VAE). ``False`` gives the weights of the model's true log p(x, z), for evaluation.
    :raises ValueError: a site outside the data plate, a latent site the guide does not sample,
        or a latent site scaled differently in the model and the guide.
    """
    log_w: Optional[torch.Tensor] = None
    score_log_q: Optional[torch.Tensor] = None
    plate_scales = set()
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site["infer"].get("_deterministic"):
            continue
        if not site["is_observed"]:
            if name not in guide_trace.nodes:
                raise ValueError(
                    f"latent site {name!r} of the model is not sampled by the guide; "
                    "per-data-point objectives need the guide to sample every latent site"
                )
            if use_scale and not _same_scale(site["scale"], guide_trace.nodes[name]["scale"]):
                raise ValueError(
                    f"latent site {name!r} is scaled by {site['scale']} in the model but by "
                    f"{guide_trace.nodes[name]['scale']} in the guide; build the guide with the "
                    "model's beta so log p(z) and log q(z|x) are weighted alike"
                )
        term, plate_scale = _site_term(site, plate_name, num_particles, max_plate_nesting, use_scale)
        plate_scales.add(plate_scale)
        log_w = term if log_w is None else log_w + term
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        term, plate_scale = _site_term(site, plate_name, num_particles, max_plate_nesting, use_scale)
        plate_scales.add(plate_scale)
        log_w = -term if log_w is None else log_w - term
        if not site["fn"].has_rsample or site["infer"].get("pyrovae_score"):
            if use_scale:
                term = _site_term(site, plate_name, num_particles, max_plate_nesting, False)[0]
            score_log_q = term if score_log_q is None else score_log_q + term
    if log_w is None:
        raise ValueError("the model has no sample sites")
    if len(plate_scales) != 1:
        raise ValueError(f"sites disagree on the data plate's subsampling scale: {sorted(plate_scales)}")
    assert log_w.shape == (num_particles, log_w.shape[-1])
    return LogWeights(log_w=log_w, score_log_q=score_log_q, plate_scale=plate_scales.pop())
