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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer.enum import get_importance_trace
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
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
    but without consuming random numbers and without logging).

    :raises ValueError: a plate of the guide (or model) draws its own random subsample while the
        other is given its ``index`` (:func:`check_subsamples`).
    """
    guide_plates, model_plates = SubsampleRecorder(), SubsampleRecorder()
    with poutine.block(), torch.no_grad(), rng_preserved():
        guide_trace = poutine.trace(guide_plates(guide)).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model_plates(model), trace=guide_trace)).get_trace(*args, **kwargs)
    check_subsamples(model_plates, guide_plates)
    depth = 0
    for trace in (prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)):
        for site in trace.nodes.values():
            if site["type"] == "sample":
                depth = max(depth, sum(1 for f in site["cond_indep_stack"] if f.vectorized))
    return depth


class SubsampleRecorder(Messenger):
    """Record, for every plate a function enters, whether it was given its subsample
    (``pyro.plate(name, size, subsample=index)``) or draws one, and its sizes. Wrap the function
    directly (innermost), so a replay outside it has not yet replaced the value."""

    def __init__(self) -> None:
        super().__init__()
        self.plates: dict[str, tuple[bool, int, Optional[int]]] = {}

    def _pyro_sample(self, msg) -> None:
        fn = msg["fn"]
        if isinstance(fn, _Subsample):
            self.plates[msg["name"]] = (msg["value"] is not None, fn.size, fn.subsample_size)


def check_subsamples(model_plates: SubsampleRecorder, guide_plates: SubsampleRecorder) -> None:
    """Refuse a plate that draws its own random subsample in the guide but is given one in the
    model (or the other way round), e.g. Pyro's ``AutoNormal(model)`` without ``create_plates``
    on a model using ``pyro.plate("data", num_data, subsample=index)``: Pyro's replay hands the
    guide's random rows to the model's plate while x holds the rows ``index``, so each x_i would be
    paired with another point's latent, silently."""
    for role, other_role, own, other in (
        ("guide", "model", guide_plates.plates, model_plates.plates),
        ("model", "guide", model_plates.plates, guide_plates.plates),
    ):
        for name, (given, size, subsample_size) in own.items():
            if given or name not in other or not other[name][0]:
                continue
            if subsample_size is None or subsample_size >= size:
                continue
            raise ValueError(
                f"the {role}'s plate {name!r} draws its own random subsample of {subsample_size} of "
                f"{size} points, but the {other_role}'s plate {name!r} is given its subsample, so they "
                f"would pair different data points; the {role} must use pyro.plate({name!r}, "
                f"num_data, subsample=index) with the index and num_data it is given (for a Pyro "
                f"autoguide pass create_plates=lambda x, index=None, num_data=None: "
                f"pyro.plate({name!r}, num_data, subsample=index))"
            )


def _base_distribution(fn: Any) -> Any:
    # the leaf under Independent, MaskedDistribution, ExpandedDistribution, ...
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


def is_point_mass(fn: Any) -> bool:
    """Whether a distribution is a point mass (a ``Delta``, possibly wrapped)."""
    return isinstance(_base_distribution(fn), dist.Delta)


def has_auxiliary_sites(guide_trace: Any) -> bool:
    """Whether a guide samples auxiliary sites (``infer={"is_auxiliary": True}``, as Pyro's
    autoguides do); its latent sites are then deterministic functions of them (``Delta`` sites
    whose ``log_density`` carries the Jacobian), and log q is the sum over all its sites."""
    return any(site["type"] == "sample" and site["infer"].get("is_auxiliary") for site in guide_trace.nodes.values())


def check_proposal(model_trace: Any, guide_trace: Any) -> None:
    """Refuse a guide that cannot be an importance-sampling proposal: a point mass (a ``Delta``
    with no auxiliary site behind it, e.g. Pyro's ``AutoDelta``) on a continuous latent site has
    no density, so log p(x), the ELBO and the KL to the prior are undefined for it. (A point mass
    on a discrete latent is a proposal like any other.)"""
    if has_auxiliary_sites(guide_trace):
        return
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or not is_point_mass(site["fn"]):
            continue
        model_site = model_trace.nodes.get(name)
        support = getattr(model_site["fn"], "support", None) if model_site is not None else None
        if support is not None and support.is_discrete:
            continue
        raise ValueError(
            f"guide site {name!r} is a point mass (a Delta distribution, as Pyro's AutoDelta "
            "samples): it has no density, so importance sampling of log p(x), the ELBO and the KL "
            "to the prior are undefined for it; evaluate with a guide that has a density, e.g. "
            "pyro.infer.autoguide.AutoNormal(model, create_plates=...) initialised at the point "
            "(init_loc_fn) with a small init_scale"
        )


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

    return get_importance_trace("flat", max_plate_nesting + 1, vectorize(model), vectorize(guide), args, kwargs)


def data_frame(site: Mapping[str, Any], plate_name: str):
    """The ``CondIndepStackFrame`` of the data plate ``plate_name`` a site sits in.

    :raises ValueError: the site is outside that plate, with what to do about it.
    """
    for frame in site["cond_indep_stack"]:
        if frame.name == plate_name:
            return frame
    name = site["name"]
    if site["infer"].get("is_auxiliary"):
        raise ValueError(
            f"guide site {name!r} is an auxiliary site outside the plate {plate_name!r}: it draws "
            "the latents of all data points jointly (as Pyro's AutoContinuous guides do: "
            "AutoDiagonalNormal, AutoMultivariateNormal, AutoLowRankMultivariateNormal, ...), so "
            "the guide is no per-data-point proposal; use a guide whose sites sit in the data plate, "
            "e.g. pyro.infer.autoguide.AutoNormal(model, create_plates=lambda x, index=None, "
            f"num_data=None: pyro.plate({plate_name!r}, num_data, subsample=index))"
        )
    plates = [frame.name for frame in site["cond_indep_stack"] if frame.vectorized]
    hint = ""
    if plates:
        hint = (
            f"; it sits in the plate(s) {plates}: if {plates[-1]!r} is the plate over data points, "
            f"pass plate_name={plates[-1]!r}"
        )
    raise ValueError(
        f"site {name!r} is outside the plate {plate_name!r}: per-data-point objectives and "
        f"evaluation (iwae, score, log_likelihood, evaluate_dataset) need every sample site inside "
        f"pyro.plate({plate_name!r}, num_data, subsample=index){hint}"
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
    frame = data_frame(site, plate_name)
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
    frame = data_frame(site, plate_name)
    plate_scale = (frame.full_size or frame.size) / frame.size
    log_p = scale_and_mask(site["unscaled_log_prob"], mask=site["mask"])
    if use_scale:
        # The site's scale is N/B times any other scale (β); only the latter goes into log w.
        log_p = log_p * (site["scale"] / plate_scale)
    return reduce_to_datapoints(log_p, site, num_particles, max_plate_nesting, plate_name), plate_scale


def _plate_sizes(site: dict, plate_name: str) -> tuple[int, int]:
    """(subsample size B, full size N) of the data plate around a site."""
    frame = data_frame(site, plate_name)
    return frame.size, frame.full_size or frame.size


def _subsampling_error(plate_name: str, sites: list[tuple[str, str, tuple[int, int]]]) -> ValueError:
    """The sites ``(role, name, (B, N))`` disagree on the data plate's subsampling."""
    described = "; ".join(
        f"{role} site {name!r} is in pyro.plate({plate_name!r}) with {b} of {n} points"
        + (" (not subsampled)" if b == n else "")
        for role, name, (b, n) in sites
    )
    subsampled = {role for role, _, (b, n) in sites if b != n}
    ignoring = sorted({role for role, _, (b, n) in sites if b == n} - subsampled) if subsampled else []
    if len(ignoring) == 1:
        who, given = f"the {ignoring[0]}", "it is given"
        culprit = f"{who} ignores the index and num_data {given}"
    else:
        who, given = "the model and the guide", "they are given (the same for both)"
        culprit = f"{who} use different subsamples of the data plate"
    return ValueError(
        f"the sites disagree on the data plate's subsampling ({described}): {culprit}; "
        f"{who} must use pyro.plate({plate_name!r}, num_data, subsample=index) with the index and "
        f"num_data {given}"
    )


def _describe_scale(scale: Any, plate_scale: float) -> str:
    value = scale / plate_scale
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    return f"{value:g}" if isinstance(value, float) else str(value)


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
    sizes: list[tuple[str, str, tuple[int, int]]] = []
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site["infer"].get("_deterministic"):
            continue
        sizes.append(("model", name, _plate_sizes(site, plate_name)))
        if not site["is_observed"]:
            if name not in guide_trace.nodes:
                raise ValueError(
                    f"latent site {name!r} of the model is not sampled by the guide; "
                    "per-data-point objectives need the guide to sample every latent site"
                )
            guide_sizes = _plate_sizes(guide_trace.nodes[name], plate_name)
            if guide_sizes != sizes[-1][2]:
                # N/B differs, so the scales differ for that reason, not because of β
                raise _subsampling_error(plate_name, [sizes[-1], ("guide", name, guide_sizes)])
            if use_scale and not _same_scale(site["scale"], guide_trace.nodes[name]["scale"]):
                b, n = guide_sizes
                raise ValueError(
                    f"latent site {name!r} is scaled by {_describe_scale(site['scale'], n / b)} in "
                    f"the model but by {_describe_scale(guide_trace.nodes[name]['scale'], n / b)} in "
                    "the guide (a β of a β-VAE, besides the data plate's N/B"
                    f" = {n}/{b}); build the guide with the model's beta so log p(z) and log q(z|x) "
                    "are weighted alike"
                )
        term, plate_scale = _site_term(site, plate_name, num_particles, max_plate_nesting, use_scale)
        plate_scales.add(plate_scale)
        log_w = term if log_w is None else log_w + term
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        sizes.append(("guide", name, _plate_sizes(site, plate_name)))
        term, plate_scale = _site_term(site, plate_name, num_particles, max_plate_nesting, use_scale)
        plate_scales.add(plate_scale)
        log_w = -term if log_w is None else log_w - term
        if not site["fn"].has_rsample or site["infer"].get("pyrovae_score"):
            if use_scale:
                term = _site_term(site, plate_name, num_particles, max_plate_nesting, False)[0]
            score_log_q = term if score_log_q is None else score_log_q + term
    if log_w is None:
        raise ValueError("the model has no sample sites")
    if len({size for _, _, size in sizes}) != 1:
        distinct: dict[tuple[int, int], tuple[str, str, tuple[int, int]]] = {}
        for role, name, size in sizes:
            distinct.setdefault(size, (role, name, size))
        raise _subsampling_error(plate_name, list(distinct.values()))
    assert log_w.shape == (num_particles, log_w.shape[-1])
    return LogWeights(log_w=log_w, score_log_q=score_log_q, plate_scale=plate_scales.pop())
