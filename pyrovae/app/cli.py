"""Command-line front end: ``pyrovae train | evaluate | sample`` (also ``python -m pyrovae``).

Only flags live here; the work is done by :mod:`pyrovae.app.run`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional, Sequence, get_args

from pyrovae.app.config import (
    ActivationName,
    BinarizeName,
    DatasetName,
    GuideName,
    LikelihoodName,
    ModelName,
    NetworkName,
    ObjectiveName,
    TrainConfig,
    WeightInit,
)
from pyrovae.data import DataNotFoundError

DATA_HELP = (
    "folder that holds MNIST/raw (torchvision layout); default: $PYROVAE_DATA, "
    "else ~/.cache/pyrovae/data"
)


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=str, default=None, help=DATA_HELP)
    parser.add_argument("--download", action="store_true", help="download MNIST if it is missing")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyrovae",
        description="Variational autoencoders on Pyro: train, evaluate, sample.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    d = TrainConfig()

    train = sub.add_parser("train", help="train a model/guide pair, evaluate it, write results to --out")
    train.add_argument("--dataset", choices=get_args(DatasetName), default=d.dataset, help="data set")
    train.add_argument("--model", choices=get_args(ModelName), default=None,
                       help="vae (MLP decoder), hvae (several stochastic layers), vqvae / vqvae2 (discrete codes, one or two levels) or linear "
                            "(linear-Gaussian); "
                            "default by data set")
    train.add_argument("--guide", choices=get_args(GuideName), default=d.guide, help="variational family q(z|x)")
    train.add_argument("--objective", choices=get_args(ObjectiveName), default=d.objective, help="training objective")
    train.add_argument("--num-particles", type=int, default=d.num_particles, help="K samples per data point")
    train.add_argument("--no-reparameterize", action="store_true",
                       help="sample the guide without pathwise gradients (score-function gradients only)")
    train.add_argument("--z-dim", type=int, default=None, help="latent dimension (default: 50 mnist, 2 gmm/linear)")
    train.add_argument("--hidden-sizes", type=int, nargs="+", default=None, help="hidden layer widths, e.g. 400 or 200 200")
    train.add_argument("--upper-z-dims", type=int, nargs="+", default=None,
                       help="hvae: sizes of the latent layers above --z-dim, e.g. 50 (default z-dim/2)")
    train.add_argument("--upper-hidden-sizes", type=int, nargs="+", default=None,
                       help="hvae: hidden widths between latent layers, e.g. 100 100 (default half of --hidden-sizes)")
    train.add_argument("--num-codes", type=int, default=d.num_codes, help="vqvae: codebook size K (--z-dim is D)")
    train.add_argument("--num-codes-top", type=int, default=None, help="vqvae2: the top level's codebook size (default --num-codes)")
    train.add_argument("--commitment", type=float, default=d.commitment, help="vqvae: β of the commitment loss")
    train.add_argument("--codebook-ema", type=float, default=d.codebook_ema, metavar="GAMMA",
                       help="vqvae/vqvae2: update the codebook by moving averages with decay GAMMA (e.g. 0.99) "
                            "instead of the codebook loss")
    train.add_argument("--network", choices=get_args(NetworkName), default=d.network,
                       help="mlp, or conv (convolutional encoder/decoder for image data; dense width = first --hidden-sizes)")
    train.add_argument("--weight-init", choices=get_args(WeightInit), default=d.weight_init,
                       help="torch (torch's default) or glorot (Glorot-uniform weights, zero biases; Burda et al.)")
    train.add_argument("--data-bias", action=argparse.BooleanOptionalAction, default=d.data_bias,
                       help="start the decoder at the mean training image (output bias = logit of the mean); "
                            "vae/hvae with MLP networks")
    train.add_argument("--activation", choices=get_args(ActivationName), default=d.activation, help="hidden activation")
    train.add_argument("--likelihood", choices=get_args(LikelihoodName), default=None, help="p(x|z) family (default by data set)")
    train.add_argument("--x-scale", type=float, default=d.x_scale, help="σ of the Gaussian likelihood (initial value if learned)")
    train.add_argument("--learn-x-scale", action=argparse.BooleanOptionalAction, default=None,
                       help="learn σ of the Gaussian likelihood (default: on for gmm/linear)")
    train.add_argument("--x-scale-shape", choices=("shared", "pixel"), default=d.x_scale_shape,
                       help="one learned σ of the Gaussian likelihood, or one per pixel (with --learn-x-scale)")
    train.add_argument("--beta", type=float, default=d.beta, help="KL weight (β-VAE); 1 = plain VAE")
    train.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training set")
    train.add_argument("--batch-size", type=int, default=d.batch_size, help="minibatch size")
    train.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    train.add_argument("--lr-decay", type=float, default=d.lr_decay, help="learning-rate factor per epoch")
    train.add_argument("--clip-norm", type=float, default=None,
                       help="clip the gradient's global L2 norm to this value (default: no clipping)")
    train.add_argument("--seed", type=int, default=d.seed, help="random seed")
    train.add_argument("--device", type=str, default=d.device, help="cpu or cuda[:N]")
    train.add_argument("--binarize", choices=get_args(BinarizeName), default=None, help="MNIST binarization (default dynamic)")
    train.add_argument("--num-train", type=int, default=None, help="use only the first N training points")
    train.add_argument("--num-test", type=int, default=None, help="use only the first N test points")
    train.add_argument("--eval-samples", type=int, default=d.eval_samples, help="K of the test log-likelihood estimate")
    train.add_argument("--eval-chunk", type=int, default=d.eval_chunk, help="importance samples per vectorized pass")
    train.add_argument("--test-time-steps", type=int, default=d.test_time_steps,
                       help="Adam steps fitting a per-datapoint guide to the test set")
    train.add_argument("--local-steps", type=int, default=d.local_steps,
                       help="--guide per-datapoint: Adam steps of each batch's rows before every decoder step "
                            "(10 trains MNIST well; 0, one joint step, leaves q near the prior)")
    train.add_argument("--local-lr", type=float, default=d.local_lr, help="step size of the --local-steps")
    train.add_argument("--out", type=str, required=True, help="output folder")
    train.add_argument("--resume", action="store_true",
                       help="continue from --out/checkpoint.pt (also after Ctrl-C: the result is the same as "
                            "an uninterrupted run)")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the results of an earlier run in --out (without it, train refuses a "
                            "folder that is not empty)")
    _add_data_flags(train)

    evaluate = sub.add_parser("evaluate", help="test-set metrics of a checkpoint")
    evaluate.add_argument("--checkpoint", type=str, required=True, help="checkpoint.pt written by train")
    evaluate.add_argument("--eval-samples", type=int, default=None, help="K of the log-likelihood estimate")
    evaluate.add_argument("--device", type=str, default=None, help="cpu or cuda[:N] (default: as trained)")
    evaluate.add_argument("--out", type=str, default=None, help="also write the metrics to this JSON file")
    _add_data_flags(evaluate)

    sample = sub.add_parser("sample", help="draw samples from a checkpoint's model")
    sample.add_argument("--checkpoint", type=str, required=True, help="checkpoint.pt written by train")
    sample.add_argument("--num", type=int, default=100, help="number of samples")
    sample.add_argument("--out", type=str, required=True, help="PNG file to write")
    sample.add_argument("--seed", type=int, default=0, help="random seed")
    sample.add_argument("--device", type=str, default=None, help="cpu or cuda[:N]")
    return parser


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        dataset=args.dataset,
        model=args.model,
        guide=args.guide,
        objective=args.objective,
        num_particles=args.num_particles,
        reparameterized=not args.no_reparameterize,
        z_dim=args.z_dim,
        hidden_sizes=tuple(args.hidden_sizes) if args.hidden_sizes else None,
        upper_z_dims=tuple(args.upper_z_dims) if args.upper_z_dims else (),
        upper_hidden_sizes=tuple(args.upper_hidden_sizes) if args.upper_hidden_sizes else None,
        activation=args.activation,
        network=args.network,
        weight_init=args.weight_init,
        data_bias=args.data_bias,
        num_codes=args.num_codes,
        num_codes_top=args.num_codes_top,
        commitment=args.commitment,
        codebook_ema=args.codebook_ema,
        likelihood=args.likelihood,
        x_scale=args.x_scale,
        learn_x_scale=args.learn_x_scale,
        x_scale_shape=args.x_scale_shape,
        beta=args.beta,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_decay=args.lr_decay,
        seed=args.seed,
        device=args.device,
        binarize=args.binarize,
        num_train=args.num_train,
        num_test=args.num_test,
        eval_samples=args.eval_samples,
        eval_chunk=args.eval_chunk,
        test_time_steps=args.test_time_steps,
        clip_norm=args.clip_norm,
        local_steps=args.local_steps,
        local_lr=args.local_lr,
    )


def _print_metrics(metrics: dict) -> None:
    keys = ("test_elbo", "test_log_likelihood", "test_log_likelihood_exact", "test_nll", "kl",
            "active_units", "eval_samples", "seconds")
    for key in keys:
        if key in metrics:
            value = metrics[key]
            print(f"{key:>26}: {value:.3f}" if isinstance(value, float) else f"{key:>26}: {value}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from pyrovae.app import run
    from pyrovae.runtime import distributed  # deferred: `pyrovae --help` stays fast
    from pyrovae.runtime.interrupt import TrainingInterrupted
    from pyrovae.runtime.perf import tune_malloc

    tune_malloc()  # a process-wide setting, so the command line makes it, not the library

    try:
        if args.command != "train" and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            raise ValueError(f"`pyrovae {args.command}` runs in one process; run it without torchrun")
        if args.command == "train":
            config = _config_from_args(args)
            metrics = run.train_and_evaluate(
                config, args.out, data_dir=args.data_dir, download=args.download,
                resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
            )
            if metrics is not None:  # rank 0 (or the only process)
                _print_metrics(metrics)
                print(f"wrote {args.out}/metrics.json, checkpoint.pt, samples.png, reconstructions.png, curves.png")
        elif args.command == "evaluate":
            metrics = run.evaluate_checkpoint(
                args.checkpoint, eval_samples=args.eval_samples, data_dir=args.data_dir,
                download=args.download, device=args.device, progress=not args.no_progress,
            )
            _print_metrics(metrics)
            if args.out:
                run.write_json(args.out, metrics)
            else:
                print(json.dumps({k: v for k, v in metrics.items() if k != "config"}, indent=2))
        elif args.command == "sample":
            run.sample_checkpoint(args.checkpoint, args.num, args.out, device=args.device, seed=args.seed)
            print(f"wrote {args.out}")
    except (DataNotFoundError, FileNotFoundError, ValueError, FloatingPointError) as error:
        parser.exit(2, f"pyrovae {args.command}: error: {error}\n")
    except TrainingInterrupted as stop:
        # Every process of a data-parallel run stops; the one that saved says so.
        quiet = not distributed.current_world().is_main
        parser.exit(stop.exit_code, None if quiet else f"pyrovae {args.command}: {stop}\n")
    except KeyboardInterrupt:
        where = (
            f"; {args.out}/checkpoint.pt holds the last completed epoch, continue with --resume"
            if args.command == "train" else ""
        )
        parser.exit(130, f"pyrovae {args.command}: interrupted{where}\n")
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
