"""Why importance sampling? How the variance of Monte Carlo estimates of p(x) grows with the
latent dimension d when z is drawn from the prior p(z), versus from a proposal q(z|x) close to the
posterior (the exact posterior, a shifted and widened one, the mean-field approximation).

On linear-Gaussian models (exact log p(x), exact p(z|x)) with d in --dims and x_dim = ratio * d,
the script measures, for the one-sample and the K-sample estimators: the relative variance
Var[p̂]/p(x)² from independent replicates (in log space) beside its closed form
(exp(D_2(p(z|x) || q)) - 1)/K, the RMSE of log p̂, and ESS/K. The exact posterior gives every
estimate equal to p(x): the script asserts that its relative variance is below 1e-10.

Writes results.json and why_importance_sampling.png under --out.
"""

from __future__ import annotations

import argparse
import math
import time

from studies.importance import PROPOSALS, dimension_study, plot_dimension_study
from studies.provenance import rederive, write_run_record

from pyrovae.app.run import write_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64],
                        help="latent dimensions d to study")
    parser.add_argument("--x-dim-ratio", type=int, default=2, help="x_dim = ratio * d")
    parser.add_argument("--signal", type=float, default=9.0,
                        help="W_ij ~ N(0, signal / x_dim): posterior precision ≈ 1 + signal/σ² per coordinate")
    parser.add_argument("--noise-scale", type=float, default=1.0, help="observation noise σ")
    parser.add_argument("--num-points", type=int, default=10, help="data points x per model (statistics are medians over them)")
    parser.add_argument("--num-samples", type=int, default=100, help="K of the K-sample estimator")
    parser.add_argument("--replicates", type=int, default=500, help="independent K-sample estimates per point")
    parser.add_argument("--one-sample-replicates", type=int, default=10_000,
                        help="independent one-sample estimates per point")
    parser.add_argument("--seed", type=int, default=0, help="seed of the models, data and samples")
    parser.add_argument("--out", type=str, default="runs/why_importance_sampling", help="output folder")
    parser.add_argument("--summarize-only", action="store_true",
                        help="sample nothing: recompute the growth rates of --out/results.json from its rows")
    return parser.parse_args(argv)


def growth(results: dict) -> dict:
    """Per proposal, the factor by which the closed-form one-sample relative variance grows per
    latent dimension between the two largest d, and the same in nats of Rényi-2 divergence
    (ln 10 × the log10 slope, since D₂ = log(1 + relative variance))."""
    out = {}
    for proposal in {r["proposal"] for r in results["rows"]}:
        exact = {r["z_dim"]: r["one_sample"]["log10_relvar_exact"] for r in results["rows"]
                 if r["proposal"] == proposal and r["one_sample"]["log10_relvar_exact"] is not None}
        dims = sorted(exact)
        if len(dims) < 2:
            continue
        slope = (exact[dims[-1]] - exact[dims[-2]]) / (dims[-1] - dims[-2])
        out[proposal] = {"between_dims": dims[-2:], "factor_per_dimension": 10.0 ** slope,
                         "d2_nats_per_dimension": math.log(10.0) * slope}
    return out


def main(args: argparse.Namespace) -> dict:
    if args.summarize_only:
        return rederive(args.out, args, lambda results: {**results, "growth_per_dimension": growth(results)},
                        role="summarize-only: growth rates recomputed from results.json; nothing sampled")
    start = time.perf_counter()
    results = dimension_study(
        dims=tuple(args.dims),
        x_dim_ratio=args.x_dim_ratio,
        signal=args.signal,
        noise_scale=args.noise_scale,
        num_points=args.num_points,
        num_samples=args.num_samples,
        replicates=args.replicates,
        one_sample_replicates=args.one_sample_replicates,
        proposals=PROPOSALS,
        seed=args.seed,
    )
    results["seconds"] = time.perf_counter() - start
    exact = [r for r in results["rows"] if r["proposal"] == "exact posterior"]
    worst = max(max(r["one_sample"]["max_abs_log_error"], r["k_sample"]["max_abs_log_error"]) for r in exact)
    worst_relvar = max(
        10 ** v for r in exact for v in (r["one_sample"]["log10_relvar"], r["k_sample"]["log10_relvar"])
        if v is not None
    ) if any(r["one_sample"]["log10_relvar"] is not None for r in exact) else 0.0
    print(f"exact posterior: max |log p̂ - log p(x)| = {worst:.2e} nats, relative variance <= {worst_relvar:.1e}")
    assert worst_relvar < 1e-10, "the exact posterior must give a zero-variance estimate"
    results["exact_posterior_max_abs_log_error"] = worst
    results["exact_posterior_max_relvar"] = worst_relvar
    for row in results["rows"]:
        one, k = row["one_sample"], row["k_sample"]

        def fmt(v: float | None, exact: bool = False) -> str:
            if v is None:
                return "      inf" if exact and not row["weights_variance_finite"] else "   -inf  "
            return f"{v:9.2f}"

        print(
            f"d={row['z_dim']:3d} {row['proposal']:28s} log10 relvar K=1: {fmt(one['log10_relvar'])} "
            f"(exact {fmt(one['log10_relvar_exact'], True)})  K={k['num_samples']}: {fmt(k['log10_relvar'])} "
            f"(exact {fmt(k['log10_relvar_exact'], True)})  RMSE log p̂ K=1 {one['rmse_log']:8.3f} "
            f"K {k['rmse_log']:8.3f}  ESS/K {k['ess_over_k']:.3g}"
        )
    results["growth_per_dimension"] = growth(results)
    write_json(f"{args.out}/results.json", results)
    write_run_record(args.out, args)
    plot_dimension_study(results, f"{args.out}/why_importance_sampling.png")
    return results


if __name__ == "__main__":
    main(parse_args())
