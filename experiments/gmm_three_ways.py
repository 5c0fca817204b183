"""Question: fitting a 3-component Gaussian mixture in R² by maximum likelihood, how do three ways
of handling the discrete latent z compare — (a) summing z out exactly (enumeration), (b) the
K-sample Monte Carlo estimator with z drawn from the prior, (c) the IWAE bound with an amortized
categorical guide q(z|x) trained by VIMCO? And why does (b) waste most of its samples?

Writes ``results.json`` (exact held-out log-likelihood, parameter errors against the truth up to
label switching, steps, seconds, learning curves, responsibilities and ESS/K under prior and
guide sampling) and ``fits.png``, ``curves.png``, ``proposals.png`` under ``--out``.

    python experiments/gmm_three_ways.py --out runs/gmm_three_ways
"""

from __future__ import annotations

import argparse
import pathlib
import time
from typing import Optional, Sequence

import torch
from studies.mixture import ThreeWaysConfig, run_three_ways, save_figures
from studies.provenance import write_run_record

from pyrovae.app.run import write_json


def build_parser() -> argparse.ArgumentParser:
    defaults = ThreeWaysConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="Adam steps per method")
    parser.add_argument("--num-particles", type=int, default=defaults.num_particles,
                        help="K, importance samples per point in the Monte Carlo objectives (b) and (c); >= 2")
    parser.add_argument("--num-train", type=int, default=defaults.num_train, help="training points")
    parser.add_argument("--num-test", type=int, default=defaults.num_test, help="held-out points")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="points per step")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="Adam learning rate at the first step")
    parser.add_argument("--final-lr-factor", type=float, default=defaults.final_lr_factor,
                        help="the learning rate decays geometrically to lr * this at the last step")
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every,
                        help="steps between evaluations of the exact held-out log-likelihood")
    parser.add_argument("--ess-samples", type=int, default=defaults.ess_samples,
                        help="K of the importance-sampling runs that measure ESS/K")
    parser.add_argument("--points-per-component", type=int, default=defaults.points_per_component,
                        help="test points nearest each true component in the ESS/responsibility study")
    parser.add_argument("--fixed-weights", action="store_true",
                        help="keep the mixture weights uniform instead of learning them")
    parser.add_argument("--prior-gradient", type=str, choices=("vimco", "detached"), default=defaults.prior_gradient,
                        help="method (b): differentiate through the prior's sampling (vimco, the gradient of "
                             "E[L_K]) or read the prior detached (a fixed proposal at each step)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of data, initialisation and sampling")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest for these small tensors on a shared machine)")
    parser.add_argument("--device", type=str, default=defaults.device, help="cpu or cuda")
    parser.add_argument("--out", type=str, default="runs/gmm_three_ways", help="output folder")
    return parser


def held_out_gaps(results: dict) -> dict:
    """Each fit's held-out shortfall against the true parameters, and the size expected for the
    maximum-likelihood estimate, (number of fitted parameters) / (2 N)."""
    truth = results["truth_test_log_likelihood"]
    components, dim = len(results["truth"]["locs"]), len(results["truth"]["locs"][0])
    fitted = components * dim + components * dim * (dim + 1) // 2
    fitted += components - 1 if results["config"]["learn_weights"] else 0
    return {
        "truth_minus_method": {m: truth - r["test_log_likelihood"] for m, r in results["methods"].items()},
        "truth_minus_mle": truth - results["mle_em"]["test_log_likelihood"],
        "fitted_parameters": fitted,
        "expected_mle_gap": fitted / (2 * results["config"]["num_train"]),
    }


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    config = ThreeWaysConfig(
        steps=args.steps, num_particles=args.num_particles, num_train=args.num_train, num_test=args.num_test,
        batch_size=args.batch_size, lr=args.lr, final_lr_factor=args.final_lr_factor, eval_every=args.eval_every, ess_samples=args.ess_samples,
        points_per_component=args.points_per_component, learn_weights=not args.fixed_weights,
        prior_gradient=args.prior_gradient,
        seed=args.seed, device=args.device,
    )
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results, fitted, dataset = run_three_ways(config)
    results["figures"] = save_figures(results, fitted, dataset, out, seed=config.seed)
    results["total_seconds"] = time.perf_counter() - start
    results["derived"] = held_out_gaps(results)
    write_json(out / "results.json", results)
    write_run_record(out, args, configs=config, device=args.device)
    print(f"truth: held-out log-lik {results['truth_test_log_likelihood']:.4f} nats/point")
    for method, r in results["methods"].items():
        e = r["parameter_errors"]
        print(f"{method:12s} held-out {r['test_log_likelihood']:.4f}  loc {e['loc_error']:.3f}  "
              f"cov {e['covariance_error']:.3f}  weight {e['weight_error']:.3f}  {r['seconds']:.1f} s")
    for proposal, ess in results["proposals"]["ess_over_k"].items():
        print(f"ESS/K {proposal:6s} " + "  ".join(f"{g}: {v:.3f}" for g, v in ess.items()))
    return results


def cli(argv: Optional[Sequence[str]] = None) -> dict:
    return main(build_parser().parse_args(argv))


if __name__ == "__main__":
    cli()
