"""Data-parallel checks, run by ``tests/test_distributed.py`` as
``torchrun --standalone --nproc_per_node 2 tests/_ddp_worker.py OUT``.

Every rank writes ``OUT/rank<r>.json`` (what it saw) and ``OUT/<part>_rank<r>.pt`` (its final
parameters); the test compares them across ranks and with one process trained in pytest by the
same functions (:func:`train_deterministic`).

1. ``deterministic-*``: a VAE decoder with a Delta guide (per-datapoint rows, or an encoder) has
   a loss without Monte Carlo noise, so 2 processes and 1 process with the same global batch must
   reach the same parameters up to summation order. 31 points in batches of 10: the last batch has
   one point, so rank 1 has none there and takes the zero-weight stand-in path.
2. ``stochastic-*``: the real PerDatapointGuide (sampled z); one run uninterrupted, one stopped by
   a real SIGINT that only rank 1 receives, then resumed: both ranks must stop at the same step and
   the resumed parameters must equal the uninterrupted ones bit for bit (per-rank RNG states).
3. ``pyrovae train`` through :func:`pyrovae.app.cli.main` under the process group: rank 0 alone
   writes the results.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import sys
from typing import Any, Optional

import pyro
import pyro.distributions as dist
import torch

import pyrovae.train.hooks
from pyrovae import VAE, Decoder, PerDatapointGuide, fit, make_objective
from pyrovae.data import Dataset
from pyrovae.handlers import data_plate
from pyrovae.runtime.interrupt import TrainingInterrupted

NUM_DATA, X_DIM, Z_DIM, BATCH = 31, 6, 2, 10


class DeltaPerDatapoint:
    """q_i(z) = δ(z - loc_i): a per-datapoint guide without sampling noise."""

    amortized = False
    local_param_names = frozenset({"delta.z_loc"})

    def __init__(self, num_data: int, z_dim: int) -> None:
        self.num_data, self.z_dim = num_data, z_dim

    def __call__(self, x, index=None, num_data=None):
        with data_plate(x, index, self.num_data):
            loc = pyro.param(
                "delta.z_loc",
                lambda: 0.3 * torch.arange(self.num_data * self.z_dim, dtype=torch.get_default_dtype())
                .reshape(self.num_data, self.z_dim).sin(),
                event_dim=1,
            )
            return pyro.sample("z", dist.Delta(loc, event_dim=1))


class DeltaEncoder:
    """z = f(x) without noise: an amortized guide whose encoder weights are global parameters."""

    amortized = True
    name = "encoder"

    def __init__(self, x_dim: int, z_dim: int) -> None:
        self.encoder = torch.nn.Linear(x_dim, z_dim)

    def __call__(self, x, index=None, num_data=None):
        pyro.module(self.name, self.encoder)
        with data_plate(x, index, num_data):
            return pyro.sample("z", dist.Delta(self.encoder(x), event_dim=1))


def make_data(seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    probs = torch.rand(NUM_DATA + 8, X_DIM, generator=generator, dtype=torch.float64)
    return Dataset(name="toy", train=probs[:NUM_DATA], test=probs[NUM_DATA:], likelihood="bernoulli", binarize="dynamic")


def build_pair(kind: str) -> tuple[Any, Any]:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = VAE(Decoder(Z_DIM, X_DIM, (8,)), Z_DIM, likelihood="bernoulli")
    if kind == "per-datapoint":
        guide = DeltaPerDatapoint(NUM_DATA, Z_DIM)
    elif kind == "amortized":
        guide = DeltaEncoder(X_DIM, Z_DIM)
    else:
        guide = PerDatapointGuide(NUM_DATA, Z_DIM)
    return model, guide


def parameters(model: Any, guide: Any) -> dict[str, torch.Tensor]:
    """Every trained value: network weights and the param store (per-datapoint rows)."""
    out = {f"decoder.{k}": v.detach().clone() for k, v in model.decoder.state_dict().items()}
    if hasattr(guide, "encoder"):
        out.update({f"encoder.{k}": v.detach().clone() for k, v in guide.encoder.state_dict().items()})
    for name in pyro.get_param_store().keys():
        out[name] = pyro.param(name).detach().clone()
    return out


def train_deterministic(kind: str, checkpoint: Optional[pathlib.Path] = None) -> dict[str, torch.Tensor]:
    """Float64, no Monte Carlo noise; the same call in 1 or 2 processes."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model, guide = build_pair(kind)
        fit(model, guide, make_data(), make_objective("elbo"), epochs=3, batch_size=BATCH, lr=0.05,
            lr_decay=0.8, clip_norm=5.0 if kind == "amortized" else None, checkpoint_path=checkpoint,
            test_bound=kind == "amortized", progress=False, handle_signals=False)
        return parameters(model, guide)
    finally:
        torch.set_default_dtype(default)


class SignallingModel:
    """The model, but its ``at``-th call sends SIGINT to this process (a real signal, mid-step)."""

    def __init__(self, model: VAE, at: Optional[int]) -> None:
        self.model, self.at, self.calls = model, at, 0
        self.decoder, self.name = model.decoder, model.name  # so fit checkpoints the decoder

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return self.model(*args, **kwargs)


def train_stochastic(checkpoint: pathlib.Path, resume: bool = False, signal_at_call: Optional[int] = None):
    model, guide = build_pair("stochastic")
    # fast_path="eager": the signal is sent from the model's Python code at a given call, and a
    # replayed step does not call the model (pyrovae.infer.replay).
    fit(SignallingModel(model, signal_at_call), guide, make_data(), make_objective("elbo"), epochs=3, batch_size=BATCH,
        lr=0.05, seed=5, checkpoint_path=checkpoint, resume=resume, test_bound=False, progress=False,
        fast_path="eager")
    return parameters(model, guide)


def main(out: pathlib.Path) -> None:
    from pyrovae.app import cli
    from pyrovae.runtime import distributed

    world, _ = distributed.init_process_group("cpu")
    rank = world.rank
    report: dict[str, Any] = {"rank": rank, "world_size": world.world_size}

    saves: list[str] = []
    save_checkpoint = pyrovae.train.hooks.save_checkpoint

    def counting_save(path: Any, state: dict[str, Any]) -> None:
        saves.append(str(path))
        save_checkpoint(path, state)

    pyrovae.train.hooks.save_checkpoint = counting_save
    for kind in ("per-datapoint", "amortized"):
        params = train_deterministic(kind, out / f"deterministic-{kind}.ckpt")
        torch.save(params, out / f"deterministic-{kind}_rank{rank}.pt")

    torch.save(train_stochastic(out / "stochastic-full.ckpt"), out / f"stochastic-full_rank{rank}.pt")
    try:
        # Call 1 guesses the plate nesting; 4 steps per epoch; so call 7 is epoch 2, step 2.
        train_stochastic(out / "stochastic-split.ckpt", signal_at_call=7 if rank == 1 else None)
        report["interrupted"] = None
    except TrainingInterrupted as stop:
        report["interrupted"] = {"epoch": stop.epoch, "step": stop.step, "signum": stop.signum}
    torch.save(train_stochastic(out / "stochastic-split.ckpt", resume=True), out / f"stochastic-resumed_rank{rank}.pt")
    report["saves"] = saves

    report["cli_exit"] = cli.main([
        "train", "--dataset", "linear", "--guide", "per-datapoint", "--num-train", "64", "--num-test", "16",
        "--epochs", "2", "--batch-size", "16", "--eval-samples", "8", "--test-time-steps", "5",
        "--out", str(out / "cli"), "--no-progress",
    ])
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
