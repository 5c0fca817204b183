"""VQ-VAE and VQ-VAE-2 on MNIST: reconstructions, code usage, priors and samples.

Trains a VQ-VAE (one 7×7 grid of codes, K = --num-codes, D = --code-dim), the same VQ-VAE with an
EMA codebook (vqvae-ema, decay --ema-decay) and a VQ-VAE-2 (a 7×7 top grid and a 14×14 bottom grid)
with Trace_ELBO. vqvae and vqvae2 have codebook and commitment losses, β = 0.25; vqvae-ema the
commitment loss alone.
Each is a `pyrovae train` run in --out/<model>, resumable. Afterwards, autoregressive priors are
fitted over the training codes by maximum likelihood: one PixelCNN for the VQ-VAE, and a top prior
plus a bottom prior conditioned on the top for VQ-VAE-2. They are saved in --out/<model>/priors.pt
and reused.

For the test set the script reports the reconstruction log-likelihood, the squared error, code
perplexity and codes used, and two bounds on log p(x): one with the uniform training prior and one
with the fitted prior. It writes reconstructions and samples from the fitted priors as
--docs/<model>_samples.png and --docs/<model>_reconstructions.png, plus --docs/results.json.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import pyro
import torch
from studies import vq
from studies.provenance import write_run_record
from studies.sweep import add_common_args, run_configs, setup

from pyrovae.app.config import TrainConfig
from pyrovae.app.plots import save_image_grid, save_reconstructions
from pyrovae.app.run import restore, write_json
from pyrovae.runtime.checkpoint import load_checkpoint, save_checkpoint
from pyrovae.train import evaluation_data

#: The runs: name -> (model, EMA codebook?).
VARIANTS: dict[str, tuple[str, bool]] = {"vqvae": ("vqvae", False), "vqvae-ema": ("vqvae", True), "vqvae2": ("vqvae2", False)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="vqvae-ema: the VQ-VAE with an EMA codebook (decay --ema-decay) instead of the codebook loss")
    parser.add_argument("--ema-decay", type=float, default=0.99, help="γ of the EMA codebook (vqvae-ema)")
    parser.add_argument("--out", default="runs/vq_models")
    parser.add_argument("--docs", default="docs/vq_models")
    parser.add_argument("--num-codes", type=int, default=64, help="K (bottom level for vqvae2)")
    parser.add_argument("--num-codes-top", type=int, default=32, help="vqvae2: top-level K")
    parser.add_argument("--code-dim", type=int, default=16, help="D")
    parser.add_argument("--prior-epochs", type=int, default=10)
    parser.add_argument("--prior-channels", type=int, default=64)
    parser.add_argument("--prior-layers", type=int, default=4)
    parser.add_argument("--num-samples", type=int, default=64, help="images drawn from each fitted prior")
    add_common_args(parser)
    return parser.parse_args(argv)


def _priors(name: str, model, guide, dataset, args, folder: Path):  # type: ignore[no-untyped-def]
    """Fit (or load) the prior(s) of one model; returns them and their test log-prior per image."""
    from pyrovae.models.code_prior import CodePrior, ConditionalCodePrior

    path = folder / "priors.pt"
    opts = dict(channels=args.prior_channels, layers=args.prior_layers)
    settings = {k: getattr(args, k) for k in ("prior_epochs", "prior_channels", "prior_layers")}
    if VARIANTS[name][0] == "vqvae":
        prior = CodePrior(model.num_codes, model.grid, **opts)
        nets = {"prior": prior}
    else:
        nets = {"top": CodePrior(model.num_codes_top, model.grid_top, name="code_prior_top", **opts),
                "bottom": ConditionalCodePrior(model.num_codes, model.grid, model.num_codes_top, model.grid_top, **opts)}
    saved = load_checkpoint(path) if path.exists() else None
    if saved is not None and saved.get("args") == settings:
        for key, p in nets.items():
            p.net.load_state_dict(saved[key])
            p.net.to(model.codebook.device if hasattr(model, "codebook") else args.device)
        return nets, saved["history"]
    if VARIANTS[name][0] == "vqvae":
        prior, history, _ = vq.fit_code_prior(model, guide, dataset, epochs=args.prior_epochs, seed=args.seed, **opts)
        nets = {"prior": prior}
        histories = {"prior": history.to_dict()}
    else:
        fitted = vq.fit_code_priors_2(model, guide, dataset, epochs=args.prior_epochs, seed=args.seed, **opts)
        nets = {"top": fitted["top"], "bottom": fitted["bottom"]}
        histories = {"top": fitted["history_top"].to_dict(), "bottom": fitted["history_bottom"].to_dict()}
    save_checkpoint(path, {"args": settings,
                           "history": histories, **{k: p.net.state_dict() for k, p in nets.items()}})
    return nets, histories


@torch.no_grad()
def _prior_bound(name: str, model, guide, nets, x: torch.Tensor) -> dict[str, float]:  # type: ignore[no-untyped-def]
    log_prior, log_lik = [], []
    for xb in x.split(1000):
        if VARIANTS[name][0] == "vqvae":
            codes = guide.codes(xb)
            log_prior.append(nets["prior"].log_prob(codes))
            out = model.decoder(model.codebook[codes])
        else:
            codes, top = guide.codes(xb)
            log_prior.append(nets["top"].log_prob(top) + nets["bottom"].log_prob(codes, nets["bottom"].condition_from(top)))
            out = model.decoder((model.networks.codebook_bottom[codes], model.networks.codebook_top[top]))
        log_lik.append(model.likelihood_dist(out).log_prob(xb))
    lp, ll = torch.cat(log_prior), torch.cat(log_lik)
    return {"log_prior_codes": lp.mean().item(), "bound_with_fitted_prior": (ll + lp).mean().item()}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    setup(args)
    configs = {
        name: TrainConfig(model=VARIANTS[name][0], z_dim=args.code_dim, num_codes=args.num_codes,
                          num_codes_top=args.num_codes_top if VARIANTS[name][0] == "vqvae2" else None,
                          codebook_ema=args.ema_decay if VARIANTS[name][1] else None, epochs=args.epochs,
                          num_train=args.num_train, num_test=args.num_test, device=args.device, seed=args.seed)
        for name in args.models
    }
    results = run_configs(configs, Path(args.out), data_dir=args.data_dir)
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, metrics in results.items():
        pyro.clear_param_store()
        config, dataset, model, guide, _ = restore(Path(args.out) / name / "checkpoint.pt", data_dir=args.data_dir)
        nets, histories = _priors(name, model, guide, dataset, args, Path(args.out) / name)
        x = evaluation_data(dataset, "test", config.seed)
        torch.manual_seed(args.seed)
        if VARIANTS[name][0] == "vqvae":
            samples = vq.sample_images(model, nets["prior"], args.num_samples)[1]
        else:
            samples = vq.sample_images_2(model, nets["top"], nets["bottom"], args.num_samples)
        nrow = int(math.sqrt(args.num_samples)) or 1
        save_image_grid(samples.cpu(), docs / f"{name}_samples.png", dataset.image_shape, nrow=nrow)
        n = min(50, x.shape[0])
        save_reconstructions(x[:n].cpu(), model.reconstruct(guide, x[:n]).cpu(), docs / f"{name}_reconstructions.png",
                             dataset.image_shape)
        row = {"model": name, **{k: metrics[k] for k in ("test_reconstruction_log_lik", "test_squared_error", "perplexity",
                                                          "codes_used", "num_codes", "kl", "test_log_likelihood",
                                                          "epochs", "train_seconds") if k in metrics},
               **{k: metrics[k] for k in ("perplexity_top", "codes_used_top", "num_codes_top") if k in metrics},
               **_prior_bound(name, model, guide, nets, x), "prior_histories": histories}
        row["bound_uniform_prior"] = row.pop("test_log_likelihood")
        row["train_seconds"] = sum(metrics["seconds_per_epoch"])  # every part of a resumed run
        rows.append(row)
        logging.info("%s: reconstruction %.2f nats, squared error %.2f, perplexity %.1f / %d, bound %.2f (uniform prior) "
                     "%.2f (fitted prior)", name, row["test_reconstruction_log_lik"], row["test_squared_error"],
                     row["perplexity"], row["num_codes"], row["bound_uniform_prior"], row["bound_with_fitted_prior"])
    summary = {"rows": rows, "config": {k: v.to_dict() for k, v in configs.items()}}
    write_json(docs / "results.json", summary)
    write_run_record(docs, args, configs=summary["config"], device=args.device)
    return summary


if __name__ == "__main__":
    main()
