"""How much of a VAE's inference gap is due to amortization, and what do per-datapoint and
semi-amortized inference buy, at what cost?

For three decoders on MNIST — (A) trained with an amortized encoder (the checkpoint of
`pyrovae train`), (B) trained jointly with a per-datapoint guide (one q_i per training point, no
encoder), (C) trained with the semi-amortized guide — on the test set: log p̂(x) (importance
sampling, K = --eval-samples draws from q*), the ELBO of the encoder's q, of the semi-amortized
q_SA and of the per-point optimised q*; approximation gap log p̂ − L[q*] and amortization gap
L[q*] − L[q] (Cremer, Li & Duvenaud 2018); seconds per point of each route; how the ELBO
approaches L[q*] with optimisation steps; PSIS k̂ of each route's importance weights (ArviZ);
posterior draws of a few test points under each guide as ArviZ InferenceData.

Parts run separately (--parts) so they can run in parallel; each writes part_<name>.json and
part_<name>.pt under --out, and every run ends by merging the parts present into results.json,
the figures (gaps.png, convergence.png, khat.png, marginals.png), inference_data.nc and
az_summary.csv.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyro
import torch
from studies import amortization as study
from studies.provenance import write_run_record

from pyrovae.app.run import load_data, restore, write_json
from pyrovae.train import evaluation_data

PARTS = ("amortized", "per-datapoint", "semi-amortized")
LABELS = {
    "amortized": "(A) decoder trained with the encoder",
    "per-datapoint": "(B) decoder trained with per-datapoint q_i",
    "semi-amortized": "(C) decoder trained with q_SA",
}
#: Cremer, Li & Duvenaud (2018), Table 2, MNIST, decoder trained with a fully factorised Gaussian
#: q. Quoted from memory, not checked against the paper here: the gaps are "about 1.3–1.5 nats
#: each"; the row values we recall are log p̂ −89.80, L[q*_FFG] −91.23, L[q] −92.57.
CREMER_2018 = {
    "label": "Cremer et al. 2018\n(FFG, MNIST; recalled)",
    "log_px": -89.80,
    "elbo_optimised": -91.23,
    "elbo_encoder": -92.57,
    "approximation": 1.43,
    "amortization": 1.34,
    "verified": False,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", type=str, nargs="+", choices=PARTS, default=list(PARTS), help="which decoders to study")
    parser.add_argument("--checkpoint", type=str, default="runs/mnist/checkpoint.pt",
                        help="(A): checkpoint.pt of `pyrovae train` (amortized Gaussian encoder)")
    parser.add_argument("--data-dir", type=str, default=None, help="folder holding MNIST/raw (else $PYROVAE_DATA)")
    parser.add_argument("--pd-checkpoint", type=str, default="runs/amortization/per_datapoint.pt",
                        help="(B): loaded if it exists, else trained here and written there")
    parser.add_argument("--sa-checkpoint", type=str, default="runs/amortization/semi_amortized.pt",
                        help="(C): loaded if it exists, else trained here and written there")
    parser.add_argument("--train-epochs", type=int, default=20, help="epochs of (B) and (C) when trained here")
    parser.add_argument("--num-train", type=int, default=None, help="training points of (B) and (C) (default all)")
    parser.add_argument("--z-dim", type=int, default=None, help="latent dimension of (B) and (C) (default as (A))")
    parser.add_argument("--hidden-sizes", type=int, nargs="+", default=None, help="hidden widths of (B) and (C) (default as (A))")
    parser.add_argument("--local-steps", type=int, default=10, help="(B): Adam steps on a batch's q_i before each decoder step")
    parser.add_argument("--local-lr", type=float, default=3e-2, help="(B): their step size")
    parser.add_argument("--num-test", type=int, default=10_000, help="first test points to study")
    parser.add_argument("--eval-samples", type=int, default=5000, help="K of log p̂(x) (draws from q*)")
    parser.add_argument("--diag-samples", type=int, default=1000, help="draws from the other routes (ELBO, ESS, k̂)")
    parser.add_argument("--khat-samples", type=int, default=1000, help="k̂ of every route from its first this many draws")
    parser.add_argument("--eval-batch", type=int, default=100, help="test points per importance-sampling pass")
    parser.add_argument("--curve-points", type=int, default=1000, help="points of the steps-vs-ELBO curves (0: none)")
    parser.add_argument("--curve-steps", type=int, default=1500, help="steps of those curves")
    parser.add_argument("--curve-check-every", type=int, default=10, help="steps between points of the curves")
    parser.add_argument("--train-points", type=int, default=1000,
                        help="first training points on which the trained guide is compared with q* (0: skip)")
    parser.add_argument("--idata-points", type=int, default=6, help="test points in the InferenceData (decoder A)")
    parser.add_argument("--idata-draws", type=int, default=500, help="draws per guide and point in the InferenceData")
    defaults = study.InferenceSettings()
    for name, value in defaults.to_dict().items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value,
                            help=f"InferenceSettings.{name} (see studies.amortization)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: merge the parts already under --out and redraw the figures")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--progress", type=int, choices=[0, 1], default=0, help="1: progress bars")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws and of (B) and (C)")
    parser.add_argument("--out", type=str, default="runs/amortization_gap", help="output folder")
    return parser.parse_args(argv)


def settings_of(args: argparse.Namespace) -> study.InferenceSettings:
    names = study.InferenceSettings().to_dict()
    return study.InferenceSettings(**{name: getattr(args, name) for name in names})


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def build_decoder(args: argparse.Namespace, part: str, config_a):  # type: ignore[no-untyped-def]
    """Model (B) or (C): loaded from its checkpoint, or trained here and saved there."""
    import dataclasses

    from pyrovae.app.build import build
    from pyrovae.guides import SemiAmortizedGuide

    settings = settings_of(args)
    guide_name = "per-datapoint" if part == "per-datapoint" else "amortized"
    config = dataclasses.replace(
        config_a, guide=guide_name, num_train=args.num_train, num_test=None, seed=args.seed,
        z_dim=args.z_dim or config_a.z_dim,
        hidden_sizes=tuple(args.hidden_sizes) if args.hidden_sizes else config_a.hidden_sizes,
    ).resolved()
    dataset = load_data(config, args.data_dir)
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    model, guide = build(config, dataset)
    if part == "semi-amortized":
        guide = SemiAmortizedGuide(guide.encoder, model, num_steps=settings.sa_steps, lr=settings.sa_lr,
                                   num_particles=settings.sa_particles)
    path = Path(args.pd_checkpoint if part == "per-datapoint" else args.sa_checkpoint)
    if path.exists():
        state = study.load_trained(path, model, guide)
        log(f"[{part}] loaded {path}")
        return config, dataset, model, guide, {"checkpoint": str(path), "history": state["history"]}
    start = time.perf_counter()
    if part == "per-datapoint":
        history = study.train_per_datapoint(
            model, guide, dataset, epochs=args.train_epochs, batch_size=config.batch_size, lr=config.lr,
            local_lr=args.local_lr, local_steps=args.local_steps, seed=args.seed, log=log,
        )
    else:
        history = study.train_semi_amortized(
            model, guide, dataset, epochs=args.train_epochs, batch_size=config.batch_size, lr=config.lr,
            seed=args.seed, log=log,
        )
    history["train_seconds"] = time.perf_counter() - start
    study.save_trained(path, model, guide, history, config.to_dict())
    return config, dataset, model, guide, {"checkpoint": str(path), "trained_here": True, "history": history}


def run_part(args: argparse.Namespace, part: str) -> None:
    from pyrovae.guides import AmortizedGuide

    out = Path(args.out)
    settings = settings_of(args)
    start = time.perf_counter()
    config_a, dataset, model, guide, state = restore(args.checkpoint, args.data_dir)
    source = {"checkpoint": args.checkpoint, "epoch": state["epoch"],
              "history": {"train_elbo": state["history"]["train_bound"], "seconds": state["history"]["seconds"]}}
    if part != "amortized":
        config, dataset, model, guide, source = build_decoder(args, part, config_a)
    else:
        config = config_a
    x_test = evaluation_data(dataset, "test", config_a.seed)[: args.num_test]
    encoder_guide = None
    if getattr(guide, "encoder", None) is not None:
        encoder_guide = AmortizedGuide(guide.encoder, beta=config.beta)
    pyro.set_rng_seed(args.seed)
    summary, per_point = study.study_model(
        part, model, x_test, config.z_dim, settings, encoder_guide=encoder_guide,
        eval_samples=args.eval_samples, diag_samples=args.diag_samples, khat_samples=args.khat_samples,
        eval_batch=args.eval_batch, curve_points=min(args.curve_points, x_test.shape[0]) if part == "amortized" else 0,
        curve_steps=args.curve_steps, curve_check_every=args.curve_check_every, progress=bool(args.progress), log=log,
    )
    if args.train_points > 0:
        x_train = evaluation_data(dataset, "train", config_a.seed)[: args.train_points]
        if encoder_guide is not None:
            start_guide = encoder_guide
        else:
            rows = slice(0, x_train.shape[0])
            start_guide = study.fixed_gaussian_guide(
                pyro.param(f"{guide.prefix}.z_loc").detach()[rows],
                pyro.param(f"{guide.prefix}.z_scale").detach()[rows], f"{part}.train.rows",
            )
        summary["train_points"] = study.train_subset_study(
            part, model, x_train, config.z_dim, settings, start_guide, diag_samples=args.diag_samples,
            eval_batch=args.eval_batch, log=log,
        )
    summary["label"] = LABELS[part]
    summary["decoder"] = {"z_dim": config.z_dim, "hidden_sizes": list(config.hidden_sizes), **source}
    if part == "amortized" and args.idata_points > 0:
        guides = {"encoder": encoder_guide}
        guides["semi-amortized"] = study.fixed_gaussian_guide(
            pyro.param(f"{part}.sa.z_loc").detach(), pyro.param(f"{part}.sa.z_scale").detach(), f"{part}.sa"
        )
        guides["optimised"] = study.fixed_gaussian_guide(
            pyro.param(f"{part}.qstar.z_loc").detach(), pyro.param(f"{part}.qstar.z_scale").detach(), f"{part}.qstar"
        )
        points = study.select_points(per_point, args.idata_points, seed=args.seed)
        idata = study.inference_data(
            model, guides, x_test, points, num_draws=args.idata_draws, resample_samples=args.eval_samples,
            per_point=per_point, seed=args.seed,
        )
        idata.to_netcdf(str(out / "inference_data.nc"))
        summary["inference_data_points"] = points
    summary["seconds"] = time.perf_counter() - start
    summary["torch_threads"] = torch.get_num_threads()
    summary["args"] = vars(args)
    write_json(out / f"part_{part}.json", summary)
    write_run_record(out, args, part=part)
    torch.save({k: v.float() for k, v in per_point.items()}, out / f"part_{part}.pt")
    log(f"[{part}] done in {summary['seconds']:.0f} s")


def derived(part: dict, per_point: dict[str, torch.Tensor]) -> dict:
    """What the page computes from a part: the share of the amortization gap q_SA closes, how far
    each convergence curve is below its last value, the stopping rule's shortfall, and the values of
    the points kept for the ArviZ figures."""
    elbo = part["elbo"]
    out: dict = {}
    if "semi-amortized" in elbo and "encoder" in elbo:
        closed = elbo["semi-amortized"] - elbo["encoder"]
        out["closed_by_semi_amortized"] = closed
        out["closed_by_semi_amortized_fraction"] = closed / (elbo["optimised"] - elbo["encoder"])
        out["semi_amortized_below_optimised"] = elbo["optimised"] - elbo["semi-amortized"]
    if "encoder" in elbo:
        out["encoder_below_optimised"] = elbo["optimised"] - elbo["encoder"]
    curves = part.get("curves")
    if curves:
        out["curves_below_last"] = {
            start: {str(step): curve["elbo"][-1] - value for step, value in zip(curve["step"], curve["elbo"])
                    if step in (10, 20, 50, 100, 200, 500, 1000)}
            for start, curve in curves.items() if isinstance(curve, dict) and "elbo" in curve}
        if "from_encoder" in curves:
            out["stopping_rule_shortfall"] = curves["from_encoder"]["elbo"][-1] - curves["reference"]["optimised"]
        if "from_encoder" in curves and "from_prior" in curves:
            out["from_prior_below_from_encoder_at_last_step"] = (curves["from_encoder"]["elbo"][-1]
                                                                 - curves["from_prior"]["elbo"][-1])
    points = part.get("inference_data_points") or []
    out["inference_data_points"] = {
        str(i): {key: float(value[i]) for key, value in per_point.items() if value.ndim == 1} for i in points}
    return out


def report(args: argparse.Namespace) -> dict:
    """Merge the parts present under --out into results.json and draw the figures."""
    out = Path(args.out)
    parts = {p: json.loads((out / f"part_{p}.json").read_text()) for p in PARTS if (out / f"part_{p}.json").exists()}
    per_point = {p: torch.load(out / f"part_{p}.pt") for p in parts}
    if not parts:
        raise FileNotFoundError(f"no part_<name>.json under {out}: run some --parts first")
    results = {"parts": parts, "reference_cremer_2018": CREMER_2018,
               "derived": {p: derived(parts[p], per_point[p]) for p in parts}}
    write_json(out / "results.json", results)
    if args.report_only:
        write_run_record(out, args, part="report")
    labels = {p: LABELS[p].replace(" trained with ", "\ntrained with ") for p in parts}
    study.plot_gaps({labels[p]: parts[p] for p in parts}, out / "gaps.png", reference=CREMER_2018)
    study.plot_khat({LABELS[p]: per_point[p] for p in parts}, out / "khat.png")
    if "amortized" in parts and "curves" in parts["amortized"]:
        n = parts["amortized"]["curves"]["num_points"]
        study.plot_convergence(parts["amortized"]["curves"], out / "convergence.png",
                               title=f"decoder (A), first {n} test points")
    nc = out / "inference_data.nc"
    if nc.exists():
        from pyrovae.infer.diagnostics import _arviz

        az = _arviz()
        idata = az.from_netcdf(str(nc))
        study.plot_marginals(idata, out / "marginals.png")
        table = az.summary(idata, kind="stats")
        table.to_csv(out / "az_summary.csv", float_format="%.4f")
        write_json(out / "az_summary.json", {row: {k: float(v) for k, v in values.items()}
                                             for row, values in table.to_dict(orient="index").items()})
    return results


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for part in [] if args.report_only else args.parts:
        run_part(args, part)
    return report(args)


if __name__ == "__main__":
    main(parse_args())
