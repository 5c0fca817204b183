"""Data-parallel training: 2 processes on gloo (torchrun) against 1 process with the same global
batch. The worker is tests/_ddp_worker.py; one torchrun launch serves every test here."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import _ddp_worker as worker
import pytest
import torch

from pyrovae.runtime.checkpoint import load_checkpoint
from pyrovae.runtime.distributed import World, rank_seed, shard

TESTS = pathlib.Path(__file__).parent


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("ddp")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(TESTS / "_ddp_worker.py"), str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return out


def _load(path: pathlib.Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def _reports(ddp: pathlib.Path) -> list[dict]:
    return [json.loads((ddp / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.parametrize("kind", ["per-datapoint", "amortized"])
def test_two_processes_reach_the_parameters_of_one(ddp, kind):
    two = _load(ddp / f"deterministic-{kind}_rank0.pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = worker.train_deterministic(kind)
        initial = worker.parameters(*worker.build_pair(kind))
    finally:
        torch.set_num_threads(threads)
    assert set(two) == set(one)
    worst = max((two[name] - one[name]).abs().max().item() for name in one)
    moved = min((one[name] - initial[name]).abs().max().item() for name in initial if name in one)
    print(f"{kind}: max |2 processes - 1 process| = {worst:.2e}; smallest change from init {moved:.2e}")
    assert moved > 1e-2  # training really moved every parameter ...
    # ... and 2 processes moved it where 1 process did, up to float64 rounding of the different
    # summation order: measured at most 1.4e-16, i.e. within one unit in the last place of values
    # of order 1. Allowed: 4 units in the last place (eps = 2.2e-16) of each value, at least of 1.
    eps = torch.finfo(torch.float64).eps
    for name in one:
        assert two[name].dtype == torch.float64, name
        bound = 4 * eps * one[name].abs().clamp(min=1.0)
        assert ((two[name] - one[name]).abs() <= bound).all(), (name, worst)
    assert worst <= 1e-15


@pytest.mark.parametrize("part", ["deterministic-per-datapoint", "deterministic-amortized", "stochastic-full"])
def test_every_rank_holds_the_same_parameters(ddp, part):
    rank0, rank1 = _load(ddp / f"{part}_rank0.pt"), _load(ddp / f"{part}_rank1.pt")
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), name


def test_only_rank_zero_writes_checkpoints(ddp):
    rank0, rank1 = _reports(ddp)
    assert rank1["saves"] == []
    counts = {pathlib.Path(p).name: rank0["saves"].count(p) for p in set(rank0["saves"])}
    # 3 epochs each; the interrupted run saves at epoch 1, at the interruption, then epochs 2 and 3.
    assert counts == {"deterministic-per-datapoint.ckpt": 3, "deterministic-amortized.ckpt": 3,
                      "stochastic-full.ckpt": 3, "stochastic-split.ckpt": 4, "checkpoint.pt": 2}
    state = load_checkpoint(ddp / "stochastic-full.ckpt")
    assert state["world_size"] == 2 and len(state["rank_states"]) == 2
    assert not torch.equal(state["rank_states"][0]["rng"]["torch"], state["rank_states"][1]["rng"]["torch"])


def test_sigint_on_one_rank_stops_both_and_resume_is_exact(ddp):
    rank0, rank1 = _reports(ddp)
    # Only rank 1 got the signal (in epoch 2, step 2); both stopped at the same step boundary.
    assert rank0["interrupted"] == rank1["interrupted"] == {"epoch": 2, "step": 3, "signum": 2}
    for rank in (0, 1):
        full = _load(ddp / f"stochastic-full_rank{rank}.pt")
        resumed = _load(ddp / f"stochastic-resumed_rank{rank}.pt")
        for name, value in full.items():
            assert torch.equal(resumed[name], value), (rank, name)


def test_pyrovae_train_under_torchrun(ddp):
    rank0, rank1 = _reports(ddp)
    assert rank0["cli_exit"] == rank1["cli_exit"] == 0
    metrics = json.loads((ddp / "cli" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(metrics["train_elbo"]) == 2
    assert load_checkpoint(ddp / "cli" / "checkpoint.pt")["epoch"] == 2


def test_shard_and_rank_seed():
    batch = torch.arange(7)
    slices = [shard(batch, World(rank, 3)) for rank in range(3)]
    assert torch.equal(torch.cat(slices), batch) and [len(s) for s in slices] == [3, 2, 2]
    assert torch.equal(shard(batch, World()), batch)
    seeds = {rank_seed(seed, rank) for seed in range(4) for rank in range(4)}
    assert len(seeds) == 16 and rank_seed(5, 0) == 5
