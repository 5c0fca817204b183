"""Cremer, Li & Duvenaud (2018), Table 2: log p̂(x), L[q*_Flow], L[q*_FFG] and L[q] of a trained
decoder, and its approximation and amortization gaps (``experiments/inference_gaps.py``).

q*_FFG is :func:`pyrovae.infer.local.optimize_local_guide` (a diagonal Gaussian per point, started
at the trained guide's base Gaussian, with its stopping rule); q*_Flow is a
:class:`~pyrovae.guides.flows.PerDatapointFlowGuide` (a Sylvester flow per point) whose base starts
at q*_FFG and whose flow starts near the identity, fitted by full-batch Adam with the decoder fixed.
Every ELBO and log p̂(x) is :func:`pyrovae.evaluate_dataset` of the fitted guide.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from studies.flows import fixed, train_guide

from pyrovae import evaluate_dataset
from pyrovae.app.run import restore
from pyrovae.guides.flows import FlowGuide, PerDatapointFlowGuide
from pyrovae.handlers import data_plate
from pyrovae.infer.local import gaussian_guide_params, optimize_local_guide
from pyrovae.train import evaluation_data

#: The rows of the table, top to bottom (Cremer et al.'s order).
ROWS = ("log_px", "elbo_qstar_flow", "elbo_qstar_ffg", "elbo_q")


@dataclass(frozen=True)
class Settings:
    """How the gaps of one decoder are measured (the script's flags)."""

    num_points: int = 1000
    elbo_draws: int = 1000
    is_samples: int = 5000
    local_steps: int = 3000
    local_particles: int = 2
    flow_steps: int = 1000
    flow_lr: float = 3e-3
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def base_gaussian_guide(guide: Any) -> Any:
    """A guide drawing z from ``guide``'s base Gaussian (the flow left out): the start of q*_FFG for
    a decoder trained with a flow guide; a diagonal-Gaussian guide is returned as it is."""
    if not isinstance(guide, FlowGuide):
        return guide

    def base(x: torch.Tensor, index: Optional[torch.Tensor] = None, num_data: Optional[int] = None) -> torch.Tensor:
        z_loc, z_scale, _ = guide.encoder(x)
        with data_plate(x, index, num_data):
            return pyro.sample("z", dist.Normal(z_loc, z_scale).to_event(1))

    return base


def _mean_se(values: torch.Tensor) -> tuple[float, float]:
    return float(values.mean()), float(values.std() / math.sqrt(values.numel()))


def fit_flow_qstar(model: Any, x: torch.Tensor, start: tuple[torch.Tensor, torch.Tensor], num_layers: int,
                   settings: Settings, prefix: str) -> tuple[PerDatapointFlowGuide, float]:
    """A per-datapoint Sylvester flow of ``num_layers`` layers on every point of ``x``, its base
    started at ``start`` (q*_FFG's means and scales), fitted with the decoder fixed; returns the
    guide and the seconds taken."""
    n, z_dim = start[0].shape
    guide = PerDatapointFlowGuide(n, z_dim, kind="sylvester", num_layers=num_layers, seed=settings.seed, prefix=prefix)
    pyro.param(f"{prefix}.z_loc", start[0].detach().clone(), event_dim=1)
    pyro.param(f"{prefix}.z_scale", start[1].detach().clone(), constraint=constraints.positive, event_dim=1)
    seconds = train_guide(model, guide, x, settings.flow_steps, settings.flow_lr, settings.local_particles, stl=False)
    return guide, seconds


def flow_qstar_in_chunks(model: Any, x: torch.Tensor, start: tuple[torch.Tensor, torch.Tensor], num_layers: int,
                         settings: Settings, prefix: str, chunk: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """q*_Flow fitted and evaluated ``chunk`` points at a time: per point, its ELBO, log p̂(x) and
    ESS (``is_samples`` draws); and the seconds of the fits and of the evaluations.

    Each point's fit is independent of the others' (its own parameter rows; Adam and ClippedAdam's
    clamp act elementwise; the loss is a sum over points), so chunks change only the random draws
    and the memory: one fit over all 1000 points of the MNIST decoder grew past 10 GB (glibc's heap
    fragmenting over the steps), a chunk's fit and its guide are dropped before the next starts."""
    store = pyro.get_param_store()
    out: dict[str, list[torch.Tensor]] = {"elbo": [], "log_likelihood": [], "ess": []}
    seconds = {"qstar_flow_fit": 0.0, "log_px": 0.0}
    for first in range(0, x.shape[0], chunk):
        rows = slice(first, first + chunk)
        name = f"{prefix}{first}"
        flow, fit_seconds = fit_flow_qstar(model, x[rows], (start[0][rows], start[1][rows]), num_layers, settings, name)
        seconds["qstar_flow_fit"] += fit_seconds
        with torch.no_grad():
            t = time.perf_counter()
            evaluation = evaluate_dataset(model, flow, x[rows], num_samples=settings.is_samples)
            seconds["log_px"] += time.perf_counter() - t
        out["elbo"].append(evaluation.elbo)
        out["log_likelihood"].append(evaluation.log_likelihood)
        out["ess"].append(evaluation.ess)
        for key in flow.local_param_names:
            del store[key]
        del flow, evaluation
        gc.collect()
    return {key: torch.cat(values) for key, values in out.items()}, seconds


def gaps_of_run(checkpoint: Any, name: str, settings: Settings, flow_layers: int,
                data_dir: Optional[str] = None, flow_chunk: int = 250) -> dict[str, Any]:
    """The column of Table 2 for the decoder in ``checkpoint``: the four rows (per-point means and
    standard errors over points) and the two gaps, with q* in the family the decoder was trained
    with (Flow for a flow guide, else FFG). q*_Flow has ``flow_layers`` layers (the flow guide's)
    and is fitted ``flow_chunk`` points at a time (:func:`flow_qstar_in_chunks`)."""
    pyro.clear_param_store()
    config, dataset, model, guide, _ = restore(checkpoint, data_dir=data_dir)
    x = evaluation_data(dataset, "test", config.seed)[: settings.num_points]
    torch.manual_seed(settings.seed)
    flow_trained = isinstance(guide, FlowGuide)
    seconds: dict[str, float] = {}
    with torch.no_grad():
        t = time.perf_counter()
        amortized = evaluate_dataset(model, guide, x, num_samples=settings.elbo_draws)
        seconds["q"] = time.perf_counter() - t
    t = time.perf_counter()
    ffg, history = optimize_local_guide(
        model, x, config.z_dim, steps=settings.local_steps, lr=0.02, lr_decay=0.999, num_particles=4,
        prefix=f"{name}_qstar_ffg", init=base_gaussian_guide(guide), tol=0.01, check_every=50, return_history=True)
    seconds["qstar_ffg_fit"] = time.perf_counter() - t
    start = gaussian_guide_params(ffg, x)
    with torch.no_grad():
        ffg_eval = evaluate_dataset(model, ffg, x, num_samples=settings.elbo_draws)
    flow_eval, flow_seconds = flow_qstar_in_chunks(fixed(model), x, start, flow_layers, settings,
                                                   f"{name}_qstar_flow", flow_chunk)
    seconds.update(flow_seconds)
    per_point = {"log_px": flow_eval["log_likelihood"], "elbo_qstar_flow": flow_eval["elbo"],
                 "elbo_qstar_ffg": ffg_eval.elbo, "elbo_q": amortized.elbo}
    table, se = {}, {}
    for row in ROWS:
        table[row], se[row] = _mean_se(per_point[row])
    family = "elbo_qstar_flow" if flow_trained else "elbo_qstar_ffg"
    gaps = {"approximation": per_point["log_px"] - per_point[family], "amortization": per_point[family] - per_point["elbo_q"],
            "inference": per_point["log_px"] - per_point["elbo_q"]}
    for key, values in gaps.items():
        table[f"{key}_gap"], se[f"{key}_gap"] = _mean_se(values)
    return {
        "trained_with": "flow (sylvester)" if flow_trained else "ffg", "qstar_family": family,
        "table": table, "se": se, "seconds": seconds, "num_points": int(x.shape[0]),
        "log_px_from_qstar_ffg": float(ffg_eval.log_likelihood.mean()),
        "log_px_ess_mean": float(flow_eval["ess"].mean()), "flow_chunk": int(flow_chunk),
        "qstar_ffg_mean_steps": float(history.stopped_at.float().mean()) if history.stopped_at is not None else None,
        "qstar_flow_below_ffg": int((per_point["elbo_qstar_flow"] < per_point["elbo_qstar_ffg"]).sum()),
    }


def plot_gaps(columns: dict[str, dict[str, Any]], path: Any) -> None:
    """Stacked bars: each decoder's inference gap split into approximation and amortization."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(columns)
    approx = [columns[n]["table"]["approximation_gap"] for n in names]
    amort = [columns[n]["table"]["amortization_gap"] for n in names]
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    ax.bar(names, approx, color="#4477aa", label="approximation  log p̂ − L[q*]")
    ax.bar(names, amort, bottom=approx, color="#ee6677", label="amortization  L[q*] − L[q]")
    for i, n in enumerate(names):
        ax.text(i, approx[i] + amort[i], f"{approx[i] + amort[i]:.2f}", ha="center", va="bottom")
    ax.set_ylabel("nats per test image")
    ax.set_xlabel("decoder trained with")
    ax.set_ylim(0, 1.35 * max(a + b for a, b in zip(approx, amort)))  # room for the legend above the bars
    ax.legend(fontsize=8, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
