r"""Amortized, semi-amortized and per-datapoint inference in VAEs on MNIST: the amortization gap.

For a trained decoder p_θ(x|z) and a test point x, three diagonal-Gaussian q's:

- q: the amortized encoder q_φ(z|x), one network pass;
- q_SA: the encoder's output refined by T Adam steps on x's own ELBO
  (:class:`~pyrovae.guides.SemiAmortizedGuide`);
- q*: one Gaussian per point optimised until its ELBO stops rising
  (:func:`pyrovae.infer.local.optimize_local_guide`: all test points at once, a stopping rule per point),
  the best member of the family we can find.

Cremer, Li and Duvenaud (2018) split the inference gap of the encoder in two:

.. math:: \log p(x) - \mathcal L[q] = \underbrace{\log p(x) - \mathcal L[q^*]}_{\text{approximation gap}}
   + \underbrace{\mathcal L[q^*] - \mathcal L[q]}_{\text{amortization gap}}.

log p(x) is estimated by importance sampling with K draws from q* (log p̂(x), a stochastic lower
bound); L[q*] is itself a lower bound on the best ELBO in the family, so the measured amortization
gap is a lower estimate and the approximation gap an upper one.

Three decoders: (A) trained with the amortized encoder (``pyrovae train``), (B) trained jointly
with a per-datapoint guide (:func:`train_per_datapoint`: one q_i per training point, no encoder),
(C) trained with the semi-amortized guide (:func:`train_semi_amortized`). A per-datapoint guide has
nothing for unseen points, so on the test set (B) starts from the prior.

**References**

[1] C. Cremer, X. Li, D. Duvenaud, "Inference Suboptimality in Variational Autoencoders",
    ICML 2018.
[2] Y. Kim, S. Wiseman, A. C. Miller, D. Sontag, A. M. Rush, "Semi-Amortized Variational
    Autoencoders", ICML 2018.
[3] R. G. Krishnan, D. Liang, M. D. Hoffman, "On the challenges of learning with inference
    networks on sparse, high-dimensional data", AISTATS 2018.
[4] M. D. Hoffman, D. M. Blei, C. Wang, J. Paisley, "Stochastic Variational Inference", JMLR 2013.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pyro
import torch

from pyrovae.data import Dataset
from pyrovae.guides import AmortizedGuide, PerDatapointGuide
from pyrovae.guides.semi_amortized import SemiAmortizedGuide, refine_gaussian
from pyrovae.infer.objectives import make_objective

__all__ = [
    "InferenceSettings",
    "convergence_curves",
    "encoder_route",
    "fixed_gaussian_guide",
    "gap_summary",
    "inference_data",
    "load_trained",
    "optimised_route",
    "plot_convergence",
    "plot_gaps",
    "plot_khat",
    "plot_marginals",
    "save_trained",
    "select_points",
    "semi_amortized_route",
    "study_model",
    "train_per_datapoint",
    "train_subset_study",
    "train_semi_amortized",
]


@dataclass
class InferenceSettings:
    """How each route to q is run on the test set.

    :param sa_steps: T, refinement steps of the semi-amortized guide.
    :param sa_lr: its Adam step size.
    :param sa_particles: draws per refinement step.
    :param opt_lr: Adam step size of the per-point optimisation (q*) from the encoder.
    :param opt_lr_decay: its per-step learning-rate decay.
    :param prior_lr: step size when starting from the prior (it has further to go).
    :param prior_lr_decay: its per-step decay.
    :param opt_particles: draws per step of the per-point optimisation.
    :param opt_max_steps: most steps of the per-point optimisation.
    :param opt_tol: stopping rule: a point stops when its ELBO gains less than this many nats
        per ``opt_check_every`` steps, ``opt_patience`` checks in a row.
    :param opt_check_every: steps between checks.
    :param opt_patience: checks in a row.
    """

    sa_steps: int = 10
    sa_lr: float = 3e-2
    sa_particles: int = 1
    opt_lr: float = 2e-2
    opt_lr_decay: float = 0.995
    prior_lr: float = 0.1
    prior_lr_decay: float = 0.996
    opt_particles: int = 4
    opt_max_steps: int = 2000
    opt_tol: float = 0.01
    opt_check_every: int = 50
    opt_patience: int = 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def fixed_gaussian_guide(z_loc: torch.Tensor, z_scale: torch.Tensor, prefix: str) -> PerDatapointGuide:
    """A per-datapoint guide holding the given ``(N, z_dim)`` means and scales (set in Pyro's param
    store under ``prefix``), e.g. to evaluate a refined q as a fixed proposal."""
    num_data, z_dim = z_loc.shape
    guide = PerDatapointGuide(num_data, z_dim, prefix=prefix)
    store = pyro.get_param_store()
    for name in guide.local_param_names:
        if name in store:
            del store[name]
    pyro.param(f"{prefix}.z_loc", z_loc.detach().clone(), event_dim=1)
    pyro.param(
        f"{prefix}.z_scale", z_scale.detach().clone(), constraint=torch.distributions.constraints.positive,
        event_dim=1,
    )
    return guide


def train_per_datapoint(
    model: Callable,
    guide: PerDatapointGuide,
    dataset: Dataset,
    *,
    epochs: int = 20,
    batch_size: int = 100,
    lr: float = 1e-3,
    local_lr: float = 3e-2,
    local_steps: int = 10,
    seed: int = 0,
    log: Optional[Callable[[str], None]] = None,
) -> dict[str, Any]:
    """Train a decoder jointly with one q_i per training point (a non-amortized VAE) by
    :func:`pyrovae.fit` with ``local_steps``: stochastic variational inference with local and
    global steps (Hoffman et al. 2013).

    For each minibatch the batch's rows of the per-datapoint guide take ``local_steps`` Adam steps
    (rate ``local_lr``, fresh moments at each visit) on their own ELBO with the decoder fixed and
    are written back (:meth:`~pyrovae.guides.PerDatapointGuide.refine_rows`); then the decoder
    takes one Adam step (rate ``lr``) on the batch's ELBO with those rows fixed. Rows of other
    points never change. Why not one step per batch: see :class:`~pyrovae.guides.PerDatapointGuide`.

    :return: ``{"train_elbo": [...], "seconds": [...]}`` per epoch; the ELBO is that of the
        decoder step, i.e. after the local steps, in nats per point.
    """
    if local_steps < 1:
        raise ValueError(f"local_steps must be >= 1, got {local_steps}; with 0 use pyrovae.fit")
    return _fit_elbo("per-datapoint", model, guide, dataset, log, epochs=epochs, batch_size=batch_size, lr=lr,
                     seed=seed, local_steps=local_steps, local_lr=local_lr)


def train_semi_amortized(
    model: Callable,
    guide: SemiAmortizedGuide,
    dataset: Dataset,
    *,
    epochs: int = 20,
    batch_size: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
    log: Optional[Callable[[str], None]] = None,
) -> dict[str, Any]:
    """Train a decoder and encoder with the semi-amortized guide, by :func:`pyrovae.fit` (the
    guide is an ordinary Pyro guide; every SVI step refines the batch's q first).

    :return: ``{"train_elbo": [...], "seconds": [...]}`` per epoch (the ELBO of the refined q).
    """
    pyro.set_rng_seed(seed)
    return _fit_elbo("semi-amortized", model, guide, dataset, log, epochs=epochs, batch_size=batch_size, lr=lr,
                     seed=seed)


def _fit_elbo(label: str, model: Callable, guide: Callable, dataset: Dataset,
              log: Optional[Callable[[str], None]], *, epochs: int, **fit_args: Any) -> dict[str, Any]:
    # fit() with Trace_ELBO, no test bound and no progress bars; one log line per epoch.
    from pyrovae.train import fit

    history = fit(model, guide, dataset, make_objective("elbo"), epochs=epochs, test_bound=False, progress=False,
                  **fit_args)
    if log is not None:
        for epoch, (bound, seconds) in enumerate(zip(history.train_bound, history.seconds)):
            log(f"{label} epoch {epoch + 1}/{epochs}: train ELBO {bound:.2f} ({seconds:.0f} s)")
    return {"train_elbo": list(history.train_bound), "seconds": list(history.seconds)}


# ---------------------------------------------------------------------------------------------
# Saving and loading the decoders trained here


def save_trained(path: Any, model: Any, guide: Any, history: dict[str, Any], config: dict[str, Any]) -> None:
    """Write a trained (model, guide) pair: network weights, per-datapoint rows, history, config."""
    from pyrovae.app.build import modules_of
    from pyrovae.runtime.checkpoint import save_checkpoint

    state = {
        "modules": {name: m.state_dict() for name, m in modules_of(model, guide).items()},
        "params": {name: pyro.param(name).detach() for name in getattr(guide, "local_param_names", ())},
        "history": history,
        "config": config,
    }
    save_checkpoint(path, state)


def load_trained(path: Any, model: Any, guide: Any) -> dict[str, Any]:
    """Load what :func:`save_trained` wrote into ``model`` and ``guide`` (built alike); per-datapoint
    rows go to the param store. :return: the saved state (``history``, ``config``)."""
    from pyrovae.app.build import modules_of
    from pyrovae.runtime.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    modules = modules_of(model, guide)
    if set(modules) != set(state["modules"]):
        raise ValueError(f"{path} holds networks {sorted(state['modules'])}, this pair has {sorted(modules)}")
    for name, module in modules.items():
        module.load_state_dict(state["modules"][name])
    for name, value in state["params"].items():
        store = pyro.get_param_store()
        if name in store:
            del store[name]
        constraint = torch.distributions.constraints.positive if name.endswith("z_scale") else None
        if constraint is None:
            pyro.param(name, value.clone(), event_dim=1)
        else:
            pyro.param(name, value.clone(), constraint=constraint, event_dim=1)
    return state


# ---------------------------------------------------------------------------------------------
# The routes to q on the test set


def encoder_route(guide: Any, x: torch.Tensor, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(z_loc, z_scale) of an amortized guide for every point of ``x``, and the seconds it took."""
    from pyrovae.infer.local import gaussian_guide_params

    start = time.perf_counter()
    z_loc, z_scale = gaussian_guide_params(guide, x, batch_size)
    return z_loc, z_scale, time.perf_counter() - start


def semi_amortized_route(
    model: Any, encoder: torch.nn.Module, x: torch.Tensor, settings: InferenceSettings, batch_size: int = 1000
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(z_loc, z_scale) of the semi-amortized guide (encoder + ``settings.sa_steps`` refinement
    steps) for every point of ``x``, and the seconds it took (model weights frozen: no gradients
    are computed for them)."""
    from pyrovae.infer.local import frozen_params

    start = time.perf_counter()
    locs, scales = [], []
    with frozen_params(lambda name: True), pyro.validation_enabled(False):
        for index in torch.arange(x.shape[0], device=x.device).split(batch_size):
            with torch.no_grad():
                z_loc0, z_scale0 = encoder(x[index])
            z_loc, z_scale, _ = refine_gaussian(
                model, x[index], z_loc0, z_scale0, settings.sa_steps, settings.sa_lr, settings.sa_particles
            )
            locs.append(z_loc)
            scales.append(z_scale)
    return torch.cat(locs), torch.cat(scales), time.perf_counter() - start


def optimised_route(
    model: Any,
    x: torch.Tensor,
    z_dim: int,
    settings: InferenceSettings,
    *,
    init: Any = "prior",
    prefix: str = "qstar",
    max_steps: Optional[int] = None,
    tol: Optional[float] = -1.0,
    check_every: Optional[int] = None,
    progress: bool = False,
) -> tuple[PerDatapointGuide, Any, float]:
    """q* for every point of ``x``: :func:`pyrovae.infer.local.optimize_local_guide` from the prior or
    from a guide, with the settings' step size, decay, particles and stopping rule (``tol=None``:
    no stopping, for convergence curves). :return: the guide, its history and the seconds."""
    from pyrovae.infer.local import optimize_local_guide

    from_prior = init == "prior"
    start = time.perf_counter()
    guide, history = optimize_local_guide(
        model, x, z_dim,
        steps=max_steps or settings.opt_max_steps,
        lr=settings.prior_lr if from_prior else settings.opt_lr,
        lr_decay=settings.prior_lr_decay if from_prior else settings.opt_lr_decay,
        num_particles=settings.opt_particles,
        prefix=prefix,
        init=init,
        tol=settings.opt_tol if tol == -1.0 else tol,
        check_every=check_every or settings.opt_check_every,
        patience=settings.opt_patience,
        return_history=True,
        progress=progress,
    )
    return guide, history, time.perf_counter() - start


def _mean_se(values: torch.Tensor) -> tuple[float, Optional[float]]:
    values = values.double()
    n = values.numel()
    return float(values.mean()), (float(values.std() / math.sqrt(n)) if n > 1 else None)


def gap_summary(log_px: torch.Tensor, elbo: dict[str, torch.Tensor], best: str = "optimised") -> dict[str, Any]:
    """Gaps in nats per point with standard errors over points (from the per-point differences):
    ``approximation`` = log p̂(x) − L[q*], and for every other route r, ``L[q*] − L[r]`` (for the
    encoder that is the amortization gap) and ``log p̂(x) − L[r]`` (its inference gap)."""
    out: dict[str, Any] = {}
    mean, se = _mean_se(log_px - elbo[best])
    out["approximation"] = {"mean": mean, "se": se}
    for name, values in elbo.items():
        if name == best:
            continue
        mean, se = _mean_se(elbo[best] - values)
        inf_mean, inf_se = _mean_se(log_px - values)
        out[name] = {"below_best": mean, "below_best_se": se, "inference": inf_mean, "inference_se": inf_se}
    return out


def study_model(
    label: str,
    model: Any,
    x_test: torch.Tensor,
    z_dim: int,
    settings: InferenceSettings,
    *,
    encoder_guide: Optional[AmortizedGuide] = None,
    eval_samples: int = 5000,
    diag_samples: int = 1000,
    khat_samples: int = 1000,
    eval_batch: int = 100,
    curve_points: int = 0,
    curve_steps: int = 1500,
    curve_check_every: int = 10,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Every route to q for one trained decoder on the test points ``x_test``, and their gaps.

    With an encoder (decoders A and C): q (encoder), q_SA (encoder + refinement) and q* (per-point
    optimisation from the encoder, stopping rule on). Without (decoder B): q = p(z), what a
    per-datapoint guide has for unseen points, and q* from the prior. Then for each route,
    importance diagnostics (:func:`pyrovae.infer.diagnostics.importance_diagnostics`): ``eval_samples``
    draws from q* (its log p̂(x) is the reference log p(x)), ``diag_samples`` from the others; PSIS
    k̂ of every route from its first ``khat_samples`` draws. With ``curve_points``, the first that
    many points are also optimised for ``curve_steps`` steps without stopping, from the encoder
    (if any) and from the prior, to show how the ELBO approaches L[q*] with steps.

    :return: ``(summary, per_point)``: a JSON-ready summary and per-point tensors (CPU) named
        ``log_px`` and ``elbo.<route>``, ``khat.<route>``, ``ess.<route>``, ``log_px.<route>``.
    """
    from pyrovae.infer.diagnostics import importance_diagnostics

    num_points = x_test.shape[0]
    routes: dict[str, dict[str, Any]] = {}
    guides: dict[str, Any] = {}
    if encoder_guide is not None:
        z_loc, z_scale, seconds = encoder_route(encoder_guide, x_test)
        routes["encoder"] = {"seconds": seconds, "seconds_per_point": seconds / num_points}
        guides["encoder"] = encoder_guide
        log(f"[{label}] encoder: {seconds:.2f} s for {num_points} points")
        z_loc, z_scale, seconds = semi_amortized_route(model, encoder_guide.encoder, x_test, settings)
        routes["semi-amortized"] = {
            "seconds": seconds, "seconds_per_point": seconds / num_points, "steps": settings.sa_steps,
        }
        guides["semi-amortized"] = fixed_gaussian_guide(z_loc, z_scale, f"{label}.sa")
        log(f"[{label}] semi-amortized ({settings.sa_steps} steps): {seconds:.1f} s")
        init: Any = encoder_guide
    else:
        from pyrovae.guides import PriorGuide

        guides["prior"] = PriorGuide(z_dim)
        routes["prior"] = {"seconds": 0.0, "seconds_per_point": 0.0}
        init = "prior"
    guide, history, seconds = optimised_route(
        model, x_test, z_dim, settings, init=init, prefix=f"{label}.qstar", progress=progress
    )
    guides["optimised"] = guide
    stopped = history.stopped_at.double()
    routes["optimised"] = {
        "seconds": seconds,
        "seconds_per_point": seconds / num_points,
        "start": "encoder" if encoder_guide is not None else "prior",
        "steps_mean": float(stopped.mean()),
        "steps_median": float(stopped.median()),
        "steps_max": int(stopped.max()),
        "fraction_stopped_by_rule": float((history.stopped_at < settings.opt_max_steps).double().mean()),
        "history": history.to_dict() | {"stopped_at": None, "final_elbo": None},
    }
    log(f"[{label}] q* from the {routes['optimised']['start']}: {seconds:.0f} s, steps mean "
        f"{stopped.mean():.0f} (max {int(stopped.max())}), ELBO (fixed draws) {history.elbo[-1]:.3f}")

    per_point: dict[str, torch.Tensor] = {}
    for name, route_guide in guides.items():
        k = eval_samples if name == "optimised" else diag_samples
        diag = importance_diagnostics(
            model, route_guide, x_test, num_samples=k, batch_size=eval_batch,
            khat_samples=min(khat_samples, k), progress=progress,
        )
        routes[name]["importance"] = diag.summary()
        per_point[f"elbo.{name}"] = diag.elbo
        per_point[f"log_px.{name}"] = diag.log_likelihood
        per_point[f"khat.{name}"] = diag.khat
        per_point[f"ess.{name}"] = diag.ess
        s = routes[name]["importance"]
        log(f"[{label}] {name}: L = {s['elbo']:.3f} ± {s['elbo_se']:.3f}, log p̂ (K={k}) = "
            f"{s['log_likelihood']:.3f}, k̂ median {s['khat_median']:.2f}, k̂ > 0.7: "
            f"{100 * s['fraction_khat_above_0.7']:.1f}% ({diag.seconds:.0f} s)")
    per_point["log_px"] = per_point["log_px.optimised"]
    if encoder_guide is not None:
        # The per-point ELBO of q* as optimised (fixed draws), next to its K-draw estimate.
        per_point["elbo_fixed_draws.optimised"] = history.final_elbo
    elbos = {name: per_point[f"elbo.{name}"] for name in guides}
    summary: dict[str, Any] = {
        "num_points": num_points,
        "log_px": _mean_se(per_point["log_px"])[0],
        "log_px_se": _mean_se(per_point["log_px"])[1],
        "log_px_proposal": "optimised",
        "eval_samples": eval_samples,
        "elbo": {name: _mean_se(v)[0] for name, v in elbos.items()},
        "elbo_se": {name: _mean_se(v)[1] for name, v in elbos.items()},
        "gaps": gap_summary(per_point["log_px"], elbos),
        "routes": routes,
    }
    if curve_points:
        summary["curves"] = convergence_curves(
            model, x_test[:curve_points], z_dim, settings, encoder_guide=encoder_guide,
            steps=curve_steps, check_every=curve_check_every, label=label, log=log,
        )
        idx = slice(0, curve_points)
        summary["curves"]["reference"] = {
            name: float(v[idx].double().mean()) for name, v in elbos.items()
        } | {"log_px": float(per_point["log_px"][idx].double().mean())}
    return summary, per_point


def train_subset_study(
    label: str,
    model: Any,
    x_train: torch.Tensor,
    z_dim: int,
    settings: InferenceSettings,
    start: Any,
    *,
    diag_samples: int = 1000,
    eval_batch: int = 100,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """On training points ``x_train``: the ELBO of the guide the decoder was trained with
    (``start``: the encoder, or a per-datapoint guide holding these points' rows), and of q*
    optimised from it. For an encoder, L[q*] − L[start] here against the same gap on the test set
    says how much of the amortization gap is the encoder failing to generalise; for trained
    per-datapoint rows, how far joint training left them from the best q_i for the final decoder."""
    from pyrovae.infer.diagnostics import importance_diagnostics

    guide, history, seconds = optimised_route(model, x_train, z_dim, settings, init=start, prefix=f"{label}.train.qstar")
    out: dict[str, Any] = {"num_points": x_train.shape[0], "optimise_seconds": seconds}
    for name, route_guide in (("trained", start), ("optimised", guide)):
        diag = importance_diagnostics(model, route_guide, x_train, num_samples=diag_samples, batch_size=eval_batch)
        out[name] = diag.summary()
        out[f"elbo_values.{name}"] = diag.elbo
    gap = out.pop("elbo_values.optimised") - out.pop("elbo_values.trained")
    out["optimised_minus_trained"], out["optimised_minus_trained_se"] = _mean_se(gap)
    log(f"[{label}] {x_train.shape[0]} training points: L[trained q] {out['trained']['elbo']:.3f}, "
        f"L[q*] {out['optimised']['elbo']:.3f}, gap {out['optimised_minus_trained']:.3f}")
    return out


def convergence_curves(
    model: Any,
    x: torch.Tensor,
    z_dim: int,
    settings: InferenceSettings,
    *,
    encoder_guide: Optional[AmortizedGuide] = None,
    steps: int = 1500,
    check_every: int = 10,
    label: str = "",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Mean ELBO (fixed draws) against steps of the per-point optimisation of the points ``x``,
    from the prior and (if given) from the encoder, without the stopping rule; and the
    semi-amortized refinement's own trajectory (its one-draw ELBO estimate before each step)."""
    curves: dict[str, Any] = {"num_points": x.shape[0], "steps": steps}
    starts: list[tuple[str, Any]] = [("prior", "prior")]
    if encoder_guide is not None:
        starts.insert(0, ("encoder", encoder_guide))
    for name, init in starts:
        _, history, seconds = optimised_route(
            model, x, z_dim, settings, init=init, prefix=f"{label}.curve.{name}", max_steps=steps,
            tol=None, check_every=check_every,
        )
        curves[f"from_{name}"] = {
            "step": history.step,
            "elbo": history.elbo,
            "seconds_per_step_per_point": seconds / steps / x.shape[0],
        }
        log(f"[{label}] curve from the {name}: {history.elbo[0]:.2f} -> {history.elbo[-1]:.3f} "
            f"after {steps} steps ({seconds:.0f} s)")
    return curves


# ---------------------------------------------------------------------------------------------
# Posterior draws of selected points, as InferenceData


def select_points(per_point: dict[str, torch.Tensor], num: int = 6, seed: int = 0) -> list[int]:
    """Test points worth a closer look: the largest amortization gap, the largest k̂ of the
    encoder, the median and 90th-percentile amortization gap, then random ones, without repeats."""
    gap = (per_point["elbo.optimised"] - per_point["elbo.encoder"]).double()
    order = gap.argsort()
    picks = [int(order[-1]), int(per_point["khat.encoder"].argmax()), int(order[len(order) // 2]),
             int(order[int(0.9 * (len(order) - 1))])]
    generator = torch.Generator().manual_seed(seed)
    for i in torch.randperm(len(order), generator=generator).tolist():
        picks.append(i)
    out: list[int] = []
    for i in picks:
        if i not in out:
            out.append(i)
        if len(out) == num:
            break
    return out


def inference_data(
    model: Any,
    guides: dict[str, Any],
    x_test: torch.Tensor,
    point_ids: list[int],
    *,
    num_draws: int = 500,
    resample_from: str = "optimised",
    resample_samples: int = 5000,
    per_point: Optional[dict[str, torch.Tensor]] = None,
    seed: int = 0,
) -> Any:
    """Draws of z for the points ``point_ids`` of the test set under each guide, plus
    ``resample_samples`` draws from ``guides[resample_from]`` importance-resampled to
    ``num_draws`` (a reference for p(z|x)), as ``arviz.InferenceData``
    (:func:`pyrovae.infer.diagnostics.to_inference_data`). Per-point k̂ and log p̂(x) go to
    ``constant_data`` when ``per_point`` is given."""
    from pyrovae.infer.diagnostics import (
        importance_resample,
        posterior_draws,
        to_inference_data,
    )

    num_data = x_test.shape[0]
    index = torch.tensor(point_ids, device=x_test.device)
    x = x_test[index]
    pyro.set_rng_seed(seed)
    draws, log_weights = {}, {}
    with pyro.validation_enabled(False):
        for name, guide in guides.items():
            z, log_w = posterior_draws(model, guide, x, index, num_data, num_draws)
            key = name.replace("-", "_")
            draws[key], log_weights[key] = z, log_w
        generator = torch.Generator(device=x_test.device).manual_seed(seed)
        z, ess = importance_resample(
            model, guides[resample_from], x, index, num_data, resample_samples, num_draws, generator=generator
        )
    draws["importance_resampled"] = z
    stats = {"ess_importance_resampling": ess}
    if per_point is not None:
        for key, values in per_point.items():
            if key.startswith(("khat.", "elbo.")) or key == "log_px":
                stats[key.replace(".", "_").replace("-", "_")] = values[index.cpu()]
    return to_inference_data(
        draws, x, point_ids, log_weights=log_weights, point_stats=stats,
        attrs={
            "description": "draws of z for selected MNIST test points under each guide; draws are "
                           "independent, split into 4 pseudo-chains",
            "resampled_from": resample_from,
            "resample_samples": resample_samples,
        },
    )


# ---------------------------------------------------------------------------------------------
# Figures

ROUTE_COLORS = {
    "encoder": "tab:red",
    "semi-amortized": "tab:orange",
    "optimised": "tab:blue",
    "prior": "tab:gray",
    "importance_resampled": "black",
}
ROUTE_LABELS = {
    "encoder": "amortized q (encoder)",
    "semi-amortized": "semi-amortized q_SA",
    "optimised": "optimised q*",
    "prior": "q = p(z) (no re-optimisation)",
    "importance_resampled": "importance-resampled (reference)",
}


def _figure(nrows: int, ncols: int, size: tuple[float, float]) -> Any:
    from studies.importance import _figure as figure

    return figure(nrows, ncols, size)


def _save(fig: Any, path: Any) -> None:
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    fig.clear()


def plot_gaps(models: dict[str, dict[str, Any]], path: Any, reference: Optional[dict[str, Any]] = None) -> None:
    """Stacked bars of the inference gap log p̂(x) − L[q] of each decoder's encoder, split into the
    approximation gap (log p̂ − L[q*]) and the amortization gap (L[q*] − L[q]), with the part the
    semi-amortized refinement closes; ±2 SE bars; and a reference's bars (e.g. Cremer et al.)."""
    fig, axes = _figure(1, 1, (8.5, 4.8))
    ax = axes[0, 0]
    names, approx, closed, residual, notes = [], [], [], [], []
    for label, summary in models.items():
        gaps = summary["gaps"]
        names.append(label)
        approx.append(gaps["approximation"]["mean"])
        if "encoder" in gaps:
            amort = gaps["encoder"]["below_best"]
            sa_left = gaps.get("semi-amortized", {}).get("below_best", amort)
            closed.append(amort - sa_left)
            residual.append(sa_left)
            notes.append("")
        else:
            closed.append(0.0)
            residual.append(0.0)
            prior = gaps.get("prior", {}).get("below_best")
            notes.append(f"no encoder;\nq = p(z) on test\npoints: {prior:.0f} nats\nbelow L[q*]" if prior else "no encoder")
    if reference is not None:
        names.append(reference["label"])
        approx.append(reference["approximation"])
        closed.append(0.0)
        residual.append(reference["amortization"])
        notes.append("")
    xs = list(range(len(names)))
    ax.bar(xs, approx, color="tab:blue", label="approximation gap  log p̂(x) − L[q*]")
    ax.bar(xs, residual, bottom=approx, color="tab:red",
           label="amortization gap that q_SA leaves  L[q*] − L[q_SA] (all of it for the reference)")
    ax.bar(xs, closed, bottom=[a + r for a, r in zip(approx, residual)], color="tab:orange",
           label="closed by the semi-amortized refinement  L[q_SA] − L[q]")
    for x_, a, c, r in zip(xs, approx, closed, residual):
        ax.text(x_, a / 2, f"{a:.2f}", ha="center", va="center", fontsize=8, color="white")
        if r > 0.2:
            ax.text(x_, a + r / 2, f"{r:.2f}", ha="center", va="center", fontsize=8, color="white")
        if c > 0.2:
            ax.text(x_, a + r + c / 2, f"{c:.2f}", ha="center", va="center", fontsize=8)
        ax.text(x_, a + r + c + 0.05, f"{a + r + c:.2f}", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(xs, names, fontsize=8)
    ax.set_ylabel("nats per test point")
    ax.set_title("Inference gap of the encoder = approximation + amortization (MNIST test set)", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(True, axis="y", alpha=0.3)
    top = max(a + r + c for a, r, c in zip(approx, residual, closed))
    ax.set_ylim(0, top * 1.45)
    for x_, a, c, r, note in zip(xs, approx, closed, residual, notes):
        if note:
            ax.text(x_, a + r + c + 0.06 * top, note, ha="center", va="bottom", fontsize=7)
    _save(fig, path)


def plot_convergence(curves: dict[str, Any], path: Any, title: str) -> None:
    """Mean ELBO against optimisation steps from the encoder and from the prior (symlog steps),
    with L[q], L[q_SA], L[q*] (stopping rule) and log p̂(x) of the same points as lines; a zoom
    panel near the top."""
    fig, axes = _figure(1, 2, (11.5, 4.6))
    ref = curves["reference"]
    for i, ax in enumerate(axes[0]):
        for name, color in (("encoder", "tab:red"), ("prior", "tab:gray")):
            key = f"from_{name}"
            if key in curves:
                c = curves[key]
                ax.plot(c["step"], c["elbo"], color=color, marker="o", markersize=1.5, linewidth=1.2,
                        label=f"q_i optimised from the {name}")
        for name, style in (("encoder", ":"), ("semi-amortized", "-."), ("optimised", "--")):
            if name in ref:
                ax.axhline(ref[name], color=ROUTE_COLORS[name], linestyle=style, linewidth=1,
                           label=f"{ROUTE_LABELS[name]}: {ref[name]:.2f}")
        ax.axhline(ref["log_px"], color="black", linestyle="-", linewidth=1,
                   label=f"log p̂(x): {ref['log_px']:.2f}")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlim(left=0)
        ax.set_xlabel("Adam steps (all points at once)")
        ax.set_ylabel("mean ELBO (nats per point)")
        ax.grid(True, which="both", alpha=0.3)
        if i == 1:
            low = min(v for k, v in ref.items() if k != "log_px") - 1.0
            ax.set_ylim(low, ref["log_px"] + 0.5)
            ax.set_title("zoom", fontsize=9)
        else:
            start = min(c["elbo"][0] for k, c in curves.items() if k.startswith("from_"))
            ax.set_ylim(max(start, ref["log_px"] - 80), ref["log_px"] + 2)
            ax.set_title(title, fontsize=9)
    axes[0, 1].legend(fontsize=7, loc="lower right")
    _save(fig, path)


def plot_khat(models: dict[str, dict[str, torch.Tensor]], path: Any, threshold: float = 0.7) -> None:
    """Histograms of the PSIS k̂ of every route's importance weights, one panel per decoder, with
    the 0.7 threshold and the share of points above it."""
    fig, axes = _figure(1, len(models), (4.6 * len(models), 4.0))
    for ax, (label, per_point) in zip(axes[0], models.items()):
        for key, values in per_point.items():
            if not key.startswith("khat."):
                continue
            name = key.split(".", 1)[1]
            finite = values[torch.isfinite(values)].double()
            clipped = finite.clamp(-0.5, 2.5)
            share = float((values > threshold).double().mean())
            ax.hist(clipped.numpy(), bins=60, range=(-0.5, 2.5), histtype="step", linewidth=1.4,
                    color=ROUTE_COLORS.get(name), label=f"{ROUTE_LABELS.get(name, name)}: {100 * share:.1f}% > {threshold}")
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1)
        ax.set_xlabel("Pareto k̂ of the importance weights\n(values outside [−0.5, 2.5] in the end bins)")
        ax.set_ylabel("test points")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
    _save(fig, path)


def plot_marginals(idata: Any, path: Any, dims_per_point: int = 3) -> None:
    """For each selected point (rows), the marginals of the latent coordinates (columns) where the
    encoder's mean is furthest from the importance-resampled mean, in units of the latter's SD:
    histograms under every guide in the InferenceData."""
    import numpy as np

    from pyrovae.infer.diagnostics import _arviz

    az = _arviz()
    post = idata.posterior
    names = [v for v in post.data_vars]
    points = list(post["point"].values)
    fig, axes = _figure(len(points), dims_per_point, (2.7 * dims_per_point, 1.5 * len(points)))
    ref = post["z_importance_resampled"].values.reshape(-1, len(points), post.sizes["latent"])
    enc = post["z_encoder"].values.reshape(-1, len(points), post.sizes["latent"]) if "z_encoder" in names else None
    for row, point in enumerate(points):
        if enc is not None:
            shift = np.abs(enc[:, row].mean(0) - ref[:, row].mean(0)) / (ref[:, row].std(0) + 1e-6)
            dims = np.argsort(-shift)[:dims_per_point]
        else:
            dims = np.argsort(-ref[:, row].std(0))[:dims_per_point]
        for col, dim in enumerate(dims):
            ax = axes[row, col]
            for name in names:
                guide = name[2:].replace("semi_amortized", "semi-amortized")
                values = post[name].values.reshape(-1, len(points), post.sizes["latent"])[:, row, dim]
                grid, density = az.kde(values.astype(np.float64))
                ax.plot(grid, density, linewidth=1.5 if guide == "importance_resampled" else 1.2,
                        color=ROUTE_COLORS.get(guide), label=ROUTE_LABELS.get(guide, guide))
            tops = [line.get_ydata().max() for line in ax.get_lines()[:-1]]
            if tops and ax.get_lines()[-1].get_ydata().max() > 1.5 * max(tops):
                ax.set_ylim(0, 1.5 * max(tops))  # a spiky reference (few distinct draws) is cut
            ax.set_title(f"test point {point}, z[{dim}]", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.set_yticks([])
    axes[0, 0].legend(fontsize=6, loc="upper left")
    _save(fig, path)
