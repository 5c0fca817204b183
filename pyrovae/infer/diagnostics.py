"""Diagnostics of a guide as an importance-sampling proposal, and posterior draws as
``arviz.InferenceData``.

:func:`importance_diagnostics` draws K samples of z from a guide for every data point and returns,
per point, log p̂(x) = log (1/K) Σ_k w_k, the ELBO (mean of log w_k), the effective sample size
and the Pareto k̂ of the log-weights log w_k = log p(x, z_k) − log q(z_k|x) from ArviZ's Pareto
smoothed importance sampling (:func:`arviz.psislw`). k̂ estimates the tail index of the weight
distribution: below 0.5 the weights have finite variance, between 0.5 and 0.7 the estimate is
still usable, above 0.7 importance sampling with this proposal is unreliable at any practical K
(Vehtari et al. 2024).

:func:`posterior_draws`, :func:`importance_resample` and :func:`to_inference_data` collect draws
of z for a few data points under several guides into one ``InferenceData`` (netCDF), with
``point`` and ``latent`` coordinates, for ``az.summary`` and for comparing marginals.

**References**

- [1] A. Vehtari, D. Simpson, A. Gelman, Y. Yao, J. Gabry, "Pareto Smoothed Importance Sampling",
  JMLR 25(72), 2024.
- [2] Y. Yao, A. Vehtari, D. Simpson, A. Gelman, "Yes, but Did It Work?: Evaluating Variational
  Inference", ICML 2018.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from pyrovae.handlers import DATA_PLATE
from pyrovae.infer.weights import (
    guess_max_plate_nesting,
    per_datapoint_log_weights,
    vectorized_traces,
)

__all__ = [
    "KHAT_THRESHOLD",
    "ProposalDiagnostics",
    "importance_diagnostics",
    "importance_resample",
    "pareto_khat",
    "posterior_draws",
    "to_inference_data",
]

#: Above this Pareto k̂ importance sampling is considered unreliable (Vehtari et al. 2024).
KHAT_THRESHOLD = 0.7


def _arviz() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # arviz 0.x announces its 1.0 refactor
        import arviz

    return arviz


def pareto_khat(log_weights: torch.Tensor) -> torch.Tensor:
    """Pareto k̂ of each row's importance weights, by :func:`arviz.psislw` (relative efficiency 1:
    the draws are independent).

    :param log_weights: ``(num_points, K)`` log-weights, any additive constant per row.
    :return: ``(num_points,)`` k̂ (float64, on the CPU).
    """
    if log_weights.dim() != 2 or log_weights.shape[1] < 2:
        raise ValueError(f"log_weights must be (num_points, K >= 2), got {tuple(log_weights.shape)}")
    lw = log_weights.detach().double().cpu().numpy()
    with warnings.catch_warnings():
        # psislw warns when the tail is too short to fit, and returns k̂ = inf then.
        warnings.simplefilter("ignore", UserWarning)
        _, khat = _arviz().psislw(lw, reff=1.0)
    return torch.as_tensor(np.asarray(khat, dtype=np.float64))


@dataclass
class ProposalDiagnostics:
    """Per-data-point results of K draws from a proposal (tensors ``(N,)`` on the CPU).

    :ivar log_likelihood: log p̂(x) = log (1/K) Σ_k w_k.
    :ivar elbo: (1/K) Σ_k log w_k, the Monte Carlo ELBO of the proposal.
    :ivar ess: (Σ w)² / Σ w², in [1, K].
    :ivar khat: Pareto k̂ of the K weights (arviz).
    :ivar num_samples: K.
    :ivar seconds: wall-clock time of the whole evaluation.
    """

    log_likelihood: torch.Tensor
    elbo: torch.Tensor
    ess: torch.Tensor
    khat: torch.Tensor
    num_samples: int
    seconds: float

    def summary(self, threshold: float = KHAT_THRESHOLD) -> dict[str, Optional[float]]:
        """Means over points (nats per point) with standard errors over points, and the k̂ shares."""
        n = self.elbo.numel()

        def se(t: torch.Tensor) -> Optional[float]:
            return float(t.double().std() / math.sqrt(n)) if n > 1 else None

        return {
            "num_points": n,
            "num_samples": self.num_samples,
            "log_likelihood": float(self.log_likelihood.double().mean()),
            "log_likelihood_se": se(self.log_likelihood),
            "elbo": float(self.elbo.double().mean()),
            "elbo_se": se(self.elbo),
            "ess_mean": float(self.ess.double().mean()),
            "ess_median": float(self.ess.double().median()),
            "khat_median": float(self.khat.median()),
            "khat_mean": float(finite.mean()) if (finite := self.khat[torch.isfinite(self.khat)]).numel() else None,
            "fraction_khat_above_0.5": float((self.khat > 0.5).double().mean()),
            f"fraction_khat_above_{threshold:g}": float((self.khat > threshold).double().mean()),
            "fraction_khat_above_1": float((self.khat > 1.0).double().mean()),
            "seconds": self.seconds,
        }


@torch.no_grad()
def importance_diagnostics(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *,
    num_samples: int = 1000,
    chunk_size: int = 100,
    batch_size: int = 100,
    khat_samples: Optional[int] = None,
    progress: bool = False,
) -> ProposalDiagnostics:
    """Draw ``num_samples`` z per point of ``x`` (indexed ``0..N-1``) from ``guide`` and return
    log p̂(x), ELBO, ESS and PSIS k̂ per point.

    The log-weights of a batch, ``(K, B)``, are kept whole for k̂ (memory ~ ``K * batch_size``
    floats, plus ``chunk_size * batch_size * x_dim`` for the decoder pass). Site scales (β, N/B) are
    ignored: the weights are those of the model's own log p(x, z).

    :param khat_samples: compute k̂ from the first this many of the K draws (default all), so
        guides evaluated with different K can be compared at the same sample size.
    """
    for name, value in (("num_samples", num_samples), ("chunk_size", chunk_size), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    khat_samples = num_samples if khat_samples is None else khat_samples
    if not 5 <= khat_samples <= num_samples:
        raise ValueError(f"khat_samples must be in [5, num_samples={num_samples}], got {khat_samples}")
    start = time.perf_counter()
    num_data = x.shape[0]
    index_all = torch.arange(num_data, device=x.device)
    max_plate_nesting = guess_max_plate_nesting(model, guide, (x[:1], index_all[:1], num_data), {})
    parts: dict[str, list[torch.Tensor]] = {"ll": [], "elbo": [], "ess": [], "khat": []}
    starts = range(0, num_data, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"importance diagnostics (K={num_samples})", leave=False)
    for begin in starts:
        index = index_all[begin : begin + batch_size]
        args = (x[index], index, num_data)
        chunks = []
        done = 0
        while done < num_samples:
            k = min(chunk_size, num_samples - done)
            model_trace, guide_trace = vectorized_traces(model, guide, args, {}, k, max_plate_nesting)
            log_w = per_datapoint_log_weights(
                model_trace, guide_trace, k, max_plate_nesting, DATA_PLATE, use_scale=False
            ).log_w
            chunks.append(log_w.double())
            done += k
        log_w = torch.cat(chunks)
        assert log_w.shape == (num_samples, len(index))
        lse = torch.logsumexp(log_w, 0)
        parts["ll"].append((lse - math.log(num_samples)).cpu())
        parts["elbo"].append(log_w.mean(0).cpu())
        parts["ess"].append(torch.exp(2 * lse - torch.logsumexp(2 * log_w, 0)).cpu())
        parts["khat"].append(pareto_khat(log_w[:khat_samples].T))
    return ProposalDiagnostics(
        log_likelihood=torch.cat(parts["ll"]),
        elbo=torch.cat(parts["elbo"]),
        ess=torch.cat(parts["ess"]),
        khat=torch.cat(parts["khat"]),
        num_samples=num_samples,
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def posterior_draws(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    index: torch.Tensor,
    num_data: int,
    num_draws: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_draws`` draws of z from ``guide`` for the points ``index`` of a data set of
    ``num_data`` points (``x`` holds those points' rows), with their log-weights
    log p(x, z) − log q(z|x) under ``model``.

    :return: z ``(num_draws, len(index), z_dim)`` and log w ``(num_draws, len(index))``.
    """
    args = (x, index, num_data)
    max_plate_nesting = guess_max_plate_nesting(model, guide, args, {})
    model_trace, guide_trace = vectorized_traces(model, guide, args, {}, num_draws, max_plate_nesting)
    log_w = per_datapoint_log_weights(
        model_trace, guide_trace, num_draws, max_plate_nesting, DATA_PLATE, use_scale=False
    ).log_w
    z = guide_trace.nodes["z"]["value"]
    assert z.shape[:2] == (num_draws, len(index)) and log_w.shape == (num_draws, len(index))
    return z, log_w


@torch.no_grad()
def importance_resample(
    model: Callable,
    proposal: Callable,
    x: torch.Tensor,
    index: torch.Tensor,
    num_data: int,
    num_samples: int,
    num_draws: int,
    chunk_size: int = 1000,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling importance resampling: K = ``num_samples`` draws from ``proposal`` per point,
    weighted by w = p(x, z) / q(z|x), then ``num_draws`` resampled in proportion to w (with
    replacement). As K grows the resampled draws follow p(z|x); with few effective samples they
    repeat a handful of proposal draws.

    :return: the resampled draws ``(num_draws, len(index), z_dim)`` and the normalised weights'
        effective sample size ``(len(index),)``.
    """
    args = (x, index, num_data)
    max_plate_nesting = guess_max_plate_nesting(model, proposal, args, {})
    zs, log_ws = [], []
    done = 0
    while done < num_samples:
        k = min(chunk_size, num_samples - done)
        model_trace, guide_trace = vectorized_traces(model, proposal, args, {}, k, max_plate_nesting)
        log_ws.append(
            per_datapoint_log_weights(model_trace, guide_trace, k, max_plate_nesting, DATA_PLATE, use_scale=False).log_w
        )
        zs.append(guide_trace.nodes["z"]["value"])
        done += k
    z = torch.cat(zs)  # (K, B, d)
    log_w = torch.cat(log_ws).double()  # (K, B)
    probs = torch.softmax(log_w, 0).T  # (B, K)
    picks = torch.multinomial(probs, num_draws, replacement=True, generator=generator)  # (B, S)
    draws = torch.stack([z[picks[b], b] for b in range(len(index))], dim=1)
    ess = 1.0 / (probs**2).sum(1)
    return draws, ess.float()


def to_inference_data(
    draws: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    point_ids: Sequence[int],
    *,
    num_chains: int = 4,
    log_weights: Optional[Mapping[str, torch.Tensor]] = None,
    point_stats: Optional[Mapping[str, torch.Tensor]] = None,
    attrs: Optional[Mapping[str, Any]] = None,
) -> Any:
    """Draws of z under several guides for the same points, as one ``arviz.InferenceData``.

    Group ``posterior``: one variable ``z_<guide>`` per guide, dims
    ``(chain, draw, point, latent)``; the draws are independent, so "chains" are an arbitrary split
    of them into ``num_chains`` equal parts (ArviZ's R̂ and ESS need more than one; for i.i.d.
    draws R̂ ≈ 1 and the ESS is the number of distinct draws' worth). Group ``sample_stats``:
    ``log_weight_<guide>`` = log p(x, z) − log q(z|x) of each draw, if given. Group
    ``observed_data``: ``x``, dims ``(point, feature)``. Group ``constant_data``: per-point
    statistics (e.g. k̂, log p̂(x)), dims ``(point,)``.

    :param draws: guide name -> ``(S, P, z_dim)`` draws, S divisible by ``num_chains``.
    :param x: ``(P, x_dim)`` the points' data.
    :param point_ids: the points' positions in the data set (the ``point`` coordinate).
    """
    az = _arviz()
    if not draws:
        raise ValueError("pass the draws of at least one guide")
    num_points = len(point_ids)
    posterior = {}
    for name, z in draws.items():
        s, p, d = z.shape
        if p != num_points or s % num_chains:
            raise ValueError(
                f"draws of {name!r} have shape {tuple(z.shape)}: need {num_points} points and a number of "
                f"draws divisible by num_chains={num_chains}"
            )
        posterior[f"z_{name}"] = z.detach().float().cpu().numpy().reshape(num_chains, s // num_chains, p, d)
    z_dim = next(iter(draws.values())).shape[-1]
    coords = {"point": np.asarray(point_ids), "latent": np.arange(z_dim), "feature": np.arange(x.shape[-1])}
    dims = {name: ["point", "latent"] for name in posterior}
    groups: dict[str, Any] = {
        "posterior": posterior,
        "observed_data": {"x": x.detach().float().cpu().numpy()},
    }
    if log_weights:
        groups["sample_stats"] = {
            f"log_weight_{name}": w.detach().float().cpu().numpy().reshape(num_chains, -1, num_points)
            for name, w in log_weights.items()
        }
        dims.update({f"log_weight_{name}": ["point"] for name in log_weights})
    if point_stats:
        groups["constant_data"] = {name: v.detach().double().cpu().numpy() for name, v in point_stats.items()}
        dims.update({name: ["point"] for name in point_stats})
    dims["x"] = ["point", "feature"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return az.from_dict(**groups, coords=coords, dims=dims, attrs=dict(attrs or {}))
