"""Command-line front end: ``pyrovae train | evaluate | sample`` (also ``python -m pyrovae``).

Only flags live here; the work is done by :mod:`pyrovae.app.run`. The flags of ``train`` are
generated from the fields of :class:`~pyrovae.app.config.TrainConfig`'s groups (name ``z_dim`` ->
``--z-dim``, type, ``Literal`` or registry -> choices, docstring -> help, ``bool`` ->
``--flag/--no-flag``), so a new config field is a new flag. This is also the one module that speaks
of flags: library errors name Python parameters (:class:`~pyrovae.app.config.ConfigError`) and
:func:`flag_message` says them as flags.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, Optional

from pyrovae.app.config import (
    GROUPS,
    ConfigError,
    TrackingConfig,
    TrainConfig,
    base_type,
    field_choices,
    field_types,
    option_fields,
)

DATA_HELP = "folder that holds MNIST/raw (torchvision layout); default: $PYROVAE_DATA, else ~/.cache/pyrovae/data"

#: Flags of parameters that are not config fields (the run's and the other commands').
RUN_FLAGS = {
    "out": "--out",
    "resume": "--resume",
    "overwrite": "--overwrite",
    "checkpoint": "--checkpoint",
    "num": "--num",
    "data_dir": "--data-dir",
    "download": "--download",
    "progress": "--progress",
}


# --------------------------------------------------------------------------------------------
# flags from the config


def flag_name(f: dataclasses.Field) -> str:
    """``--z-dim`` for the field ``z_dim`` (or the field's ``flag`` metadata)."""
    return "--" + (f.metadata.get("flag") or f.name).replace("_", "-")


def _field_help(group: type) -> dict[str, str]:
    """``{name: text}`` of the ``:param name: text`` lines of a group's docstring."""
    doc = group.__doc__ or ""
    found = re.findall(r":param (\w+):(.*?)(?=\n\s*:param |\Z)", doc, flags=re.S)
    return {name: " ".join(text.split()) for name, text in found}


#: Flag groups generated like the config's that are not part of :class:`TrainConfig` (run options).
RUN_GROUPS: dict[str, type] = {"tracking": TrackingConfig}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    for group_name, group in {**GROUPS, **RUN_GROUPS}.items():
        _add_group_flags(parser, group_name, group)


def _add_group_flags(parser: argparse.ArgumentParser, group_name: str, group: type) -> None:
    title = (group.__doc__ or group_name).strip().splitlines()[0].rstrip(".")
    section = parser.add_argument_group(f"{group_name} ({group.__name__})", title)
    helps = _field_help(group)
    for f in dataclasses.fields(group):
        kind = base_type(field_types(group)[f.name])
        text = re.sub(r":\w+:`~?([^`]*)`", r"\1", helps.get(f.name, ""))
        text = re.sub(r"``([^`]*)``", r"\1", text)
        if f.metadata.get("choices") is not None:  # a registry's names, each with its line
            text = (
                re.sub(r", one of [^)]*\)", "", text)
                + " Choices: "
                + "; ".join(f"{name}: {line}" for name, line in f.metadata["choices"]().items())
            )
        text = text.replace("%", "%%")
        if f.default is not None and f.default != ():
            text += f" [default: {f.default}]"
        common: dict[str, Any] = dict(dest=f.name, default=f.default, help=text)
        if kind is bool:
            section.add_argument(flag_name(f), action=argparse.BooleanOptionalAction, **common)
        elif kind is tuple:
            # nargs="*": no values is the empty tuple (e.g. --hidden-sizes alone: linear networks)
            section.add_argument(flag_name(f), type=int, nargs="*", metavar="N", **common)
        else:
            choices = field_choices(group, f) or None
            section.add_argument(flag_name(f), type=kind, choices=choices, **common)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` that parsed ``train`` flags describe."""
    return TrainConfig(**{f.name: getattr(args, f.name) for _, f in option_fields()})


def tracking_from_args(args: argparse.Namespace) -> TrackingConfig:
    """The :class:`TrackingConfig` that parsed ``train`` flags describe."""
    return TrackingConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrackingConfig)})


def config_to_argv(config: TrainConfig) -> list[str]:
    """The ``train`` flags that give ``config`` (options at their default are left out)."""
    argv: list[str] = []
    for _, f in option_fields():
        value = getattr(config, f.name)
        if value == f.default:
            continue
        flag = flag_name(f)
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            argv += [flag, *map(str, value)]
        elif value is None:
            raise ValueError(f"{f.name}=None cannot be given as a flag (its default is {f.default!r})")
        else:
            argv += [flag, str(value)]
    if config.extra:
        raise ValueError(f"extra={config.extra!r} has no flag")
    return argv


# --------------------------------------------------------------------------------------------
# library errors in the words of the command line


def _flags_of_parameters() -> dict[str, tuple[str, bool]]:
    """parameter name -> (flag, is a switch)."""
    fields = [*option_fields(), *((g, f) for g in RUN_GROUPS.values() for f in dataclasses.fields(g))]
    flags = {f.name: (flag_name(f), base_type(field_types(g)[f.name]) is bool) for g, f in fields}
    switches = {"resume", "overwrite", "download", "progress"}
    flags.update({name: (flag, name in switches) for name, flag in RUN_FLAGS.items()})
    return flags


def _say_value(flag: str, switch: bool, text: str) -> str:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return f"{flag} {text}"
    if switch and isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    if value is None:
        return f"{flag} unset"
    if isinstance(value, (tuple, list)):
        return f"{flag} {' '.join(map(str, value))}"
    if isinstance(value, str):
        return f"{flag} {value}"
    return f"{flag} {text}"


def flag_message(error: BaseException) -> str:
    """``error``'s message with its Python parameters as flags: ``batch_size=0`` -> ``--batch-size 0``,
    ```out``` -> ``--out``; a :class:`ConfigError` whose message names none of its parameters that
    way gets their flags in front (``--num-particles: num_particles must be ...``)."""
    message = str(error)
    if not isinstance(error, ConfigError):
        return message
    flags = _flags_of_parameters()
    names = "|".join(sorted(map(re.escape, flags), key=len, reverse=True))
    value = r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|\([^)]*\)|\[[^\]]*\]|-?[\w.+-]*\w"
    message = re.sub(rf"(?<![\w.-])({names})=({value})", lambda m: _say_value(*flags[m.group(1)], m.group(2)), message)
    message = re.sub(rf"`({names})`", lambda m: flags[m.group(1)][0], message)
    missing = [flags[p][0] for p in error.params if p in flags and flags[p][0] not in message]
    if error.params and len(missing) == len([p for p in error.params if p in flags]) and missing:
        message = f"{missing[0]}: {message}"
    return message


# --------------------------------------------------------------------------------------------
# the parser


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

    train = sub.add_parser("train", help="train a model/guide pair, evaluate it, write results to --out")
    train.add_argument("--out", type=str, required=True, help="output folder")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from --out/checkpoint.pt (also after Ctrl-C: the result is the same as an uninterrupted run)",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results of an earlier run in --out (without it, train refuses a folder that is not empty)",
    )
    _add_data_flags(train)
    _add_config_flags(train)

    evaluate = sub.add_parser("evaluate", help="test-set metrics of a checkpoint")
    evaluate.add_argument("--checkpoint", type=str, required=True, help="checkpoint.pt written by train")
    evaluate.add_argument("--eval-samples", type=int, default=None, help="K of the log-likelihood estimate")
    evaluate.add_argument("--device", type=str, default=None, help="cpu or cuda[:N] (default: as trained)")
    evaluate.add_argument("--out", type=str, default=None, help="also write the metrics to this JSON file")
    _add_data_flags(evaluate)

    sample = sub.add_parser("sample", help="draw samples from a checkpoint's model")
    sample.add_argument("--checkpoint", type=str, required=True, help="checkpoint.pt written by train")
    sample.add_argument("--num", type=int, default=100, help="number of samples")
    sample.add_argument("--out", type=str, required=True, help="image file to write: .png, .jpg or .jpeg")
    sample.add_argument("--seed", type=int, default=0, help="random seed")
    sample.add_argument("--device", type=str, default=None, help="cpu or cuda[:N]")
    return parser


def _print_metrics(metrics: dict) -> None:
    """The headline numbers, each estimate with its Monte Carlo standard error, and what the
    evaluation ran (K, points, seconds: K trades the evaluation's time, linear in K, for precision)."""
    keys = (
        "test_elbo",
        "test_log_likelihood",
        "test_log_likelihood_exact",
        "test_nll",
        "kl",
        "active_units",
        "eval_samples",
        "seconds",
        "eval_seconds",
    )
    for key in keys:
        if key in metrics:
            value = metrics[key]
            text = f"{value:.3f}" if isinstance(value, float) else f"{value}"
            se = metrics.get(f"{key}_se")
            if isinstance(se, float):
                text += f" ± {se:.2g} (Monte Carlo SE)"
            print(f"{key:>26}: {text}")
    if "eval_samples" in metrics and "num_test" in metrics and "test_log_likelihood" in metrics:
        seconds = metrics.get("eval_seconds")
        took = f" in {seconds:.0f} s" if isinstance(seconds, float) else ""
        print(
            f"evaluated {metrics['num_test']} test points with K = {metrics['eval_samples']} importance samples "
            f"each{took}; --eval-samples sets K (time grows linearly with K, the standard error like 1/√K)"
        )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from pyrovae.app import run
    from pyrovae.data import DataNotFoundError
    from pyrovae.runtime import distributed  # deferred: `pyrovae --help` stays fast
    from pyrovae.runtime.interrupt import TrainingInterrupted
    from pyrovae.runtime.perf import tune_malloc

    tune_malloc()  # a process-wide setting, so the command line makes it, not the library

    try:
        if args.command != "train" and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            raise ValueError(f"`pyrovae {args.command}` runs in one process; run it without torchrun")
        if args.command == "train":
            config = config_from_args(args)
            metrics = run.train_and_evaluate(
                config,
                args.out,
                data_dir=args.data_dir,
                download=args.download,
                resume=args.resume,
                overwrite=args.overwrite,
                progress=not args.no_progress,
                tracking=tracking_from_args(args),
            )
            if metrics is not None:  # rank 0 (or the only process)
                _print_metrics(metrics)
                written = [name for name in run.RESULT_FILES if os.path.isfile(os.path.join(args.out, name))]
                print(f"wrote {args.out}/{', '.join(written)}")
        elif args.command == "evaluate":
            metrics = run.evaluate_checkpoint(
                args.checkpoint,
                eval_samples=args.eval_samples,
                data_dir=args.data_dir,
                download=args.download,
                device=args.device,
                progress=not args.no_progress,
                out=args.out,
            )
            _print_metrics(metrics)
            if not args.out:
                print(json.dumps({k: v for k, v in metrics.items() if k != "config"}, indent=2))
        elif args.command == "sample":
            run.sample_checkpoint(args.checkpoint, args.num, args.out, device=args.device, seed=args.seed)
            print(f"wrote {args.out}")
    except (DataNotFoundError, FileNotFoundError, ValueError, FloatingPointError, OSError) as error:
        parser.exit(2, f"pyrovae {args.command}: error: {flag_message(error)}\n")
    except TrainingInterrupted as stop:
        # Every process of a data-parallel run stops; the one that saved says so.
        quiet = not distributed.current_world().is_main
        parser.exit(stop.exit_code, None if quiet else f"pyrovae {args.command}: {stop}\n")
    except KeyboardInterrupt:
        where = (
            f"; {args.out}/checkpoint.pt holds the last completed epoch, continue with --resume"
            if args.command == "train"
            else ""
        )
        parser.exit(130, f"pyrovae {args.command}: interrupted{where}\n")
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
