"""Tests of pyrovae.runtime.checkpoint: atomic saving, safe loading, RNG state round trips."""

from __future__ import annotations

import os
import pathlib
import random

import numpy as np
import pyro
import pyro.optim
import pytest
import torch
from torch.distributions import constraints

from pyrovae.runtime.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

_EXECUTED: list[str] = []


def _record_execution() -> None:
    _EXECUTED.append("code in the checkpoint ran")


class _Payload:
    """Unpickling this runs `_record_execution`: what a malicious checkpoint would do."""

    def __reduce__(self):
        return (_record_execution, ())


def _training_state() -> tuple[dict, torch.nn.Module, torch.optim.Optimizer]:
    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.randn(4, 3)).pow(2).sum().backward()
    optimizer.step()
    pyro.param("z_loc", torch.randn(5, 2))
    pyro.param("z_scale", torch.ones(5, 2), constraint=constraints.positive)
    pyro.param("probs", torch.full((3,), 0.3), constraint=constraints.interval(0.0, 1.0))
    pyro.param("scale_tril", torch.eye(2), constraint=constraints.lower_cholesky)
    pyro_optim = pyro.optim.Adam({"lr": 0.01})
    state = {
        "model": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "param_store": pyro.get_param_store().get_state(),
        "pyro_optim": pyro_optim.get_state(),
        "python_random": random.getstate(),
        "torch_rng": torch.get_rng_state(),
        "rng": rng_state(),
        "step": 17,
        "history": {"loss": [3.5, 2.25, float("nan")], "note": "epoch 2", "done": False, "extra": None},
    }
    return state, net, optimizer


def test_round_trip_of_a_training_state(tmp_path: pathlib.Path) -> None:
    state, net, optimizer = _training_state()
    path = tmp_path / "run" / "nested" / "checkpoint.pt"
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)

    assert loaded["format"] == CHECKPOINT_FORMAT and loaded["version"] == CHECKPOINT_VERSION
    assert set(loaded) == set(state) | {"format", "version"}
    assert loaded["step"] == 17 and loaded["history"]["note"] == "epoch 2"
    assert loaded["history"]["loss"][:2] == [3.5, 2.25] and np.isnan(loaded["history"]["loss"][2])
    assert loaded["python_random"] == state["python_random"]
    assert torch.equal(loaded["torch_rng"], state["torch_rng"])

    # The network and its optimizer continue exactly where they left off.
    net2 = torch.nn.Linear(3, 2)
    net2.load_state_dict(loaded["model"])
    optimizer2 = torch.optim.Adam(net2.parameters(), lr=0.1)
    optimizer2.load_state_dict(loaded["optimizer"])
    x = torch.randn(4, 3)
    for model, opt in ((net, optimizer), (net2, optimizer2)):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    assert torch.equal(net.weight, net2.weight) and torch.equal(net.bias, net2.bias)

    # The param store comes back with its values and constraints.
    expected = {name: pyro.param(name).detach().clone() for name in ("z_loc", "z_scale", "probs", "scale_tril")}
    pyro.clear_param_store()
    pyro.get_param_store().set_state(loaded["param_store"])
    for name, value in expected.items():
        assert torch.allclose(pyro.param(name), value, atol=1e-6), name
    store = pyro.get_param_store()
    assert isinstance(store._constraints["probs"], type(constraints.interval(0.0, 1.0)))
    assert store._constraints["probs"].upper_bound == 1.0
    assert isinstance(store._constraints["z_scale"], type(constraints.positive))


def test_rng_state_round_trip_through_a_checkpoint(tmp_path: pathlib.Path) -> None:
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    np.random.standard_normal()  # leaves a cached Gaussian, part of numpy's state
    save_checkpoint(tmp_path / "rng.pt", {"rng": rng_state()})
    expected = (random.random(), float(np.random.standard_normal()), np.random.rand(3).tolist(), torch.rand(3))

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    got = (random.random(), float(np.random.standard_normal()), np.random.rand(3).tolist(), torch.rand(3))
    assert got[:3] == expected[:3]
    assert torch.equal(got[3], expected[3])


def test_set_rng_state_rejects_a_foreign_dict() -> None:
    with pytest.raises(ValueError, match="rng_state"):
        set_rng_state({"torch": torch.get_rng_state()})


def test_failed_save_leaves_the_old_checkpoint_intact(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1, "weights": torch.arange(5.0)})
    original_save = torch.save

    def save_then_crash(obj, file, *args, **kwargs):
        original_save(obj, file, *args, **kwargs)  # a partial or complete temp file now exists
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2, "weights": torch.zeros(5)})
    monkeypatch.undo()

    loaded = load_checkpoint(path)
    assert loaded["step"] == 1 and torch.equal(loaded["weights"], torch.arange(5.0))
    assert os.listdir(tmp_path) == ["checkpoint.pt"], "the temporary file must be removed"


def test_failed_replace_leaves_the_old_checkpoint_intact(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1})

    def refuse(src, dst):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(PermissionError):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_unloadable_objects_are_refused_at_save_time(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1})
    with pytest.raises(ValueError, match="numpy") as info:
        save_checkpoint(path, {"step": 2, "losses": np.zeros(3)})
    assert "torch.as_tensor" in str(info.value)
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_save_argument_checks(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "c.pt", {"version": 3})
    with pytest.raises(ValueError, match="must be a dict"):
        save_checkpoint(tmp_path / "c.pt", [1, 2])  # type: ignore[arg-type]
    assert not (tmp_path / "c.pt").exists()


def test_new_checkpoint_is_readable_by_others(tmp_path: pathlib.Path) -> None:
    save_checkpoint(tmp_path / "c.pt", {"step": 1})
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o644


def test_missing_checkpoint(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "nowhere.pt"
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_checkpoint(path)


def test_truncated_checkpoint(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"weights": torch.randn(100, 100)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_garbage_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable pyrovae checkpoint"):
        load_checkpoint(path)


def test_foreign_torch_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.ones(2)}, path)
    with pytest.raises(ValueError, match="not a pyrovae checkpoint"):
        load_checkpoint(path)
    torch.save(torch.ones(2), path)
    with pytest.raises(ValueError, match="not a pyrovae checkpoint"):
        load_checkpoint(path)


def test_checkpoint_from_a_newer_version(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "future.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION + 1}, path)
    with pytest.raises(ValueError, match="upgrade pyrovae"):
        load_checkpoint(path)


def test_loading_never_runs_code_from_the_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "payload": _Payload()}, path)
    _EXECUTED.clear()
    with pytest.raises(ValueError, match="not a readable pyrovae checkpoint"):
        load_checkpoint(path)
    assert _EXECUTED == []
    # The payload really is live: a trusting loader would have run it.
    torch.load(path, weights_only=False)
    assert _EXECUTED == ["code in the checkpoint ran"]


# --------------------------------------------------------------------------------------------
# the checksum is required (format version 2); files without one are refused with the fix


def _raw(path: pathlib.Path) -> dict:
    """The file's payload as torch.load reads it, without load_checkpoint's checks."""
    from pyrovae.runtime.checkpoint import _safe_constraint_classes

    with torch.serialization.safe_globals(list(_safe_constraint_classes())):
        return torch.load(path, weights_only=True)


def _without_checksum(path: pathlib.Path, version: int = 1, edit=None) -> dict:
    """Rewrite the checkpoint at ``path`` as a file without a checksum (as an older pyrovae, or
    someone who deleted the entry, would leave it), optionally editing the raw payload first."""
    payload = _raw(path)
    del payload["checksum"]
    payload["version"] = version
    if edit is not None:
        edit(payload)
    torch.save(payload, path)
    return payload


def test_a_checkpoint_without_a_checksum_is_refused_with_the_fix(tmp_path: pathlib.Path) -> None:
    assert CHECKPOINT_VERSION == 2
    path = tmp_path / "old.pt"
    save_checkpoint(path, {"weights": torch.arange(4.0), "epoch": 3})
    for version in (1, CHECKPOINT_VERSION):  # an old file, or a current one whose entry was removed
        save_checkpoint(path, {"weights": torch.arange(4.0), "epoch": 3})
        _without_checksum(path, version)
        with pytest.raises(ValueError, match="no SHA-256 checksum") as info:
            load_checkpoint(path)
        message = str(info.value)
        assert str(path) in message and f"version-{version} file" in message
        # the fix, as a command to copy
        assert f"from pyrovae.runtime.checkpoint import upgrade_checkpoint; upgrade_checkpoint({str(path)!r})" in message


def test_a_changed_weight_with_the_checksum_removed_is_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"weights": torch.arange(4.0), "epoch": 3})

    def change_a_weight(payload):
        payload["weights"][2] = 99.0

    _without_checksum(path, CHECKPOINT_VERSION, change_a_weight)
    assert _raw(path)["weights"][2] == 99.0  # torch.load alone takes it
    with pytest.raises(ValueError, match="no SHA-256 checksum"):
        load_checkpoint(path)
    # with the checksum in place, the same change is refused as corruption
    save_checkpoint(path, {"weights": torch.arange(4.0), "epoch": 3})
    payload = _raw(path)
    payload["weights"][2] = 99.0
    torch.save(payload, path)
    with pytest.raises(ValueError, match="do not match the SHA-256 checksum"):
        load_checkpoint(path)


def test_a_version_1_checkpoint_with_its_checksum_still_loads(tmp_path: pathlib.Path) -> None:
    """pyrovae's version-1 files carried the digest (of contents that say version 1): they load."""
    from pyrovae.runtime.checkpoint import _digest

    path = tmp_path / "v1.pt"
    payload = {"weights": torch.arange(4.0), "epoch": 3, "format": CHECKPOINT_FORMAT, "version": 1}
    payload["checksum"] = _digest(payload)
    torch.save(payload, path)
    loaded = load_checkpoint(path)
    assert loaded["version"] == 1 and torch.equal(loaded["weights"], torch.arange(4.0))


def test_upgrade_checkpoint_re_saves_a_trusted_file_with_a_checksum(tmp_path: pathlib.Path) -> None:
    from pyrovae.runtime.checkpoint import upgrade_checkpoint

    state, _, _ = _training_state()
    path = tmp_path / "old.pt"
    save_checkpoint(path, state)
    expected = load_checkpoint(path)
    _without_checksum(path, 1)
    with pytest.raises(ValueError, match="no SHA-256 checksum"):
        load_checkpoint(path)

    copy = upgrade_checkpoint(path, tmp_path / "sub" / "new.pt")  # to another file: the old one stays
    assert copy == tmp_path / "sub" / "new.pt"
    with pytest.raises(ValueError, match="no SHA-256 checksum"):
        load_checkpoint(path)
    assert upgrade_checkpoint(path) == path  # in place
    for upgraded in (load_checkpoint(copy), load_checkpoint(path)):
        assert upgraded["version"] == CHECKPOINT_VERSION and set(upgraded) == set(expected)
        assert upgraded["step"] == 17 and upgraded["history"]["note"] == "epoch 2"
        for name, value in expected["model"].items():
            assert torch.equal(upgraded["model"][name], value), name
        assert torch.equal(upgraded["param_store"]["params"]["z_loc"], expected["param_store"]["params"]["z_loc"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.pt", "sub"]  # no temporaries left
    # the upgraded file is protected from now on: a changed weight is refused
    payload = _raw(path)
    payload["model"]["weight"][0, 0] += 1.0
    torch.save(payload, path)
    with pytest.raises(ValueError, match="do not match the SHA-256 checksum"):
        load_checkpoint(path)
    # ... and upgrade_checkpoint does not launder a file whose checksum does not match
    with pytest.raises(ValueError, match="was not upgraded"):
        upgrade_checkpoint(path)
    with pytest.raises(ValueError, match="do not match the SHA-256 checksum"):
        load_checkpoint(path)


def test_upgrade_checkpoint_reads_weights_only(tmp_path: pathlib.Path) -> None:
    from pyrovae.runtime.checkpoint import upgrade_checkpoint

    path = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1, "payload": _Payload()}, path)
    _EXECUTED.clear()
    with pytest.raises(ValueError, match="not a readable pyrovae checkpoint"):
        upgrade_checkpoint(path)
    assert _EXECUTED == []
    torch.save({"weight": torch.ones(2)}, path)
    with pytest.raises(ValueError, match="not a pyrovae checkpoint"):
        upgrade_checkpoint(path)


def test_fit_resume_and_load_params_with_an_old_checkpoint(tmp_path: pathlib.Path) -> None:
    """A `fit` checkpoint without a checksum: resume refuses it naming the fix; upgraded, it
    resumes, and load_params reads it. Pyro's own param-store files (not pyrovae checkpoints,
    no checksum) still load through load_params."""
    from pyrovae import TrainConfig, build, fit, linear_gaussian, load_params, make_objective
    from pyrovae.runtime.checkpoint import upgrade_checkpoint

    dataset = linear_gaussian(num_train=20, num_test=5, x_dim=3, z_dim=1, seed=0)
    config = TrainConfig(dataset="linear", batch_size=10).resolved()
    path = tmp_path / "checkpoint.pt"

    def train(epochs, resume):
        pyro.clear_param_store()
        model, guide = build(config, dataset)
        fit(model, guide, dataset, make_objective("elbo"), epochs=epochs, batch_size=10, checkpoint_path=path,
            resume=resume, config=config.to_dict(), test_bound=False, progress=False)
        return model, guide

    train(1, False)
    _without_checksum(path, 1)
    with pytest.raises(ValueError, match="upgrade_checkpoint"):
        train(2, True)
    upgrade_checkpoint(path)
    model, guide = train(2, True)
    assert load_checkpoint(path)["epoch"] == 2
    trained = {name: value.detach().clone() for name, value in pyro.get_param_store().items()}

    pyro.clear_param_store()
    extra = load_params(path)
    assert extra["epoch"] == 2 and "checksum" not in extra
    for name, value in trained.items():
        assert torch.equal(pyro.param(name).detach(), value), name

    pyro.get_param_store().save(tmp_path / "pyro_store.pt")
    pyro.clear_param_store()
    assert load_params(tmp_path / "pyro_store.pt") == {}
    for name, value in trained.items():
        assert torch.equal(pyro.param(name).detach(), value), name
