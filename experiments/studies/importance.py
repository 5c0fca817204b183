r"""Why importance sampling: the variance of Monte Carlo estimates of p(x) as the latent
dimension grows, with z drawn from the prior or from a proposal q(z|x) near the posterior.

For a proposal q the one-sample estimate p̂ = p(x, z)/q(z), z ~ q, is unbiased for p(x), and its
relative variance has a closed form in terms of the Rényi divergence of order 2,

.. math:: \frac{\mathrm{Var}_q[\hat p]}{p(x)^2} = \mathbb E_q\Big[\Big(\frac{p(z \mid x)}{q(z)}
   \Big)^2\Big] - 1 = e^{D_2(p(z \mid x) \,\|\, q)} - 1,

which for Gaussians is known exactly (:func:`log_weight_moment`); the K-sample average divides it
by K. On the linear-Gaussian model (exact p(x) and p(z|x)) this module measures the relative
variance from independent replicates, in log space so that nothing underflows, and sets it beside
the closed form, the RMSE of log p̂ and the effective sample size of
:func:`pyrovae.infer.evaluate.importance_sampling`.

**References**

[1] A. Owen, *Monte Carlo theory, methods and examples* (2013), ch. 9: importance sampling.
[2] M. Gil, F. Alajaji, T. Linder, "Rényi divergence measures for commonly used univariate
    continuous distributions", Information Sciences 2013 (the Gaussian Rényi divergence).
[3] S. Agapiou, O. Papaspiliopoulos, D. Sanz-Alonso, A. M. Stuart, "Importance sampling:
    intrinsic dimension and computational cost", Statistical Science 2017.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import pyro
import torch
from torch.distributions import MultivariateNormal

from pyrovae.guides import ExactPosteriorGuide, PriorGuide
from pyrovae.infer.evaluate import importance_sampling
from pyrovae.models import LinearGaussian

__all__ = [
    "Proposal",
    "PROPOSALS",
    "dimension_study",
    "float64",
    "log_abs_expm1",
    "log_weight_moment",
    "make_guide",
    "plot_dimension_study",
    "relative_variance_from_replicates",
    "replicated_importance_sampling",
]

LN10 = math.log(10.0)


@contextlib.contextmanager
def float64() -> Iterator[None]:
    """Make float64 the default dtype inside the block (restored on exit): exactness checks to
    1e-10 need it, and models built inside get float64 parameters."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@dataclass(frozen=True)
class Proposal:
    """A proposal q(z|x) described relative to the exact posterior N(μ, Σ) of the model.

    ``prior`` ignores everything else (q = p(z)). Otherwise the covariance is Σ, or with
    ``mean_field`` the KL(q‖p)-optimal diagonal approximation diag(1/Λ_ii), Λ = Σ⁻¹; its scale
    factor is multiplied by ``scale`` (covariance × scale²); the mean is μ + ``shift`` × (posterior
    marginal SDs), the same direction in every coordinate.
    """

    name: str
    prior: bool = False
    shift: float = 0.0
    scale: float = 1.0
    mean_field: bool = False

    @property
    def is_exact(self) -> bool:
        return not self.prior and self.shift == 0.0 and self.scale == 1.0 and not self.mean_field

    def distribution(self, posterior: MultivariateNormal) -> MultivariateNormal:
        """q for each row of a batched posterior (batch ``(B,)``, event ``(d,)``).

        The scale factor stays unbatched ``(d, d)`` so that log-densities of many rows never
        materialise B copies of it.
        """
        loc = posterior.loc
        z_dim = loc.shape[-1]
        if self.prior:
            return MultivariateNormal(
                torch.zeros_like(loc), scale_tril=torch.eye(z_dim, dtype=loc.dtype, device=loc.device)
            )
        scale_tril = posterior._unbroadcasted_scale_tril
        marginal_sd = scale_tril.pow(2).sum(-1).sqrt()
        if self.mean_field:
            precision = posterior.precision_matrix
            if precision.dim() > 2:
                precision = precision.reshape(-1, z_dim, z_dim)[0]
            scale_tril = torch.diag_embed(precision.diagonal(dim1=-2, dim2=-1).rsqrt())
        return MultivariateNormal(loc + self.shift * marginal_sd, scale_tril=self.scale * scale_tril)


#: The proposals of the dimension study: the prior, the exact posterior, and two mis-fit ones.
PROPOSALS: tuple[Proposal, ...] = (
    Proposal("prior", prior=True),
    Proposal("exact posterior"),
    Proposal("shifted 0.5 SD, 1.2x wide", shift=0.5, scale=1.2),
    Proposal("mean-field", mean_field=True),
)


def make_guide(model: LinearGaussian, proposal: Proposal) -> Callable:
    """The guide that samples from ``proposal``: :class:`PriorGuide` for the prior, else
    :class:`~pyrovae.guides.ExactPosteriorGuide` with the proposal's transform of the posterior."""
    if proposal.prior:
        return PriorGuide(model.z_dim)
    return ExactPosteriorGuide(model, proposal.distribution)


def log_weight_moment(p: MultivariateNormal, q: MultivariateNormal, alpha: float) -> torch.Tensor:
    r"""log E_q[(p(z)/q(z))^α] = (α - 1) D_α(p ‖ q) for Gaussians p = N(μ, Σ), q = N(m, S), α > 1:

    .. math:: \frac{α(α-1)}2 (μ-m)^\top Σ_α^{-1} (μ-m)
       - \frac12 \log\frac{|Σ_α|}{|Σ|^{1-α} |S|^{α}}, \qquad Σ_α = α S + (1-α) Σ,

    and +∞ where Σ_α is not positive definite (the moment diverges: q's tails are too light).
    With p = p(z|x), α = 2 gives log(1 + Var[p̂]/p(x)²) of the one-sample estimator.

    :return: one value per batch element of ``p`` and ``q`` (broadcast).
    """
    if not alpha > 1:
        raise ValueError(f"alpha must be > 1, got {alpha}")
    cov_p, cov_q = p.covariance_matrix, q.covariance_matrix
    cov_alpha = alpha * cov_q + (1 - alpha) * cov_p
    chol, info = torch.linalg.cholesky_ex(cov_alpha)
    finite = info == 0
    eye = torch.eye(cov_alpha.shape[-1], dtype=cov_alpha.dtype, device=cov_alpha.device)
    chol = torch.where(finite[..., None, None], chol, eye)
    diff = (p.loc - q.loc).unsqueeze(-1)
    diff = diff.expand(chol.shape[:-2] + diff.shape[-2:]) if chol.dim() > diff.dim() else diff
    chol_b = chol.expand(diff.shape[:-2] + chol.shape[-2:])
    solved = torch.linalg.solve_triangular(chol_b, diff, upper=False).squeeze(-1)
    quad = solved.pow(2).sum(-1)

    def logdet(tril: torch.Tensor) -> torch.Tensor:
        return 2 * tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)

    value = 0.5 * alpha * (alpha - 1) * quad - 0.5 * (
        logdet(chol)
        - (1 - alpha) * logdet(p._unbroadcasted_scale_tril)
        - alpha * logdet(q._unbroadcasted_scale_tril)
    )
    return torch.where(finite, value, torch.full_like(value, math.inf))


def log_abs_expm1(delta: torch.Tensor) -> torch.Tensor:
    """log |e^δ - 1|, stable for any δ (no overflow for large δ, no cancellation near 0)."""
    return delta.clamp(min=0) + torch.log(-torch.expm1(-delta.abs()))


def relative_variance_from_replicates(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Relative variance Var[p̂]/p² from R replicates δ_r = log p̂_r - log p(x) (last dim),
    computed in log space.

    Since E[p̂/p] = 1 exactly, v̂ = (1/R) Σ_r (e^{δ_r} - 1)² is unbiased; its standard error is
    sd_r[(e^{δ_r} - 1)²]/√R, trustworthy only when the weights have a finite fourth moment and R
    is large enough to see their tail (otherwise v̂ is typically far *below* the truth).

    :return: ``(log v̂, log SE(v̂))``, shapes ``delta.shape[:-1]``.
    """
    num = delta.shape[-1]
    if num < 2:
        raise ValueError("need at least 2 replicates")
    log_sq = 2 * log_abs_expm1(delta)
    log_mean = torch.logsumexp(log_sq, -1) - math.log(num)
    log_second = torch.logsumexp(2 * log_sq, -1) - math.log(num)
    # Var = E[v²] - E[v]² = E[v²] (1 - E[v]²/E[v²]), the ratio in (0, 1] by Jensen.
    ratio = (2 * log_mean - log_second).clamp(max=0.0)
    log_var = log_second + torch.log(-torch.expm1(ratio))
    log_se = 0.5 * (log_var - math.log(num - 1))
    return log_mean, log_se


def replicated_importance_sampling(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    num_samples: int,
    replicates: int,
    max_elements: int = 10_000_000,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``replicates`` independent runs of :func:`pyrovae.infer.evaluate.importance_sampling` with
    ``num_samples`` draws for each row of ``x``, vectorized by repeating the rows.

    :param max_elements: memory budget in tensor elements per vectorized pass.
    :return: ``(log p̂, ELBO, ESS)``, each of shape ``(num_points, replicates)``.
    """
    num_points, x_dim = x.shape
    z_dim = getattr(model, "z_dim", 1)
    chunk = min(num_samples, 100)
    rows = max(1, max_elements // (chunk * (x_dim + z_dim) + z_dim * z_dim))
    x_rep = x.repeat_interleave(replicates, 0)
    parts: dict[str, list[torch.Tensor]] = {"ll": [], "elbo": [], "ess": []}
    for start in range(0, x_rep.shape[0], rows):
        est = importance_sampling(
            model, guide, x_rep[start : start + rows], num_samples=num_samples, chunk_size=chunk
        )
        parts["ll"].append(est.log_likelihood)
        parts["elbo"].append(est.elbo)
        parts["ess"].append(est.ess)
    out = tuple(torch.cat(parts[key]).reshape(num_points, replicates) for key in ("ll", "elbo", "ess"))
    return out  # type: ignore[return-value]


def _log10(value: torch.Tensor) -> Optional[float]:
    """log10 of a positive quantity given as its natural log (None for +inf; -inf stays -inf
    as None too, flagged by the caller)."""
    v = float(value) / LN10
    return v if math.isfinite(v) else None


def _median(values: torch.Tensor) -> torch.Tensor:
    # The lower median of the points (torch's), kept in log space for the relative variances.
    return values.median()


def dimension_study(
    dims: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    x_dim_ratio: int = 2,
    signal: float = 9.0,
    noise_scale: float = 1.0,
    num_points: int = 10,
    num_samples: int = 100,
    replicates: int = 500,
    one_sample_replicates: int = 10_000,
    proposals: Sequence[Proposal] = PROPOSALS,
    seed: int = 0,
) -> dict[str, Any]:
    """Relative variance, RMSE of log p̂ and ESS/K of importance-sampling estimates of p(x) on
    linear-Gaussian models of latent dimension d ∈ ``dims`` (x_dim = ``x_dim_ratio`` × d), for
    each proposal, with the one-sample and the K = ``num_samples`` estimators.

    Per model, ``num_points`` points x are drawn from the model; every statistic is computed per
    point from independent replicates and summarised by the median over points (per-point values
    are returned too). Relative variances are reported as log10, with the closed form
    (e^{D_2} - 1)/K beside the replicate estimate; ``None`` stands for +∞ (closed form) or for
    an exact zero.

    :return: a JSON-ready dict: ``settings`` and ``rows`` (one per (d, proposal)).
    """
    if not dims or any(not isinstance(d, int) or d < 1 for d in dims):
        raise ValueError(f"dims must be positive integers, got {dims!r}")
    if replicates < 2 or one_sample_replicates < 2:
        raise ValueError("need at least 2 replicates for a variance")
    rows = []
    # Validation off: its checks of every (K, B) batch cost more than the arithmetic here.
    with float64(), torch.no_grad(), pyro.validation_enabled(False):
        for d in dims:
            pyro.set_rng_seed(seed + d)
            model, x = LinearGaussian.random(
                d, x_dim_ratio * d, num_points, signal, noise_scale, seed=seed + 1000 * d
            )
            log_px = model.log_marginal(x)
            posterior = model.posterior(x)
            for proposal in proposals:
                guide = make_guide(model, proposal)
                q = proposal.distribution(posterior)
                log_m2 = log_weight_moment(posterior, q, 2.0)  # (P,)
                log_relvar_exact_1 = log_abs_expm1(log_m2)
                ll1, _, _ = replicated_importance_sampling(model, guide, x, 1, one_sample_replicates)
                llk, _, essk = replicated_importance_sampling(model, guide, x, num_samples, replicates)
                delta1 = ll1 - log_px[:, None]
                deltak = llk - log_px[:, None]
                lv1, lse1 = relative_variance_from_replicates(delta1)
                lvk, lsek = relative_variance_from_replicates(deltak)
                rmse1 = delta1.pow(2).mean(-1).sqrt()
                rmsek = deltak.pow(2).mean(-1).sqrt()
                ess_frac = (essk / num_samples).mean(-1)
                row = {
                    "z_dim": d,
                    "x_dim": x_dim_ratio * d,
                    "proposal": proposal.name,
                    "weights_variance_finite": bool(torch.isfinite(log_m2).all()),
                    "log_px_mean": float(log_px.mean()),
                    "one_sample": {
                        "log10_relvar": _log10(_median(lv1)),
                        "log10_relvar_se_ratio": _log10(_median(lse1 - lv1)),
                        "log10_relvar_exact": _log10(_median(log_relvar_exact_1)),
                        "rmse_log": float(_median(rmse1)),
                        "relative_rmse_log": float(_median(rmse1 / log_px.abs())),
                        "mean_log_error": float(_median(delta1.mean(-1))),
                        "max_abs_log_error": float(delta1.abs().max()),
                        "replicates": one_sample_replicates,
                    },
                    "k_sample": {
                        "num_samples": num_samples,
                        "log10_relvar": _log10(_median(lvk)),
                        "log10_relvar_se_ratio": _log10(_median(lsek - lvk)),
                        "log10_relvar_exact": _log10(_median(log_relvar_exact_1) - math.log(num_samples)),
                        "rmse_log": float(_median(rmsek)),
                        "relative_rmse_log": float(_median(rmsek / log_px.abs())),
                        "mean_log_error": float(_median(deltak.mean(-1))),
                        "max_abs_log_error": float(deltak.abs().max()),
                        "ess_over_k": float(_median(ess_frac)),
                        "replicates": replicates,
                    },
                    "per_point": {
                        "log10_relvar_one_sample": [_log10(v) for v in lv1],
                        "log10_relvar_exact_one_sample": [_log10(v) for v in log_relvar_exact_1],
                        "rmse_log_k_sample": rmsek.tolist(),
                        "ess_over_k": ess_frac.tolist(),
                    },
                }
                rows.append(row)
    return {
        "settings": {
            "dims": list(dims),
            "x_dim_ratio": x_dim_ratio,
            "signal": signal,
            "noise_scale": noise_scale,
            "num_points": num_points,
            "num_samples": num_samples,
            "replicates": replicates,
            "one_sample_replicates": one_sample_replicates,
            "proposals": [vars(p) for p in proposals],
            "seed": seed,
        },
        "rows": rows,
    }


_COLORS = ("tab:red", "tab:green", "tab:blue", "tab:orange", "tab:purple", "tab:brown")


def _figure(nrows: int, ncols: int, size: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def plot_dimension_study(results: dict[str, Any], path: Any) -> None:
    """One panel per statistic against the latent dimension d (log axes): relative variance of
    the one-sample and K-sample estimators (replicate estimates as open circles, closed form as
    lines, ▲ at the top where the closed form is infinite), RMSE of log p̂, and ESS/K."""
    from pathlib import Path

    from matplotlib.lines import Line2D

    rows = results["rows"]
    names = list(dict.fromkeys(r["proposal"] for r in rows))
    colors = dict(zip(names, _COLORS))
    dims = results["settings"]["dims"]
    num_samples = results["settings"]["num_samples"]
    exact_rows = [r for r in rows if r["proposal"] == "exact posterior"]
    worst = max((max(r["one_sample"]["max_abs_log_error"], r["k_sample"]["max_abs_log_error"])
                 for r in exact_rows), default=float("nan"))
    fig, axes = _figure(2, 2, (11.0, 8.5))
    for ax, key, title in (
        (axes[0, 0], "one_sample", "relative variance Var[p̂]/p(x)², one sample (K = 1)"),
        (axes[0, 1], "k_sample", f"relative variance Var[p̂]/p(x)², K = {num_samples}"),
    ):
        for name in names:
            sel = [r for r in rows if r["proposal"] == name]
            # A closed form of exactly 0 (the exact posterior; mean-field when d = 1) is off a log
            # axis, and its replicate estimate is rounding error (~1e-30): leave both out.
            zero = [r["weights_variance_finite"] and r[key]["log10_relvar_exact"] is None for r in sel]
            exact = [(r["z_dim"], 10 ** r[key]["log10_relvar_exact"]) for r, z in zip(sel, zero)
                     if not z and r[key]["log10_relvar_exact"] is not None]
            est = [(r["z_dim"], 10 ** r[key]["log10_relvar"]) for r, z in zip(sel, zero)
                   if not z and r[key]["log10_relvar"] is not None]
            infinite = [r["z_dim"] for r in sel if not r["weights_variance_finite"]]
            if exact:
                ax.plot(*zip(*exact), color=colors[name], linestyle="-")
            if est:
                ax.plot(*zip(*est), color=colors[name], linestyle="none", marker="o",
                        markerfacecolor="none", markersize=7)
            if infinite:
                ax.plot(infinite, [0.97] * len(infinite), transform=ax.get_xaxis_transform(),
                        color=colors[name], linestyle="none", marker="^", markersize=9, clip_on=False)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("Var[p̂] / p(x)²")
        replicates = rows[0][key]["replicates"]
        handles = [Line2D([], [], color=colors[n], label=n) for n in names if n != "exact posterior"]
        handles += [
            Line2D([], [], color="black", label="closed form (e^D₂ − 1)/K"),
            Line2D([], [], color="black", linestyle="none", marker="o", markerfacecolor="none",
                   label=f"estimate from {replicates} replicates"),
            Line2D([], [], color="black", linestyle="none", marker="^", label="closed form = ∞ (drawn at the top)"),
            Line2D([], [], color=colors.get("exact posterior", "k"), linestyle="none",
                   label=f"exact posterior: variance 0, not shown (max |log p̂ − log p(x)| = {worst:.0e})"),
        ]
        # Centre left is empty: at small d every curve is near the bottom.
        ax.legend(handles=handles, fontsize=7, loc="center left")
    ax = axes[1, 0]
    for name in names:
        sel = [r for r in rows if r["proposal"] == name]
        for key, style, marker in (("one_sample", "--", "s"), ("k_sample", "-", "o")):
            # Rounding-error values (exact posterior; mean-field at d = 1) are off the scale.
            pts = [(r["z_dim"], r[key]["rmse_log"]) for r in sel if r[key]["rmse_log"] > 1e-8]
            if pts:
                ax.plot(*zip(*pts), color=colors[name], linestyle=style, marker=marker, markersize=5)
    ax.set_yscale("log")
    ax.set_title("RMSE of log p̂ (nats); ≈ relative error of p̂ when small", fontsize=10)
    ax.set_ylabel("RMSE of log p̂ − log p(x) (nats)")
    handles = [Line2D([], [], color=colors[n], label=n) for n in names if n != "exact posterior"]
    handles += [
        Line2D([], [], color="black", linestyle="--", marker="s", markersize=5, label="K = 1"),
        Line2D([], [], color="black", marker="o", markersize=5, label=f"K = {num_samples}"),
    ]
    handles.append(Line2D([], [], color=colors.get("exact posterior", "k"), linestyle="none",
                          label="exact posterior: 0, not shown"))
    ax.legend(handles=handles, fontsize=7, loc="upper left")
    ax = axes[1, 1]
    for name in names:
        sel = [r for r in rows if r["proposal"] == name]
        ax.plot([r["z_dim"] for r in sel], [r["k_sample"]["ess_over_k"] for r in sel],
                color=colors[name], marker="o", label=name)
    ax.axhline(1.0 / num_samples, color="grey", linestyle=":", label="1/K: one weight dominates")
    ax.set_yscale("log")
    ax.set_title(f"effective sample size ESS/K, K = {num_samples}", fontsize=10)
    ax.set_ylabel("ESS / K")
    ax.legend(fontsize=7, loc="lower left")
    for ax in axes.flat:
        ax.set_xscale("log", base=2)
        ax.set_xticks(dims, [str(d) for d in dims])
        ax.set_xlabel("latent dimension d")
        ax.grid(True, which="major", alpha=0.3)
    s = results["settings"]
    fig.suptitle(
        f"Estimating p(x) by importance sampling on linear-Gaussian models (x_dim = {s['x_dim_ratio']}d, "
        f"W_ij ~ N(0, {s['signal']:g}/x_dim), σ = {s['noise_scale']:g}); median over {s['num_points']} points x",
        fontsize=10,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    fig.clear()
