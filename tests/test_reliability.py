"""Reliability and security (issue 7): bad input is a clear error, faults never cost results,
checkpoints never run code, nothing is downloaded unasked.

Cases covered elsewhere and not repeated here: data shape/dtype/NaN/[0, 1] (tests/test_data.py
test_check_data_*), missing MNIST (test_data.py, test_cli.py test_missing_data_root_is_a_clear_error),
unknown names and K < 1 through the CLI (test_cli.py test_bad_flags_are_clear_errors), truncated,
garbage, foreign and malicious files given to load_checkpoint (test_checkpoint.py), resume with
another config (test_train.py test_resume_refuses_a_different_config).
That experiment sweeps (``experiments/studies/sweep.py``) skip a run another process holds is
tested in experiments/tests/test_reliability_study.py.

The fault tests run real subprocesses and send real signals: SIGKILL at random moments
(tests/_kill_worker.py), SIGINT mid-epoch, and a second SIGINT more than 2 s after the first
during a long step.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pyro
import pytest
import torch

import pyrovae
from pyrovae import (
    PerDatapointGuide,
    TrainConfig,
    build,
    fit,
    linear_gaussian,
    load_mnist,
    make_objective,
)
from pyrovae.app.cli import main
from pyrovae.app.run import RESULT_FILES, lock_output, prepare_output
from pyrovae.data import DataNotFoundError, Dataset, check_data
from pyrovae.infer.optim import make_pyro_optimizer
from pyrovae.runtime.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    _safe_constraint_classes,
    load_checkpoint,
    save_checkpoint,
)
from pyrovae.runtime.interrupt import StopSignals
from pyrovae.train.step import GradientStep

TESTS = pathlib.Path(__file__).parent
GMM = ["train", "--dataset", "gmm", "--batch-size", "500", "--eval-samples", "5", "--no-progress"]


def _cli_error(capsys, args) -> tuple[int, str]:
    """Run the CLI in this process; return its exit code and stderr."""
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return info.value.code, err


# --------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--x-scale", "0"], "x_scale must be positive, got 0.0 (--x-scale: the standard deviation σ"),
        (["--x-scale", "-1"], "x_scale must be positive"),
        (["--beta", "-0.5"], "beta must be positive, got -0.5 (--beta: the KL weight"),
        (["--beta", "0"], "beta must be positive"),
        (["--batch-size", "5000"], "batch_size=5000 is larger than the 3000 training points; use --batch-size 3000 or less"),
        (["--clip-norm", "0"], "clip_norm must be positive"),
        (["--num-train", "0"], "num_train must be an integer >= 1"),
        (["--epochs", "0"], "epochs must be an integer >= 1"),
        (["--dataset", "cifar"], "invalid choice: 'cifar'"),
        (["--model", "flow"], "invalid choice: 'flow'"),
    ],
)
def test_bad_train_flags_exit_2_with_the_fix(tmp_path, capsys, flags, message):
    code, err = _cli_error(capsys, GMM + ["--out", str(tmp_path / "o"), *flags])
    assert code == 2 and message in err, err


def test_empty_data_set_is_refused():
    with pytest.raises(ValueError, match="is empty"):
        check_data(torch.empty(0, 4), "gaussian")
    with pytest.raises(ValueError, match="empty"):
        Dataset("none", torch.empty(0, 4), torch.rand(3, 4), "gaussian")


def test_per_datapoint_guide_refuses_indices_outside_its_range():
    guide = PerDatapointGuide(10, 2)
    x = torch.randn(3, 4)
    for bad in ([0, 5, 10], [-1, 2, 3]):
        with pytest.raises(ValueError, match=r"points 0\.\.9 only"):
            guide(x, torch.tensor(bad), 10)
    guide(x, torch.tensor([0, 5, 9]), 10)  # in range: fine


def test_fit_refuses_a_guide_built_for_other_data_and_oversized_batches():
    dataset = linear_gaussian(num_train=30, num_test=5, x_dim=3, z_dim=1)
    model, _ = build(TrainConfig(dataset="linear").resolved(), dataset)
    with pytest.raises(ValueError, match=r"holds parameters for 50 points but the training set has 30"):
        fit(model, PerDatapointGuide(50, 1), dataset, make_objective("elbo"), epochs=1, batch_size=10, progress=False)
    with pytest.raises(ValueError, match="larger than the 30 training points"):
        fit(model, PerDatapointGuide(30, 1), dataset, make_objective("elbo"), epochs=1, batch_size=31, progress=False)
    with pytest.raises(ValueError, match="clip_norm"):
        fit(model, PerDatapointGuide(30, 1), dataset, make_objective("elbo"), epochs=1, batch_size=10,
            clip_norm=-1.0, progress=False)


def test_resume_refuses_other_training_data(tmp_path):
    config = TrainConfig(dataset="linear", guide="per-datapoint", batch_size=10).resolved()
    path = tmp_path / "c.pt"

    def train(seed, resume):
        dataset = linear_gaussian(num_train=30, num_test=5, x_dim=3, z_dim=2, seed=seed)
        model, guide = build(config, dataset)
        fit(model, guide, dataset, make_objective("elbo"), epochs=2, batch_size=10, checkpoint_path=path,
            resume=resume, config=config.to_dict(), progress=False)

    train(0, False)
    with pytest.raises(ValueError, match="other training data"):
        train(1, True)  # same shapes and config, other points
    with pytest.raises(ValueError, match="already trained 2 epochs"):
        dataset = linear_gaussian(num_train=30, num_test=5, x_dim=3, z_dim=2, seed=0)
        model, guide = build(config, dataset)
        fit(model, guide, dataset, make_objective("elbo"), epochs=1, batch_size=10, checkpoint_path=path,
            resume=True, config=config.to_dict(), progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> pathlib.Path:
    """A finished small gmm run, read by the checkpoint tests (not modified)."""
    out = tmp_path_factory.mktemp("trained")
    assert main(GMM + ["--epochs", "1", "--out", str(out / "run")]) == 0
    return out / "run"


def test_output_folder_is_never_silently_clobbered(tmp_path, capsys, trained):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    (out / "notes.txt").write_text("mine")
    before = (out / "metrics.json").read_bytes()

    code, err = _cli_error(capsys, GMM + ["--epochs", "1", "--out", str(out)])
    assert code == 2 and "already holds" in err and "--overwrite" in err and "--resume" in err
    assert (out / "metrics.json").read_bytes() == before

    code, err = _cli_error(capsys, GMM + ["--epochs", "1", "--out", str(out), "--resume", "--overwrite"])
    assert code == 2 and "only one of them" in err

    assert main(GMM + ["--epochs", "1", "--seed", "1", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "metrics.json").read_text())["config"]["seed"] == 1
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes only pyrovae's results

    # --resume into a non-empty folder without a checkpoint would start afresh over its files.
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match="resume=True needs a checkpoint.pt"):
        prepare_output(other, resume=True)
    with pytest.raises(ValueError, match="is a file"):
        prepare_output(other / "metrics.json")
    prepare_output(tmp_path / "new" / "nested")  # missing folders are created
    (tmp_path / "empty").mkdir()
    prepare_output(tmp_path / "empty")  # an empty folder is fine
    assert set(RESULT_FILES) >= {"metrics.json", "checkpoint.pt"}


_HOLD_LOCK = """
import sys
from pyrovae.app.run import lock_output
with lock_output(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()  # until killed
"""


@pytest.mark.skipif(sys.platform == "win32", reason="no flock on Windows")
def test_two_runs_into_one_folder_cannot_overlap(tmp_path, capsys):
    """While one process trains into a folder, a second run into it is refused (and writes
    nothing); once the first dies, even by SIGKILL, the folder is free again."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ([], ["--resume"], ["--overwrite"]):
            code, err = _cli_error(capsys, GMM + ["--epochs", "1", "--out", str(out)] + extra)
            assert code == 2 and f"another process is training into {out}" in err and "choose another --out" in err
        assert list(out.iterdir()) == []  # the lock is on the folder itself: no lock file either
    finally:
        holder.kill()
        holder.wait(timeout=60)
    assert main(GMM + ["--epochs", "1", "--out", str(out)]) == 0
    with lock_output(out):  # the finished run let go of it
        pass


# --------------------------------------------------------------------------------------------
# checkpoints: corrupt, foreign, other model, malicious — through every entry point


class _Payload:
    """Unpickling this creates the file ``path``: what a malicious checkpoint would do."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def _entry_points(checkpoint: pathlib.Path, tmp_path: pathlib.Path, resume_config: list[str]) -> dict[str, list[str]]:
    run = tmp_path / "resume"
    run.mkdir(parents=True, exist_ok=True)
    target = run / "checkpoint.pt"
    target.write_bytes(checkpoint.read_bytes())
    return {
        "evaluate": ["evaluate", "--checkpoint", str(checkpoint), "--eval-samples", "2", "--no-progress"],
        "sample": ["sample", "--checkpoint", str(checkpoint), "--num", "4", "--out", str(tmp_path / "s.png")],
        "train --resume": resume_config + ["--epochs", "2", "--out", str(run), "--resume"],
    }


def test_malicious_checkpoint_is_refused_everywhere_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": {}, "x": _Payload(str(marker))}, evil)
    with pytest.raises(ValueError, match="not a readable pyrovae checkpoint"):
        load_checkpoint(evil)
    for name, args in _entry_points(evil, tmp_path, GMM).items():
        code, err = _cli_error(capsys, args)
        assert code == 2 and "not a readable pyrovae checkpoint" in err, (name, err)
    assert not marker.exists(), "code in the checkpoint ran"
    # The payload is live: a loader that trusted pickle would have run it.
    with evil.open("rb") as file:
        torch.load(file, weights_only=False)
    assert marker.exists()


def test_broken_and_foreign_checkpoints_through_every_entry_point(tmp_path, capsys, trained):
    good = (trained / "checkpoint.pt").read_bytes()
    cases = {}
    cases["truncated"] = (good[: len(good) // 2], "truncated or corrupt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, foreign)
    cases["foreign torch file"] = (foreign.read_bytes(), "not a pyrovae checkpoint")
    other = tmp_path / "other.pt"
    save_checkpoint(other, {"step": 3})
    cases["pyrovae checkpoint of something else"] = (other.read_bytes(), "not one written by")
    cases["plain pickle"] = (pickle.dumps({"a": 1}), "not a readable pyrovae checkpoint")
    # a real checkpoint without its checksum (an older pyrovae's, or the entry removed)
    unchecked = tmp_path / "unchecked.pt"
    unchecked.write_bytes(good)
    with torch.serialization.safe_globals(list(_safe_constraint_classes())):
        payload = torch.load(unchecked, weights_only=True)
    del payload["checksum"]
    torch.save(payload, unchecked)
    cases["no checksum"] = (unchecked.read_bytes(), "upgrade_checkpoint(")
    for case, (data, message) in cases.items():
        path = tmp_path / f"{case.replace(' ', '_')}.pt"
        path.write_bytes(data)
        for name, args in _entry_points(path, tmp_path / case.replace(" ", "_"), GMM).items():
            code, err = _cli_error(capsys, args)
            assert code == 2 and message in err, (case, name, err)


def test_every_bit_flip_is_refused_or_harmless(tmp_path):
    """torch.load alone reads a flipped bit inside a tensor as another number; the checksum
    refuses it. Flip one bit at many offsets: each load either fails or returns the saved values."""
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"weights": torch.randn(300), "epoch": 3, "history": [1.5, -2.0]})
    expected = load_checkpoint(path)
    data = path.read_bytes()
    refused = 0
    for offset in range(0, len(data), 7):
        damaged = bytearray(data)
        damaged[offset] ^= 1 << (offset % 8)
        path.write_bytes(bytes(damaged))
        try:
            loaded = load_checkpoint(path)
        except ValueError as error:
            assert str(path) in str(error) and "checkpoint" in str(error)
            refused += 1
            continue
        # Unused bytes (zip padding, ids): the contents are exactly the saved ones.
        assert torch.equal(loaded["weights"], expected["weights"]), offset
        assert (loaded["epoch"], loaded["history"]) == (3, [1.5, -2.0]), offset
    assert refused > 0.5 * len(range(0, len(data), 7))


def test_checkpoint_of_another_model_or_config(tmp_path, capsys, trained):
    state = load_checkpoint(trained / "checkpoint.pt")
    # Weights that do not fit the network the saved config describes (an edited file): the param
    # store's entries are what a run reloads from.
    saved = state["params"]["params"]
    for name in [n for n in saved if n.startswith("decoder$$$")]:
        saved[name] = torch.zeros(3)
    tampered = tmp_path / "tampered.pt"
    save_checkpoint(tampered, {k: v for k, v in state.items() if k not in ("format", "version")})
    for name in ("evaluate", "sample"):
        code, err = _cli_error(capsys, _entry_points(tampered, tmp_path, GMM)[name])
        assert code == 2 and "do not fit" in err, (name, err)
    # Resuming with another model configuration.
    args = _entry_points(trained / "checkpoint.pt", tmp_path / "z", GMM + ["--z-dim", "3"])["train --resume"]
    code, err = _cli_error(capsys, args)
    assert code == 2 and "config differs" in err and "z_dim" in err


# --------------------------------------------------------------------------------------------
# no downloads unless asked


def test_nothing_is_downloaded_without_download(tmp_path, capsys, monkeypatch):
    from torchvision.datasets import MNIST

    calls = []

    def forbidden_download(self):
        calls.append("download")
        raise RuntimeError("download attempted")

    def no_network(*args, **kwargs):
        calls.append("network")
        raise OSError("network access attempted")

    monkeypatch.setattr(MNIST, "download", forbidden_download)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    empty = tmp_path / "no-data"
    with pytest.raises(DataNotFoundError):
        load_mnist(empty)
    code, err = _cli_error(capsys, ["train", "--data-dir", str(empty), "--out", str(tmp_path / "o")])
    assert code == 2 and "--download" in err
    assert calls == []
    # The patch sits where a download would happen: asking for one reaches it.
    with pytest.raises(DataNotFoundError, match="download attempted"):
        load_mnist(empty, download=True)
    assert calls == ["download"]


def test_mnist_from_disk_does_not_download(mnist_root, monkeypatch):
    from torchvision.datasets import MNIST

    monkeypatch.setattr(MNIST, "download", lambda self: pytest.fail("download called"))
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail("network used"))
    assert load_mnist(mnist_root).num_train == 60000


# --------------------------------------------------------------------------------------------
# faults: NaN, clipping, SIGKILL, SIGINT


class _PoisonedModel:
    """The model, but its ``at``-th call adds a NaN factor to the joint density. The poison is
    Python state (a call counter), so the fits below run eagerly (``fast_path="eager"``): a
    replayed step does not call the model. A NaN that comes from the tensors is caught on the
    fast path too (``tests/test_replay.py``)."""

    def __init__(self, model, at):
        self.model, self.at, self.calls = model, at, 0
        self.decoder, self.name = model.decoder, model.name

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            pyro.factor("poison", torch.tensor(float("nan")))
        return self.model(*args, **kwargs)


def test_nan_loss_names_epoch_and_step_and_keeps_the_checkpoint(tmp_path):
    dataset = linear_gaussian(num_train=40, num_test=5, x_dim=3, z_dim=1, seed=0)
    model, guide = build(TrainConfig(dataset="linear", guide="per-datapoint").resolved(), dataset)
    path = tmp_path / "checkpoint.pt"
    # Call 1 guesses the plate nesting, then one call per step, 4 steps per epoch: call 8 is epoch 2, step 3.
    with pytest.raises(FloatingPointError) as info:
        fit(_PoisonedModel(model, 8), guide, dataset, make_objective("elbo"), epochs=3, batch_size=10,
            checkpoint_path=path, test_bound=False, progress=False, fast_path="eager")
    message = str(info.value)
    assert "the loss became nan at epoch 2, step 3 of 4" in message, message
    assert "this step was not applied" in message and f"{path} (epoch 1), is intact" in message
    assert "--clip-norm" in message and "--lr" in message
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and state["position"] is None
    assert all(torch.isfinite(v).all() for v in state["params"]["params"].values())
    # The bad step wrote nothing into the parameters either.
    assert torch.isfinite(pyro.param("local.z_loc")).all() and torch.isfinite(pyro.param("local.z_scale")).all()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


class _NaNGradientModel(_PoisonedModel):
    """The model, but its ``at``-th call adds the factor sqrt(0 · Σ decoder weight): its value is 0
    (the loss stays finite) and its gradient is ∞ · 0 = NaN in every decoder weight. It records
    the param store as it was just before that step."""

    def __call__(self, *args, **kwargs):
        self.calls += 1
        out = self.model(*args, **kwargs)
        if self.calls == self.at:
            self.before = {name: value.detach().clone() for name, value in pyro.get_param_store().items()}
            weight = next(self.decoder.parameters())
            pyro.factor("poison", torch.sqrt(0.0 * weight.sum()))
        return out


def test_nan_gradient_with_a_finite_loss_stops_before_the_update(tmp_path):
    dataset = linear_gaussian(num_train=40, num_test=5, x_dim=3, z_dim=1, seed=0)
    model, guide = build(TrainConfig(dataset="linear", guide="per-datapoint").resolved(), dataset)
    path = tmp_path / "checkpoint.pt"
    poisoned = _NaNGradientModel(model, 8)  # epoch 2, step 3 of 4 (see the NaN-loss test above)
    with pytest.raises(FloatingPointError) as info:
        fit(poisoned, guide, dataset, make_objective("elbo"), epochs=3, batch_size=10,
            checkpoint_path=path, test_bound=False, progress=False, fast_path="eager")
    message = str(info.value)
    found = re.search(r"the gradient of (\S+) became non-finite \(the loss was (\S+)\)", message)
    assert found and found[1].startswith("decoder$$$") and math.isfinite(float(found[2])), message
    assert "at epoch 2, step 3 of 4" in message and "this step was not applied" in message, message
    assert f"{path} (epoch 1), is intact" in message, message
    # No parameter moved in the bad step: the store is what it was when that step began.
    after = dict(pyro.get_param_store().items())
    assert poisoned.before.keys() == after.keys()
    for name, value in poisoned.before.items():
        assert torch.equal(after[name].detach(), value), name
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and state["position"] is None
    assert all(torch.isfinite(v).all() for v in state["params"]["params"].values())
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_nan_through_the_cli(tmp_path, capsys):
    code, err = _cli_error(capsys, GMM + ["--lr", "1e30", "--epochs", "2", "--out", str(tmp_path / "o")])
    assert code == 2 and "became" in err and "at epoch 1, step" in err and "No checkpoint had been written yet" in err


def test_gradient_clipping_bounds_the_norm_and_keeps_lazy_rows():
    """Clipping bounds the global norm, and per-datapoint rows that *left* the batch, after Adam
    built up momentum for them, stay put. Plain Adam (not lazy) moves those rows by their momentum:
    the contrast that shows the test can fail."""
    dataset = linear_gaussian(num_train=50, num_test=5, x_dim=4, z_dim=2, seed=1)
    config = TrainConfig(dataset="linear", guide="per-datapoint").resolved()
    seen = []

    class Recording:
        """The optimizer, recording the global gradient norm it is given."""

        def __init__(self, optimizer):
            self.optimizer = optimizer

        def __call__(self, params):
            params = list(params)
            seen.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item())
            self.optimizer(params)

    first, second = torch.arange(10), torch.arange(10, 20)

    def train(clip_norm, lazy=True):
        """3 steps on points 0..9, then 3 on points 10..19 with the same optimizer: the rows'
        values at the start, after the first batch and at the end."""
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        model, guide = build(config, dataset)
        names = guide.local_param_names
        optimizer = make_pyro_optimizer(1e-2, lazy_params=names) if lazy else pyro.optim.Adam({"lr": 1e-2})
        step = GradientStep(model, guide, make_objective("elbo"), Recording(optimizer), local_params=names,
                            clip_norm=clip_norm)
        with torch.no_grad():
            guide(dataset.train[first], first, 50)  # creates the rows
        rows = [pyro.param("local.z_loc").detach().clone()]
        for index in (first, second):
            for _ in range(3):
                step(dataset.train[index], index, 50)
            rows.append(pyro.param("local.z_loc").detach().clone())
        return rows

    def moved(a, b):
        return (a != b).any(-1)

    train(None)
    assert min(seen) > 1.0  # the raw gradient is large: clipping to 0.5 below does something
    seen.clear()
    initial, after_first, final = train(0.5)
    assert len(seen) == 6 and max(seen) <= 0.5 * (1 + 1e-5), seen
    assert moved(initial, after_first)[:10].all() and not moved(initial, after_first)[10:].any()
    change = moved(after_first, final)
    assert change[10:20].all()
    assert not change[:10].any(), "rows that left the batch moved by Adam's momentum"
    assert not change[20:].any()

    initial_plain, after_first_plain, final_plain = train(0.5, lazy=False)
    assert torch.equal(initial_plain, initial) and not moved(initial_plain, after_first_plain)[10:].any()
    assert moved(after_first_plain, final_plain)[:10].all()  # plain Adam: the rows drift
    model, guide = build(config, dataset)
    with pytest.raises(ValueError, match="clip_norm"):
        GradientStep(model, guide, make_objective("elbo"), make_pyro_optimizer(1e-2), clip_norm=0.0)


def test_stop_signals_turn_sigint_into_a_request():
    previous = signal.getsignal(signal.SIGINT)
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert signals.requested and signals.signum == signal.SIGINT
        os.kill(os.getpid(), signal.SIGINT)  # a repeat right away is the same request
    assert signal.getsignal(signal.SIGINT) is previous
    with StopSignals(enabled=False):
        assert signal.getsignal(signal.SIGINT) is previous


def test_sigkill_at_random_moments_never_breaks_the_checkpoint(tmp_path):
    """Kill a training process with SIGKILL at random times, some while it writes its checkpoint:
    every time, the checkpoint on disk loads, and the run resumes and finishes."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(TESTS / "_kill_worker.py"), str(tmp_path / "run"), "12", "40", "0"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print("SIGKILL report:", report)
    assert report["load_errors"] == [] and report["child_failures"] == []
    assert report["kills"] >= 12 and report["mid_write"] >= 3, report
    assert report["epochs"] == sorted(report["epochs"]) and report["epochs"][-1] > report["epochs"][0]
    assert report["final_exit"] == 0 and report["final_epoch"] == report["epochs"][-1] + 2
    assert report["leftover_temporaries"] == 0
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_ctrl_c_saves_mid_epoch_and_resume_is_exact(tmp_path, capsys):
    """A real SIGINT to a real `pyrovae train`, then --resume: the same parameters as a run that
    was never interrupted."""
    args = ["train", "--dataset", "linear", "--guide", "per-datapoint", "--objective", "iwae",
            "--num-particles", "2", "--num-train", "1000", "--num-test", "20", "--batch-size", "10",
            "--epochs", "3", "--eval-samples", "5", "--test-time-steps", "2", "--no-progress"]
    split, full = tmp_path / "split", tmp_path / "full"
    process = subprocess.Popen([sys.executable, "-m", "pyrovae", *args, "--out", str(split)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 120
    while not (split / "checkpoint.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    # The checkpoint appears at the end of epoch 1; a moment later the process is inside epoch 2
    # (of 3, 100 steps each). Right away it could still be finishing epoch 1's bookkeeping.
    time.sleep(0.03)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "interrupted by SIGINT at epoch 2, step" in err and "--resume" in err
    saved = load_checkpoint(split / "checkpoint.pt")
    assert saved["epoch"] == 1 and saved["position"]["step"] > 0, "expected a mid-epoch checkpoint"
    assert not (split / "metrics.json").exists()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocess, so the arithmetic is the same
    try:
        assert main(args + ["--out", str(split), "--resume"]) == 0
        assert main(args + ["--out", str(full)]) == 0
    finally:
        torch.set_num_threads(threads)
    resumed, uninterrupted = load_checkpoint(split / "checkpoint.pt"), load_checkpoint(full / "checkpoint.pt")
    for name, value in uninterrupted["params"]["params"].items():
        assert torch.equal(resumed["params"]["params"][name], value), name
    for name, weights in uninterrupted["modules"]["decoder"].items():
        assert torch.equal(resumed["modules"]["decoder"][name], weights), name
    assert resumed["history"]["train_bound"] == uninterrupted["history"]["train_bound"]


# `pyrovae train` whose 7th gradient step (epoch 2, step 3 of 4) takes up to 60 s: it touches
# OUT/.slow when the step starts. A first SIGINT there asks to stop after that step.
_SLOW_STEP_TRAIN = """
import pathlib, sys, time
import torch
torch.set_num_threads(1)
from pyrovae.app import cli
from pyrovae.train.step import GradientStep

out = pathlib.Path(sys.argv[1])
step, calls = GradientStep.__call__, []

def slow_step(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 7:
        (out / ".slow").touch()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.01)
    return step(self, *args, **kwargs)

GradientStep.__call__ = slow_step
sys.exit(cli.main(sys.argv[2:] + ["--out", str(out)]))
"""


def test_a_second_sigint_after_2_seconds_stops_at_once_without_saving(tmp_path, capsys):
    """A real process in a long step: the first SIGINT only asks to stop after the step; a
    second one more than 2 s later (FORCE_AFTER_SECONDS) ends it at once: no 60 s wait, no
    checkpoint written, the epoch-1 checkpoint left as it was, and --resume continues from it."""
    from pyrovae.runtime.interrupt import FORCE_AFTER_SECONDS

    args = ["train", "--dataset", "linear", "--num-train", "40", "--num-test", "8", "--batch-size", "10",
            "--z-dim", "1", "--hidden-sizes", "4", "--epochs", "3", "--eval-samples", "2", "--no-progress"]
    out = tmp_path / "run"
    out.mkdir()
    package_root = str(pathlib.Path(pyrovae.__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    process = subprocess.Popen([sys.executable, "-c", _SLOW_STEP_TRAIN, str(out), *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (out / ".slow").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (out / ".slow").exists(), process.communicate(timeout=60)[1][-3000:]
        checkpoint = (out / "checkpoint.pt").read_bytes()  # epoch 1's, written before the slow step
        process.send_signal(signal.SIGINT)
        time.sleep(FORCE_AFTER_SECONDS + 0.5)
        assert process.poll() is None  # the first signal waits for the step to finish
        second = time.monotonic()
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
        stopped_after = time.monotonic() - second
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)
    assert stopped_after < 20, stopped_after  # at once, not after the 60 s step
    assert process.returncode == 130, err
    assert "Traceback" not in err and "pyrovae train: interrupted;" in err and "--resume" in err, err
    assert "at epoch 2, step" not in err  # the message of a saved, graceful stop
    assert (out / "checkpoint.pt").read_bytes() == checkpoint, "a checkpoint was written"
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 1 and state["position"] is None
    assert sorted(p.name for p in out.iterdir()) == [".slow", "checkpoint.pt"]  # no temporaries, no metrics
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args + ["--out", str(out), "--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 3


def test_resume_is_exact_for_the_score_function_moving_baseline(tmp_path):
    """The K = 1 score-function ELBO keeps a moving-average baseline between steps; it is saved
    with the checkpoint, so a resumed run still equals an uninterrupted one."""
    dataset = linear_gaussian(num_train=60, num_test=10, x_dim=3, z_dim=1, seed=2)
    config = TrainConfig(dataset="linear", objective="score", batch_size=20).resolved()

    def run(epochs, path, resume):
        pyro.clear_param_store()
        pyro.set_rng_seed(99)
        model, guide = build(config, dataset)
        objective = make_objective("score", 1)
        fit(model, guide, dataset, objective, epochs=epochs, batch_size=20, lr=1e-2, seed=3,
            checkpoint_path=path, resume=resume, config=config.to_dict(), test_bound=False, progress=False)
        return model, objective

    model_full, objective_full = run(4, tmp_path / "full.pt", False)
    run(2, tmp_path / "split.pt", False)
    model_split, objective_split = run(4, tmp_path / "split.pt", True)
    assert objective_split._moving_baseline == objective_full._moving_baseline is not None
    for name, value in model_full.decoder.state_dict().items():
        assert torch.equal(model_split.decoder.state_dict()[name], value), name
