r"""The gap is the KL: log p(x) − ELBO = KL(q(z|x) ‖ p(z|x)), and IWAE_K closes it as K grows.

For any guide q,

.. math:: \log p(x) - \mathbb E_q\Big[\log\frac{p(x, z)}{q(z \mid x)}\Big]
   = \mathbb E_q\Big[\log\frac{q(z \mid x)}{p(z \mid x)}\Big] = \mathrm{KL}(q \,\|\, p(z \mid x)),

and the importance-weighted bound IWAE_K = E[log (1/K) Σ_k w_k] rises monotonically to log p(x),
with log p(x) − IWAE_K ≈ (Var[w]/p(x)²)/(2K) for large K when the weights have finite variance.

:func:`linear_gaussian_gap` checks both on the linear-Gaussian model, where log p(x) and p(z|x)
are exact, for guides that miss the posterior in known ways (the KL in closed form from
``torch.distributions.kl_divergence``). :func:`mnist_gap` measures the per-point gap
log p̂(x) − ELBO of a trained VAE, where nothing is known in closed form.

**References**

[1] D. P. Kingma, M. Welling, "Auto-Encoding Variational Bayes", ICLR 2014.
[2] Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
[3] C. Cremer, X. Li, D. Duvenaud, "Inference Suboptimality in Variational Autoencoders",
    ICML 2018.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import pyro
import torch
from studies.importance import (
    Proposal,
    _figure,
    float64,
    log_abs_expm1,
    log_weight_moment,
    make_guide,
    replicated_importance_sampling,
)
from torch.distributions import kl_divergence

from pyrovae.infer.evaluate import evaluate_dataset
from pyrovae.models import LinearGaussian

__all__ = [
    "GAP_GUIDES",
    "linear_gaussian_gap",
    "mnist_gap",
    "plot_gap_vs_k",
    "plot_gap_vs_kl",
    "summarize_by_label",
    "train_small_vae",
]

#: Guides that miss the posterior N(μ, Σ) in known ways.
GAP_GUIDES: tuple[Proposal, ...] = (
    Proposal("exact posterior"),
    Proposal("shifted mean (+0.5 SD)", shift=0.5),
    Proposal("over-dispersed (1.5x SD)", scale=1.5),
    Proposal("under-dispersed (0.8x SD)", scale=0.8),
    Proposal("mean-field (KL-optimal diagonal)", mean_field=True),
)

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def _mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean over points of the per-point replicate means of ``values`` ``(P, R)``, and its
    standard error sqrt(Σ_p s_p² / R) / P from the within-point spreads (points are fixed, the
    replicates are the randomness)."""
    num_points, replicates = values.shape
    mean = values.mean()
    var = values.var(dim=1, unbiased=True) if replicates > 1 else torch.zeros(num_points)
    se = (var / replicates).sum().sqrt() / num_points
    return float(mean), float(se)


def linear_gaussian_gap(
    z_dim: int = 4,
    x_dim: int = 8,
    signal: float = 9.0,
    noise_scale: float = 1.0,
    num_points: int = 20,
    ks: Sequence[int] = (1, 5, 50, 500),
    samples_per_k: int = 20_000,
    min_replicates: int = 1000,
    guides: Sequence[Proposal] = GAP_GUIDES,
    seed: int = 0,
) -> dict[str, Any]:
    """For each guide on a linear-Gaussian model (see
    :meth:`pyrovae.models.LinearGaussian.random`): the closed-form
    KL(q ‖ p(z|x)), and the gap log p(x) − IWAE_K estimated from replicates of
    :func:`pyrovae.infer.evaluate.importance_sampling` (IWAE_1 is the ELBO), with its Monte Carlo
    standard error.

    Each K gets max(``min_replicates``, ``samples_per_k`` // K) replicates per point, so every K
    costs about the same. ``asymptote`` is (e^{D_2} − 1)/(2K), the large-K prediction of the gap
    (None when the weights have infinite variance).

    :return: a JSON-ready dict with ``settings`` and ``rows`` (one per guide).
    """
    if any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    rows = []
    with float64(), torch.no_grad(), pyro.validation_enabled(False):
        pyro.set_rng_seed(seed)
        model, x = LinearGaussian.random(z_dim, x_dim, num_points, signal, noise_scale, seed=seed)
        log_px = model.log_marginal(x)
        posterior = model.posterior(x)
        for proposal in guides:
            guide = make_guide(model, proposal)
            q = proposal.distribution(posterior)
            kl = kl_divergence(q, posterior).expand(num_points)
            log_m2 = log_weight_moment(posterior, q, 2.0).expand(num_points)
            relvar = torch.exp(log_abs_expm1(log_m2))  # inf when infinite, 0 when q = p(z|x)
            by_k = []
            for k in ks:
                replicates = max(min_replicates, samples_per_k // k)
                ll, _, ess = replicated_importance_sampling(model, guide, x, k, replicates)
                gap = log_px[:, None] - ll
                mean, se = _mean_and_se(gap)
                asymptote = float((relvar / (2 * k)).mean())
                by_k.append({
                    "k": k,
                    "replicates": replicates,
                    "iwae": float(ll.mean()),
                    "gap": mean,
                    "gap_se": se,
                    "max_abs_gap": float(gap.abs().max()),
                    "ess_over_k": float((ess / k).mean()),
                    "asymptote": asymptote if math.isfinite(asymptote) else None,
                })
            elbo = by_k[0] if ks[0] == 1 else None
            z_score = None
            if elbo is not None and elbo["gap_se"] > 1e-9:  # else q = p(z|x): gap 0 to rounding
                z_score = (elbo["gap"] - float(kl.mean())) / elbo["gap_se"]
            rows.append({
                "guide": proposal.name,
                "proposal": vars(proposal),
                "kl_closed_form": float(kl.mean()),
                "log10_relvar_weights": float(log_abs_expm1(log_m2).mean() / math.log(10))
                if bool(torch.isfinite(log_m2).all()) and float(log_m2.max()) > 0 else None,
                "weights_variance_finite": bool(torch.isfinite(log_m2).all()),
                "elbo_gap": None if elbo is None else elbo["gap"],
                "elbo_gap_se": None if elbo is None else elbo["gap_se"],
                "elbo_gap_z": z_score,
                "by_k": by_k,
            })
    return {
        "settings": {
            "z_dim": z_dim,
            "x_dim": x_dim,
            "signal": signal,
            "noise_scale": noise_scale,
            "num_points": num_points,
            "ks": list(ks),
            "samples_per_k": samples_per_k,
            "min_replicates": min_replicates,
            "seed": seed,
        },
        "log_px_mean": float(log_px.mean()),
        "rows": rows,
    }


def train_small_vae(
    data_dir: Optional[str],
    epochs: int,
    num_train: Optional[int] = None,
    z_dim: int = 20,
    hidden_size: int = 200,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[Any, Any, Any, Any]:
    """Train a small Bernoulli VAE on (the first ``num_train`` points of) MNIST with the ELBO.

    :return: ``(config, dataset, model, guide)``, as :func:`pyrovae.app.run.restore` returns them.
    """
    from pyrovae.app.build import build
    from pyrovae.app.config import TrainConfig
    from pyrovae.app.run import load_data
    from pyrovae.infer.objectives import make_objective
    from pyrovae.train import fit

    config = TrainConfig(
        dataset="mnist", z_dim=z_dim, hidden_sizes=(hidden_size,), epochs=epochs,
        num_train=num_train, seed=seed, device=device,
    ).resolved()
    dataset = load_data(config, data_dir)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model, guide = build(config, dataset)
    fit(model, guide, dataset, make_objective("elbo"), epochs=epochs, batch_size=config.batch_size,
        lr=config.lr, seed=seed, test_bound=False, progress=False)
    return config, dataset, model, guide


def mnist_gap(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    num_samples: int = 5000,
    chunk_size: int = 100,
    batch_size: int = 100,
    progress: bool = False,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Per test point: log p̂(x) (K = ``num_samples``), the ELBO from the same draws, their
    difference (the estimated KL(q ‖ p(z|x)), biased low by about (1/ESS − 1/K)/2 because
    log p̂ is), and KL(q ‖ p(z)) in closed form; summarised over points.

    :return: ``(summary, per_point)``; per-point tensors ``gap``, ``kl_prior``,
        ``log_likelihood``, ``elbo``, ``ess``.
    """
    result = evaluate_dataset(
        model, guide, x, num_samples=num_samples, chunk_size=min(chunk_size, num_samples),
        batch_size=batch_size, kl_samples=1, progress=progress,
    )
    gap = result.gap.double()
    kl = result.kl.double()
    ess = result.ess.double()
    n = gap.numel()
    quantiles = torch.quantile(gap, torch.tensor(QUANTILES, dtype=gap.dtype))

    def corr(a: torch.Tensor, b: torch.Tensor) -> Optional[float]:
        if n < 3 or float(a.std()) == 0 or float(b.std()) == 0:
            return None
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    def ranks(a: torch.Tensor) -> torch.Tensor:
        return a.argsort().argsort().double()

    summary = {
        "num_points": n,
        "num_samples": num_samples,
        "gap_mean": float(gap.mean()),
        "gap_se": float(gap.std() / math.sqrt(n)) if n > 1 else None,
        "gap_median": float(gap.median()),
        "gap_std": float(gap.std()) if n > 1 else None,
        "gap_quantiles": {f"{q:g}": float(v) for q, v in zip(QUANTILES, quantiles)},
        "gap_min": float(gap.min()),
        "gap_max": float(gap.max()),
        "fraction_negative": float((gap < 0).double().mean()),
        "log_likelihood_mean": float(result.log_likelihood.mean()),
        "elbo_mean": float(result.elbo.mean()),
        "kl_prior_mean": float(kl.mean()),
        "distortion_mean": float(-(result.elbo.double() + kl).mean()),
        "gap_over_kl_prior": float(gap.mean() / kl.mean()) if float(kl.mean()) > 0 else None,
        "gap_over_kl_prior_median": float((gap / kl).median()) if bool((kl > 0).all()) else None,
        "pearson_gap_kl_prior": corr(gap, kl),
        "spearman_gap_kl_prior": corr(ranks(gap), ranks(kl)),
        "pearson_gap_nll": corr(gap, -result.log_likelihood.double()),
        "ess_mean": float(ess.mean()),
        "ess_median": float(ess.median()),
        "ess_over_k_median": float(ess.median() / num_samples),
        "log_likelihood_bias_estimate": float(((1 / ess - 1 / num_samples) / 2).mean()),
        "active_units": result.active_units,
    }
    per_point = {
        "gap": gap,
        "kl_prior": kl,
        "log_likelihood": result.log_likelihood,
        "elbo": result.elbo,
        "ess": ess,
    }
    return summary, per_point


def summarize_by_label(
    gap: torch.Tensor, kl_prior: torch.Tensor, labels: torch.Tensor
) -> dict[str, dict[str, float]]:
    """Mean gap, mean KL(q ‖ p(z)) and their ratio per class label (e.g. MNIST digit)."""
    if not gap.shape == kl_prior.shape == labels.shape:
        raise ValueError(f"gap, kl_prior and labels must have one entry per point, got "
                         f"{tuple(gap.shape)}, {tuple(kl_prior.shape)}, {tuple(labels.shape)}")
    out = {}
    for label in sorted(set(labels.tolist())):
        sel = labels == label
        g, k = gap[sel].double(), kl_prior[sel].double()
        out[str(label)] = {
            "num_points": int(sel.sum()),
            "gap_mean": float(g.mean()),
            "gap_median": float(g.median()),
            "kl_prior_mean": float(k.mean()),
            "gap_over_kl_prior": float(g.mean() / k.mean()),
        }
    return out


_COLORS = ("tab:green", "tab:red", "tab:blue", "tab:orange", "tab:purple", "tab:brown")


def plot_gap_vs_k(results: dict[str, Any], path: Any) -> None:
    """log p(x) − IWAE_K against K per guide (log-log, ±2 SE bars), the closed-form KL at K = 1
    (stars) and the large-K asymptote (e^{D_2} − 1)/(2K) (dotted) where the weights' variance is
    finite."""
    fig, axes = _figure(1, 1, (8.0, 5.5))
    ax = axes[0, 0]
    ks = results["settings"]["ks"]
    notes = []
    for color, row in zip(_COLORS, results["rows"]):
        pts = [(b["k"], b["gap"], b["gap_se"]) for b in row["by_k"]]
        if max(abs(g) for _, g, _ in pts) < 1e-8:
            worst = max(b["max_abs_gap"] for b in row["by_k"])
            notes.append(f"{row['guide']}: gap = 0 for every K and sample (max |gap| {worst:.0e})")
            continue
        shown = [(k, g, se) for k, g, se in pts if g > 0]
        k_, g_, se_ = zip(*shown)
        lower = [min(2 * s, 0.999 * g) for g, s in zip(g_, se_)]
        label = f"{row['guide']}" + ("" if row["weights_variance_finite"] else "  [Var w = ∞]")
        ax.errorbar(k_, g_, yerr=[lower, [2 * s for s in se_]], color=color, marker="o",
                    capsize=3, label=label)
        ax.plot([ks[0]], [row["kl_closed_form"]], color=color, marker="*", markersize=14,
                markeredgecolor="black", linestyle="none")
        asym = [(b["k"], b["asymptote"]) for b in row["by_k"] if b["asymptote"]]
        if asym:
            grid = [ks[0] * (ks[-1] / ks[0]) ** (i / 40) for i in range(41)]
            scale = asym[0][1] * asym[0][0]
            ax.plot(grid, [scale / k for k in grid], color=color, linestyle=":", linewidth=1)
    ax.plot([], [], color="black", marker="*", markersize=12, linestyle="none",
            label="closed-form KL(q ‖ p(z|x)) (at K = 1)")
    ax.plot([], [], color="black", linestyle=":", label="asymptote Var[w]/(2K p(x)²)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K (importance samples)")
    ax.set_ylabel("log p(x) − IWAE_K (nats; ±2 SE)")
    s = results["settings"]
    ax.set_title(
        f"The gap is KL(q ‖ p(z|x)) at K = 1 and closes as K grows\n"
        f"linear-Gaussian, d = {s['z_dim']}, x_dim = {s['x_dim']}, mean over {s['num_points']} points",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    if notes:
        ax.text(0.99, 0.99, "\n".join(notes), transform=ax.transAxes, ha="right", va="top", fontsize=7,
                color=_COLORS[0])
    _save(fig, path)


def plot_gap_vs_kl(
    per_point: dict[str, torch.Tensor], path: Any, title: str, labels: Optional[torch.Tensor] = None
) -> None:
    """Scatter of the per-point gap log p̂(x) − ELBO against KL(q(z|x) ‖ p(z)), coloured by
    ``labels`` if given, with the line gap = (mean gap / mean KL) × KL."""
    fig, axes = _figure(1, 1, (7.0, 5.2))
    ax = axes[0, 0]
    kl, gap = per_point["kl_prior"].double(), per_point["gap"].double()
    if labels is None:
        ax.scatter(kl.numpy(), gap.numpy(), s=3, alpha=0.3)
    else:
        for label in sorted(set(labels.tolist())):
            sel = labels == label
            ax.scatter(kl[sel].numpy(), gap[sel].numpy(), s=3, alpha=0.4, label=str(label),
                       color=f"C{int(label) % 10}")
        ax.legend(title="label", fontsize=7, markerscale=3, ncol=2, loc="upper left")
    ratio = float(gap.mean() / kl.mean())
    grid = torch.linspace(float(kl.min()), float(kl.max()), 2)
    ax.plot(grid.numpy(), (ratio * grid).numpy(), color="black", linestyle="--")
    ax.text(0.99, 0.01, f"dashed: gap = {ratio:.3f} × KL (ratio of the means)", transform=ax.transAxes,
            ha="right", va="bottom", fontsize=8)
    ax.set_xlabel("KL(q(z|x) ‖ p(z)) (nats)")
    ax.set_ylabel("log p̂(x) − ELBO (nats)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    _save(fig, path)


def _save(fig: Any, path: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    fig.clear()
