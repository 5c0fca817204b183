"""Does experiment tracking cost time per step? ``pyrovae.fit`` with no logger, with
:class:`~pyrovae.train.tracking.TensorBoardLogger` and with :class:`~pyrovae.train.tracking.MLflowLogger`.

One process; in each of ``--rounds`` rounds every variant trains ``--epochs`` epochs of a VAE
(784-400-50, ELBO, batch 100) on ``--num-train`` random binary images, the variants in a rotated
order (interleaved, so a slow stretch of a shared machine hits all of them). A last hook takes the
wall-clock time between consecutive steps, the step with every hook included; steps that end an
epoch (the loggers' per-epoch work: KL, active units, image grids, writing the buffer) are
timed apart, as the per-epoch cost. Reports the median step time of each variant and its ratio to
no logger, and the mean per-epoch time of each logger. Writes ``--out/results.json`` and a run
record. Command::

    OMP_NUM_THREADS=1 python experiments/benchmark_tracking.py --out docs/benchmark_tracking
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import pyro
import torch

from pyrovae import VAE, AmortizedGuide, Decoder, GaussianEncoder, fit, make_objective
from pyrovae.data import Dataset
from pyrovae.infer.loop import Hook
from pyrovae.train.tracking import MLflowLogger, TensorBoardLogger
from studies.provenance import write_run_record


class StepClock(Hook):
    """Wall-clock seconds between consecutive step ends (inner steps) and across epoch ends."""

    def __init__(self) -> None:
        self.inner: list[float] = []
        self.epoch_ends: list[float] = []
        self._last: Optional[float] = None
        self._ended = False

    def on_epoch_end(self, trainer: Any, state: Any) -> None:
        self._ended = True

    def on_step_end(self, trainer: Any, state: Any, result: Any) -> None:
        now = time.perf_counter()
        if self._last is not None:
            (self.epoch_ends if self._ended else self.inner).append(now - self._last)
        self._last, self._ended = now, False


def _logger(variant: str, folder: Path, log_every: int) -> list[Hook]:
    if variant == "none":
        return []
    if variant == "tensorboard":
        return [TensorBoardLogger(folder / "tb", log_every=log_every)]
    return [MLflowLogger(log_dir=folder / "mlruns", log_every=log_every)]


def time_variant(variant: str, data: Dataset, folder: Path, args: argparse.Namespace) -> StepClock:
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    model = VAE(Decoder(z_dim=50, x_dim=784, hidden_sizes=[400]), z_dim=50, likelihood="bernoulli")
    guide = AmortizedGuide(GaussianEncoder(x_dim=784, z_dim=50, hidden_sizes=[400]))
    clock = StepClock()
    loggers = _logger(variant, folder, args.log_every)
    fit(model, guide, data, make_objective("elbo"), epochs=args.epochs, batch_size=100, progress=False,
        seed=args.seed, hooks=[*loggers, clock])
    for logger in loggers:
        logger.close()
    return clock


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=str, default="docs/benchmark_tracking", help="folder of results.json")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every variant")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per variant and round")
    parser.add_argument("--num-train", type=int, default=3000, help="training points (random binary images)")
    parser.add_argument("--log-every", type=int, default=10, help="the loggers' log_every")
    parser.add_argument("--variants", type=str, nargs="+", default=["none", "tensorboard", "mlflow"],
                        choices=["none", "tensorboard", "mlflow"], help="what to time")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.rand(args.num_train + 100, 784, generator=generator).lt(0.15).float()
    data = Dataset(name="random", train=images[: args.num_train], test=images[args.num_train:],
                   likelihood="bernoulli", binarize="none", image_shape=(1, 28, 28))
    inner: dict[str, list[float]] = {v: [] for v in args.variants}
    epoch_ends: dict[str, list[float]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            order = args.variants[round_ % len(args.variants):] + args.variants[: round_ % len(args.variants)]
            for variant in order:
                clock = time_variant(variant, data, Path(scratch) / f"{variant}-{round_}", args)
                inner[variant] += clock.inner
                epoch_ends[variant] += clock.epoch_ends
    step_ms = {v: 1e3 * statistics.median(times) for v, times in inner.items()}
    base = step_ms.get("none")
    results = {
        "step_ms_median": step_ms,
        "step_ratio_vs_none": {v: ms / base for v, ms in step_ms.items()} if base else {},
        "epoch_end_step_ms_mean": {v: 1e3 * statistics.mean(t) for v, t in epoch_ends.items() if t},
        "steps_timed": {v: len(t) for v, t in inner.items()},
        "torch_threads": torch.get_num_threads(),
        "args": vars(args),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    write_run_record(out, args)
    for variant in args.variants:
        ratio = results["step_ratio_vs_none"].get(variant, float("nan"))
        print(f"{variant:>12}: {step_ms[variant]:.3f} ms/step (x{ratio:.3f} of no logger), step ending an epoch "
              f"{results['epoch_end_step_ms_mean'].get(variant, float('nan')):.1f} ms")
    return results


if __name__ == "__main__":
    main()
