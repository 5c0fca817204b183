"""Evaluation: importance-sampled log p(x), per-point ELBO, KL, gap, ESS and active units.

Everything here is per data point: a tensor over the ``data`` plate, neither summed nor scaled by
N/B, computed without gradients in bounded memory.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union, cast

import pyro
import torch
from pyro import poutine
from pyro.distributions import TorchDistribution
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import kl_divergence

from pyrovae import params
from pyrovae.handlers import DATA_PLATE
from pyrovae.infer.replay import ReplayedFunction, choose_backend
from pyrovae.infer.weights import (
    PARTICLE_PLATE,
    check_proposal,
    data_frame,
    guess_max_plate_nesting,
    has_auxiliary_sites,
    is_point_mass,
    per_datapoint_log_weights,
    reduce_to_datapoints,
    vectorized_traces,
)


@dataclass
class ImportanceEstimate:
    """Per-data-point results of importance sampling with K = ``num_samples`` draws from q.

    :ivar log_likelihood: log p̂(x) = log (1/K) Σ_k w_k, a stochastic lower bound on log p(x)
        in expectation, consistent as K → ∞.
    :ivar elbo: (1/K) Σ_k log w_k, the Monte Carlo ELBO from the same draws.
    :ivar ess: effective sample size (Σ w)² / Σ w² of the normalised weights, in [1, K].
    :ivar num_samples: K.
    :ivar elbo_se: the Monte Carlo standard error of ``elbo``, sd(log w) / √K (0 for K = 1).
    """

    log_likelihood: torch.Tensor
    elbo: torch.Tensor
    ess: torch.Tensor
    num_samples: int
    elbo_se: torch.Tensor

    @property
    def log_likelihood_se(self) -> torch.Tensor:
        """The delta-method standard error of ``log_likelihood`` (:func:`log_likelihood_se`)."""
        return log_likelihood_se(self.ess, self.num_samples)

    @property
    def gap(self) -> torch.Tensor:
        """log p̂(x) - ELBO: the estimate of KL(q(z|x) ‖ p(z|x))."""
        return self.log_likelihood - self.elbo


def log_likelihood_se(ess: torch.Tensor, num_samples: int) -> torch.Tensor:
    """The delta-method standard error of log p̂(x) = log mean_k w_k from K = ``num_samples``
    weights with effective sample size ``ess``: sd(w) / (√K mean w) = √(1/ESS − 1/K). It is itself
    estimated from the weights, so it is optimistic when q misses regions where p(z|x) has mass
    (then the ESS is overestimated too)."""
    return (1 / ess - 1 / num_samples).clamp_min(0).sqrt()


def _check_samples(num_samples: int, chunk_size: int) -> None:
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")


@torch.no_grad()
def importance_sampling(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 5000,
    chunk_size: int = 100,
    max_plate_nesting: Optional[int] = None,
    plate_name: str = DATA_PLATE,
    fast_path: Union[bool, str] = True,
    **kwargs: Any,
) -> ImportanceEstimate:
    """Importance sampling of log p(x) with the guide as proposal, per data point.

    The K samples are drawn ``chunk_size`` at a time (vectorized) and combined with running
    log-sum-exps, so memory does not grow with K. Site scales (β, N/B) are ignored: this is the
    model's own log p(x).

    :param model: a Pyro model with its latent sites inside the plate ``plate_name``.
    :param guide: the proposal, with the model's signature: any guide with a density, including
        Pyro's ``AutoNormal(model, create_plates=...)`` (its auxiliary sites count in log q);
        point masses (``AutoDelta``) and joint guides (``AutoDiagonalNormal``) are refused.
    :param args: the model's arguments, e.g. ``(x, index, num_data)``.
    :param plate_name: the plate over data points.
    :param num_samples: K.
    :param fast_path: run the chunks after the first through a traced graph
        (:class:`pyrovae.infer.replay.ReplayedFunction`, shared by calls with the same model, guide
        and shapes, e.g. the batches of :func:`evaluate_dataset`): ``True``/``"replay"`` (the same
        bits as Pyro), ``"inductor"`` (compiled: faster, equal to rounding) or ``False``/``"eager"``.
        The first chunk of every call runs through Pyro and checks the proposal.
    :param chunk_size: particles per vectorized pass. The default 100 keeps a pass over a batch
        of 100 MNIST images (100 × 100 × 784 float32 logits, 31 MB) under glibc's largest mmap
        threshold (see :mod:`pyrovae.runtime.perf`) and in cache-friendly sizes: 1.7× the throughput of
        500 per pass on this project's 2-core benchmark machine.

    The model's and guide's networks are bound to the param store first
    (:func:`pyrovae.params.inspect`): values loaded with ``pyro.get_param_store().load`` reach a
    user's own ``pyro.module`` networks, which would otherwise compute with their fresh weights.
    """
    _check_samples(num_samples, chunk_size)
    params.inspect(model, guide, args, kwargs)
    if max_plate_nesting is None:
        max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
    lse = lse_sq = total = total_sq = shift = None
    done = 0
    backend = choose_backend(fast_path)
    while done < num_samples:
        k = min(chunk_size, num_samples - done)
        if done == 0 or backend == "eager":
            model_trace, guide_trace = vectorized_traces(model, guide, args, kwargs, k, max_plate_nesting)
            if done == 0:
                check_proposal(model_trace, guide_trace)
            log_w = per_datapoint_log_weights(
                model_trace, guide_trace, k, max_plate_nesting, plate_name, use_scale=False
            ).log_w
        else:
            log_w = _chunk_log_weights(model, guide, k, max_plate_nesting, plate_name, backend)(*args, **kwargs)
        # Squares about the first chunk's mean, so the variance of log w does not cancel in float32.
        if shift is None:
            shift = log_w[0].detach()
        chunk = (torch.logsumexp(log_w, 0), torch.logsumexp(2 * log_w, 0), log_w.sum(0), (log_w - shift).pow(2).sum(0))
        if lse is None or lse_sq is None or total is None or total_sq is None:  # the first chunk (all or none set)
            lse, lse_sq, total, total_sq = chunk
        else:
            lse = torch.logaddexp(lse, chunk[0])
            lse_sq = torch.logaddexp(lse_sq, chunk[1])
            total = total + chunk[2]
            total_sq = total_sq + chunk[3]
        done += k
    assert lse is not None and lse_sq is not None and total is not None and total_sq is not None and shift is not None
    elbo = total / num_samples
    if num_samples > 1:
        variance = (total_sq / num_samples - (elbo - shift).pow(2)).clamp_min(0) * num_samples / (num_samples - 1)
        elbo_se = (variance / num_samples).sqrt()
    else:
        elbo_se = torch.zeros_like(elbo)
    return ImportanceEstimate(
        log_likelihood=lse - math.log(num_samples),
        elbo=elbo,
        ess=torch.exp(2 * lse - lse_sq),
        num_samples=num_samples,
        elbo_se=elbo_se,
    )


#: The replayed chunk functions of importance_sampling, newest last: (model, guide, K, nesting,
#: plate, backend) -> ReplayedFunction (the model and guide are held, so their ids stay theirs).
_CHUNKS: OrderedDict[tuple[Any, ...], tuple[Callable, Callable, ReplayedFunction]] = OrderedDict()
_MAX_CHUNKS = 8


def _chunk_log_weights(
    model: Callable, guide: Callable, k: int, max_plate_nesting: int, plate_name: str, backend: str
) -> Callable[..., torch.Tensor]:
    """The ``(k, B)`` unscaled log-weights of ``k`` vectorized draws, as a replayed function."""
    key = (id(model), id(guide), k, max_plate_nesting, plate_name, backend)
    entry = _CHUNKS.get(key)
    if entry is None:

        def chunk_log_weights(*args: Any, **kwargs: Any) -> torch.Tensor:
            model_trace, guide_trace = vectorized_traces(model, guide, args, kwargs, k, max_plate_nesting)
            return per_datapoint_log_weights(
                model_trace, guide_trace, k, max_plate_nesting, plate_name, use_scale=False
            ).log_w

        entry = _CHUNKS[key] = (model, guide, ReplayedFunction(chunk_log_weights, backend=backend))
        while len(_CHUNKS) > _MAX_CHUNKS:
            _CHUNKS.popitem(last=False)
    _CHUNKS.move_to_end(key)
    return entry[2]


def log_likelihood(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 5000,
    chunk_size: int = 100,
    **kwargs: Any,
) -> torch.Tensor:
    """Importance-sampling estimate log p̂(x) = log (1/K) Σ_k p(x, z_k) / q(z_k|x), z_k ~ q,
    per data point (a tensor over the ``data`` plate, not summed, not scaled).

    See :func:`importance_sampling` for the arguments.
    """
    return importance_sampling(
        model, guide, *args, num_samples=num_samples, chunk_size=chunk_size, **kwargs
    ).log_likelihood


@torch.no_grad()
def kl_to_prior(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 100,
    max_plate_nesting: Optional[int] = None,
    plate_name: str = DATA_PLATE,
    **kwargs: Any,
) -> torch.Tensor:
    """KL(q(z|x) ‖ p(z)) per data point, summed over latent sites: in closed form where
    ``torch.distributions.kl_divergence`` knows the pair, else by Monte Carlo with
    ``num_samples`` draws (for hierarchical priors the KL of each site is conditional on the
    sampled parents, averaged over the draws).

    A guide with auxiliary sites (Pyro's autoguides: ``z_unconstrained`` of ``AutoNormal``) is
    handled by Monte Carlo throughout, E_q[log q - log p(z)] with log q summed over all guide
    sites (a closed form for its ``Delta`` sites would drop their Jacobian ``log_density``)."""
    if max_plate_nesting is None:
        max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
    model_trace, guide_trace = vectorized_traces(model, guide, args, kwargs, num_samples, max_plate_nesting)
    check_proposal(model_trace, guide_trace)
    monte_carlo = has_auxiliary_sites(guide_trace)
    kl = None
    for name, guide_site in guide_trace.nodes.items():
        if guide_site["type"] != "sample" or guide_site["is_observed"]:
            continue
        log_q = scale_and_mask(guide_site["unscaled_log_prob"], mask=guide_site["mask"])
        model_site = model_trace.nodes.get(name)
        if model_site is None:
            if not guide_site["infer"].get("is_auxiliary"):
                raise ValueError(
                    f"guide site {name!r} is not a site of the model; mark a guide's own sites "
                    "infer={'is_auxiliary': True} (their log q then counts), or name it as in the model"
                )
            site_kl = log_q
        else:
            log_p = scale_and_mask(model_site["unscaled_log_prob"], mask=model_site["mask"])
            site_kl = None
            if not monte_carlo:
                try:
                    site_kl = kl_divergence(guide_site["fn"], model_site["fn"])
                except NotImplementedError:
                    pass
            if site_kl is None:
                site_kl = log_q - log_p
        term = reduce_to_datapoints(site_kl, guide_site, num_samples, max_plate_nesting, plate_name)
        kl = term if kl is None else kl + term
    if kl is None:
        raise ValueError("the guide has no latent sites")
    return kl.mean(0)


@torch.no_grad()
def posterior_means(
    guide: Callable,
    *args: Any,
    num_samples: int = 1000,
    plate_name: str = DATA_PLATE,
    **kwargs: Any,
) -> dict[str, torch.Tensor]:
    """E_q[z|x] of each latent site in the data plate, per data point: a tensor whose first
    dimension is the plate's (the batch), the site's other dimensions after it.

    The mean comes from the site's distribution where it has one in closed form (Gaussian
    guides). A site whose distribution has none (a normalizing flow) or that is a ``Delta`` at a
    transform of auxiliary draws (Pyro's ``AutoNormal``) gets the average of ``num_samples``
    vectorized draws of the guide (Monte Carlo). Auxiliary sites and sites outside the plate (no
    per-point mean) are left out.

    :param args: the guide's arguments, e.g. ``(x, index, num_data)``.
    :param num_samples: draws for the Monte Carlo means.
    :param plate_name: the plate over data points.
    """
    trace = prune_subsample_sites(poutine.trace(guide).get_trace(*args, **kwargs))
    auxiliary = has_auxiliary_sites(trace)
    means: dict[str, torch.Tensor] = {}
    by_sampling: list[str] = []
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or (site["infer"] or {}).get("is_auxiliary"):
            continue
        if not any(frame.name == plate_name for frame in site["cond_indep_stack"]):
            continue
        if auxiliary and is_point_mass(site["fn"]):
            by_sampling.append(name)
            continue
        try:
            mean = cast(TorchDistribution, site["fn"]).mean  # a sample site's fn is its distribution
        except NotImplementedError:  # e.g. a normalizing flow: the mean of its draws
            by_sampling.append(name)
            continue
        means[name] = _data_plate_first(mean.expand(cast(torch.Tensor, site["value"]).shape), site, plate_name)
    if by_sampling:
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        nesting = max(
            (
                -cast(int, frame.dim)  # a vectorized frame has its dim
                for site in trace.nodes.values()
                if site["type"] == "sample"
                for frame in site["cond_indep_stack"]
                if frame.vectorized
            ),
            default=0,
        )
        totals = {name: torch.zeros_like(cast(torch.Tensor, trace.nodes[name]["value"])) for name in by_sampling}
        done = 0
        while done < num_samples:
            k = min(500, num_samples - done)
            with pyro.plate(PARTICLE_PLATE, k, dim=-(nesting + 1)):
                draws = poutine.trace(guide).get_trace(*args, **kwargs)
            for name in by_sampling:
                # (k, ...) with 1s where the particle plate pads the site's batch shape
                totals[name] += cast(torch.Tensor, draws.nodes[name]["value"]).sum(0).reshape(totals[name].shape)
            done += k
        for name in by_sampling:
            site = trace.nodes[name]
            means[name] = _data_plate_first(totals[name] / num_samples, site, plate_name)
    return means


def _data_plate_first(value: torch.Tensor, site: Mapping[str, Any], plate_name: str) -> torch.Tensor:
    """Move the data plate's dimension of a site-shaped tensor to the front."""
    frame = data_frame(site, plate_name)
    return value.movedim(frame.dim - site["fn"].event_dim, 0)


def active_units(means: torch.Tensor, threshold: float = 0.01) -> torch.Tensor:
    """Which latent units are active: Var_x E_q[z_u | x] > ``threshold`` (Burda et al. 2016).

    :param means: ``(N, z_dim)`` posterior means over a data set.
    :return: boolean ``(z_dim,)``; ``.sum()`` counts the active units.
    """
    if means.dim() != 2 or means.shape[0] < 2:
        raise ValueError(f"means must be (num_points >= 2, z_dim), got {tuple(means.shape)}")
    return means.var(0) > threshold


@dataclass
class DatasetEvaluation:
    """Per-point evaluation of a data set (all tensors are ``(N,)`` on the CPU)."""

    log_likelihood: torch.Tensor
    elbo: torch.Tensor
    ess: torch.Tensor
    kl: torch.Tensor
    active_units: dict[str, int]
    num_samples: int
    elbo_se: torch.Tensor

    @property
    def gap(self) -> torch.Tensor:
        return self.log_likelihood - self.elbo

    def standard_errors(self) -> dict[str, float]:
        """The Monte Carlo standard errors of the data-set means of the ELBO and of log p̂(x) (the
        per-point errors combined as independent; see :attr:`ImportanceEstimate.log_likelihood_se`
        for the caveat of the latter)."""
        n = self.elbo.numel()
        return {
            "log_likelihood_se": float(log_likelihood_se(self.ess, self.num_samples).pow(2).sum().sqrt() / n),
            "elbo_se": float(self.elbo_se.pow(2).sum().sqrt() / n),
        }

    def summary(self) -> dict[str, float | int | dict[str, int]]:
        """Averages in nats per data point."""
        return {
            "log_likelihood": self.log_likelihood.mean().item(),
            "nll": -self.log_likelihood.mean().item(),
            "elbo": self.elbo.mean().item(),
            "gap": self.gap.mean().item(),
            "kl": self.kl.mean().item(),
            "ess": self.ess.mean().item(),
            "active_units": self.active_units,
            "num_samples": self.num_samples,
            "num_points": int(self.elbo.numel()),
            **self.standard_errors(),
        }


def evaluate_dataset(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *,
    num_samples: int = 5000,
    chunk_size: int = 100,
    batch_size: int = 100,
    kl_samples: int = 100,
    mean_samples: int = 1000,
    plate_name: str = DATA_PLATE,
    progress: bool = False,
    fast_path: Union[bool, str] = True,
) -> DatasetEvaluation:
    """Evaluate every point of ``x`` (the whole data set the guide was built for, indexed
    ``0..N-1``): importance-sampled log p(x), ELBO, ESS, KL(q ‖ p(z)), active units.

    The model and guide are called as ``fn(x[index], index, N)`` on batches of ``x``; their
    sample sites for data point i sit in ``pyro.plate(plate_name, N, subsample=index)``.

    :param batch_size: data points per pass; memory ~ ``chunk_size * batch_size * x_dim``.
    :param kl_samples: draws per point for a KL without closed form (:func:`kl_to_prior`).
    :param mean_samples: draws per point for posterior means without closed form
        (:func:`posterior_means`; Pyro's autoguides).
    :param plate_name: the plate over data points.
    :param fast_path: how the importance draws run (:func:`importance_sampling`).
    """
    _check_samples(num_samples, chunk_size)
    num_data = x.shape[0]
    index_all = torch.arange(num_data, device=x.device)
    args0 = (x[:1], index_all[:1], num_data)
    max_plate_nesting = guess_max_plate_nesting(model, guide, args0, {})
    parts: dict[str, list[torch.Tensor]] = {"ll": [], "elbo": [], "elbo_se": [], "ess": [], "kl": []}
    means: dict[str, list[torch.Tensor]] = {}
    starts = range(0, num_data, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"evaluate (K={num_samples})", leave=False)
    for start in starts:
        index = index_all[start : start + batch_size]
        args = (x[index], index, num_data)
        est = importance_sampling(
            model,
            guide,
            *args,
            num_samples=num_samples,
            chunk_size=chunk_size,
            max_plate_nesting=max_plate_nesting,
            plate_name=plate_name,
            fast_path=fast_path,
        )
        parts["ll"].append(est.log_likelihood.cpu())
        parts["elbo"].append(est.elbo.cpu())
        parts["elbo_se"].append(est.elbo_se.cpu())
        parts["ess"].append(est.ess.cpu())
        parts["kl"].append(
            kl_to_prior(
                model, guide, *args, num_samples=kl_samples, max_plate_nesting=max_plate_nesting, plate_name=plate_name
            ).cpu()
        )
        for name, mean in posterior_means(guide, *args, num_samples=mean_samples, plate_name=plate_name).items():
            means.setdefault(name, []).append(mean.reshape(len(index), -1).cpu())
    units = {name: int(active_units(torch.cat(values)).sum()) for name, values in means.items()} if num_data > 1 else {}
    return DatasetEvaluation(
        log_likelihood=torch.cat(parts["ll"]),
        elbo=torch.cat(parts["elbo"]),
        ess=torch.cat(parts["ess"]),
        kl=torch.cat(parts["kl"]),
        active_units=units,
        num_samples=num_samples,
        elbo_se=torch.cat(parts["elbo_se"]),
    )
