"""Does a tighter bound give the encoder a worse gradient? Gradient SNR against K for IWAE, IWAE-STL,
IWAE-DReG, MIWAE, PIWAE and CIWAE.

For a trained MNIST VAE (the checkpoint of `pyrovae train`, by default runs/mnist/checkpoint.pt)
and a fixed minibatch of test images, R independent gradient estimates are drawn at each K: of the
IWAE bound with the standard pathwise estimator, STL and DReG, and of Rainforth et al.'s variants
(MIWAE and PIWAE with M = 4 groups of K, CIWAE with β = 0.5; studies.snr.OPTIONS), and the
signal-to-noise ratio of the encoder's and the decoder's gradients is reported (Rainforth et al.
2018: the standard encoder SNR falls as K grows and MIWAE/PIWAE/CIWAE trade some tightness for it;
Tucker et al. 2019: DReG's does not fall).

Writes --out/results.json and --out/snr.png.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import pyro
import torch
from studies import snr as study
from studies.provenance import rederive, write_run_record

from pyrovae.app.run import restore, write_json
from pyrovae.runtime.perf import tune_malloc
from pyrovae.train import evaluation_data


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="runs/mnist/checkpoint.pt", help="checkpoint.pt of `pyrovae train`")
    parser.add_argument("--data-dir", default=None, help="folder holding MNIST/raw (else $PYROVAE_DATA)")
    parser.add_argument("--out", default="docs/gradient_snr", help="folder for results.json and snr.png")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 3, 10, 30, 100], help="particle counts")
    parser.add_argument("--estimators", nargs="+", default=list(study.ESTIMATORS), choices=study.ESTIMATORS)
    parser.add_argument("--points", type=int, default=16, help="test images in the minibatch")
    parser.add_argument("--replicates", type=int, default=500, help="gradient draws per (estimator, K)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--summarize-only", action="store_true",
                        help="draw nothing: recompute the ratios of --out/results.json from its rows")
    return parser.parse_args(argv)


def ratios(rows: list[dict]) -> dict:
    """The page's comparisons: each estimator's encoder SNR (per coordinate and pooled) over the
    standard IWAE estimator's at the same K, its encoder variance over IWAE's, and each SNR at the
    largest K over the smallest."""
    by = {(r["estimator"], r["k"]): r for r in rows}
    ks = sorted({r["k"] for r in rows})
    out: dict = {"vs_iwae": {}, "largest_k_over_smallest": {}}
    for (estimator, k), r in by.items():
        base = by.get(("iwae", k))
        if base is not None and estimator != "iwae":
            out["vs_iwae"][f"{estimator} K={k}"] = {
                "encoder_snr": r["encoder"]["snr"] / base["encoder"]["snr"],
                "encoder_snr_pooled": r["encoder"]["snr_pooled"] / base["encoder"]["snr_pooled"],
                "encoder_variance": r["encoder"]["variance"] / base["encoder"]["variance"]}
    for estimator in {r["estimator"] for r in rows}:
        if (estimator, ks[0]) in by and (estimator, ks[-1]) in by:
            first, last = by[(estimator, ks[0])], by[(estimator, ks[-1])]
            out["largest_k_over_smallest"][estimator] = {
                f"{part}_{stat}": last[part][stat] / first[part][stat]
                for part in ("encoder", "decoder") for stat in ("snr", "snr_pooled")}
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.summarize_only:
        return rederive(args.out, args, lambda results: {**results, "ratios": ratios(results["rows"])},
                        role="summarize-only: ratios recomputed from results.json's rows; nothing drawn")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tune_malloc()
    config, dataset, model, guide, _ = restore(args.checkpoint, data_dir=args.data_dir)
    if not hasattr(guide, "encoder") or getattr(guide, "site_names", ("z",)) != ("z",):
        raise SystemExit("gradient_snr needs a one-layer VAE with an amortized encoder (pyrovae train --model vae)")
    x = evaluation_data(dataset, "test", config.seed)[: args.points]
    index = torch.arange(x.shape[0], device=x.device)
    pyro.set_rng_seed(args.seed)
    start = time.perf_counter()
    with pyro.validation_enabled(False):
        rows = study.snr_table(
            model, guide, guide.encoder, model.decoder, x, index, dataset.num_test, args.ks, args.estimators,
            args.replicates, progress=lambda message: print(message, flush=True),
        )
    slopes = {}
    for estimator in args.estimators:
        sub = [r for r in rows if r["estimator"] == estimator and r["encoder"]["snr"] > 0]
        if len(sub) >= 2:
            logs = [(math.log(r["k"]), math.log(r["encoder"]["snr"])) for r in sub]
            mx = sum(a for a, _ in logs) / len(logs)
            my = sum(b for _, b in logs) / len(logs)
            sxx = sum((a - mx) ** 2 for a, _ in logs)
            slopes[estimator] = sum((a - mx) * (b - my) for a, b in logs) / sxx if sxx > 0 else None
    results = {
        "checkpoint": str(args.checkpoint), "config": config.to_dict(), "args": vars(args),
        "rows": rows, "encoder_snr_log_slope": slopes, "seconds": time.perf_counter() - start,
        "ratios": ratios(rows),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    write_run_record(out, args, configs=config.to_dict(), device=str(config.device))
    study.plot_snr(rows, out / "snr.png", f"gradient SNR vs K ({args.points} test images, {args.replicates} draws)")
    print("log-log slope of the encoder SNR against K:", json.dumps(slopes))
    return results


if __name__ == "__main__":
    main()
