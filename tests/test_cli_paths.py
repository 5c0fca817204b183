"""CLI paths that used to end in a traceback: each now gives one clear line on stderr, exit
code 2, and loses nothing (no earlier result replaced, no evaluation run before the refusal)."""

from __future__ import annotations

import json
import os
import pathlib
import tempfile

import pytest
import torch

from pyrovae.app.cli import main

GMM = ["train", "--dataset", "gmm", "--batch-size", "500", "--eval-samples", "5", "--no-progress"]
JPEG_SIGNATURE = b"\xff\xd8\xff"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _cli_error(capsys, args) -> str:
    """Run the CLI in this process, expect exit code 2 and return its stderr: one line, no traceback."""
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return err


def _writes_are_refused(folder: pathlib.Path) -> bool:
    try:
        fd, name = tempfile.mkstemp(dir=folder)
    except OSError:
        return True
    os.close(fd)
    os.unlink(name)
    return False


@pytest.fixture
def read_only(tmp_path) -> pathlib.Path:
    """A folder this process cannot write into: a ``chmod 555`` folder, or, for root (who may
    write there anyway), ``/sys``, which refuses writes even to root."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    yield_folder = folder if _writes_are_refused(folder) else pathlib.Path("/sys")
    if not _writes_are_refused(yield_folder):
        folder.chmod(0o755)
        pytest.skip("no folder here refuses writes to this user (root without a read-only /sys)")
    yield yield_folder
    folder.chmod(0o755)


@pytest.fixture
def a_file(tmp_path) -> pathlib.Path:
    path = tmp_path / "a-file"
    path.write_text("mine")
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> pathlib.Path:
    """A finished small gmm run (not modified)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(GMM + ["--epochs", "1", "--out", str(out)]) == 0
    return out / "checkpoint.pt"


# --------------------------------------------------------------------------------------------
# train --out


def test_train_out_under_a_file(capsys, a_file):
    err = _cli_error(capsys, GMM + ["--epochs", "1", "--out", str(a_file / "run")])
    assert "--out" in err and "is a file" in err and str(a_file) in err
    assert a_file.read_text() == "mine"


def test_train_out_read_only(capsys, read_only):
    err = _cli_error(capsys, GMM + ["--epochs", "1", "--out", str(read_only / "run")])
    assert "--out" in err and "cannot write" in err and str(read_only) in err


# --------------------------------------------------------------------------------------------
# --device


@pytest.mark.parametrize("device", ["tpu", "mps", "foo", "cuda:x", "cpu:0:1"])
def test_train_device_that_pyrovae_does_not_run_on(capsys, tmp_path, device):
    err = _cli_error(capsys, GMM + ["--epochs", "1", "--device", device, "--out", str(tmp_path / "o")])
    assert f"--device {device}" in err and "cpu" in err and "cuda" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["evaluate", "sample"])
def test_evaluate_and_sample_on_cuda_without_cuda(capsys, tmp_path, checkpoint, command):
    args = [command, "--checkpoint", str(checkpoint), "--device", "cuda"]
    if command == "sample":
        args += ["--out", str(tmp_path / "s.png")]
    err = _cli_error(capsys, args)
    assert "CUDA is not available" in err and "--device cpu" in err
    assert "checkpoint" not in err.replace("--checkpoint", "")  # the file is not blamed


# --------------------------------------------------------------------------------------------
# sample --out


def test_sample_out_a_folder(capsys, tmp_path, checkpoint):
    folder = tmp_path / "folder"
    folder.mkdir()
    err = _cli_error(capsys, ["sample", "--checkpoint", str(checkpoint), "--out", str(folder)])
    assert "--out" in err and "is a folder" in err
    assert list(folder.iterdir()) == []


def test_sample_out_read_only(capsys, checkpoint, read_only):
    err = _cli_error(capsys, ["sample", "--checkpoint", str(checkpoint), "--out", str(read_only / "s.png")])
    assert "--out" in err and "cannot write" in err


def test_sample_out_under_a_file(capsys, checkpoint, a_file):
    err = _cli_error(capsys, ["sample", "--checkpoint", str(checkpoint), "--out", str(a_file / "s.png")])
    assert "--out" in err and "is a file" in err
    assert a_file.read_text() == "mine"


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".JPG"])
def test_sample_out_jpeg_writes_a_jpeg(tmp_path, checkpoint, suffix):
    out = tmp_path / f"s{suffix}"
    assert main(["sample", "--checkpoint", str(checkpoint), "--num", "20", "--out", str(out)]) == 0
    assert out.read_bytes()[:3] == JPEG_SIGNATURE


def test_sample_out_png_is_still_a_png(tmp_path, checkpoint):
    out = tmp_path / "s.png"
    assert main(["sample", "--checkpoint", str(checkpoint), "--num", "20", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_sample_out_a_suffix_it_cannot_write(capsys, tmp_path, checkpoint):
    out = tmp_path / "s.gif"
    err = _cli_error(capsys, ["sample", "--checkpoint", str(checkpoint), "--out", str(out)])
    assert "--out" in err and ".gif" in err and ".png" in err and ".jpg" in err
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# evaluate --out: refused before the evaluation runs


@pytest.fixture
def no_evaluation(monkeypatch):
    """Make any evaluation fail loudly: a refusal must come before it."""
    from pyrovae.app import run

    def forbidden(*args, **kwargs):
        raise AssertionError("the evaluation ran before --out was checked")

    monkeypatch.setattr(run, "evaluate_run", forbidden)


def _evaluate(checkpoint, out) -> list[str]:
    return ["evaluate", "--checkpoint", str(checkpoint), "--eval-samples", "2", "--no-progress", "--out", str(out)]


def test_evaluate_out_a_folder(capsys, tmp_path, checkpoint, no_evaluation):
    folder = tmp_path / "folder"
    folder.mkdir()
    err = _cli_error(capsys, _evaluate(checkpoint, folder))
    assert "--out" in err and "is a folder" in err


def test_evaluate_out_read_only(capsys, checkpoint, read_only, no_evaluation):
    err = _cli_error(capsys, _evaluate(checkpoint, read_only / "eval.json"))
    assert "--out" in err and "cannot write" in err


def test_evaluate_out_under_a_file(capsys, checkpoint, a_file, no_evaluation):
    err = _cli_error(capsys, _evaluate(checkpoint, a_file / "eval.json"))
    assert "--out" in err and "is a file" in err
    assert a_file.read_text() == "mine"


def test_evaluate_out_a_new_file_in_new_folders(tmp_path, checkpoint):
    out = tmp_path / "new" / "folder" / "eval.json"
    assert main(_evaluate(checkpoint, out)) == 0
    assert json.loads(out.read_text())["eval_samples"] == 2


# --------------------------------------------------------------------------------------------
# --num-train / --num-test beyond the data


@pytest.mark.parametrize("flag, size", [("--num-train", 2000), ("--num-test", 500)])
def test_num_train_above_the_data_size_is_refused(capsys, tmp_path, flag, size):
    # The linear data set has 2000 training and 500 test points; one more is refused.
    out = tmp_path / "o"
    err = _cli_error(capsys, ["train", "--dataset", "linear", "--epochs", "1", "--no-progress",
                              flag, str(size + 1), "--out", str(out)])
    assert f"{flag} {size + 1}" in err and str(size) in err
    assert not out.exists()  # refused before the output folder is made
