"""MNIST in torchvision's layout, read from a local folder (downloaded only when asked)."""

from __future__ import annotations

import os
import pathlib
from typing import get_args

import torch

from pyrovae.data.dataset import Binarize, Dataset, Device, PathLike

DATA_ENV_VAR = "PYROVAE_DATA"


_MNIST_RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class DataNotFoundError(FileNotFoundError):
    """A data set's files are not where pyrovae looked, and downloading was not asked for (or failed)."""


def resolve_data_dir(data_dir: PathLike | None = None) -> pathlib.Path:
    """Return the folder that holds the data sets (the folder that contains ``MNIST/raw``).

    The first of these that is given wins: the ``data_dir`` argument, the ``PYROVAE_DATA``
    environment variable, ``~/.cache/pyrovae/data``.

    :param data_dir: an explicit data folder, or ``None`` to fall back to the environment variable
        and then to the cache folder.
    :returns: the folder as an absolute path (it need not exist).
    """
    if data_dir is not None:
        path = pathlib.Path(data_dir)
    elif os.environ.get(DATA_ENV_VAR):
        path = pathlib.Path(os.environ[DATA_ENV_VAR])
    else:
        path = pathlib.Path("~/.cache/pyrovae/data")
    # abspath (not resolve) so that error messages show the folder the user named, minus "..".
    return pathlib.Path(os.path.abspath(path.expanduser()))


def _missing_mnist_message(root: pathlib.Path, missing: list[str], download_error: str = "") -> str:
    tried = f"Downloading failed: {download_error}\n" if download_error else ""
    return (
        f"MNIST not found in {root / 'MNIST' / 'raw'} (missing: {', '.join(missing)}).\n"
        f"{tried}"
        f"Searched data folder: {root}\n"
        f"Fix it in one of three ways:\n"
        f"  1. pass --data-dir DIR (or data_dir=DIR), where DIR is the folder that holds MNIST/raw;\n"
        f"  2. set the {DATA_ENV_VAR} environment variable to the folder that holds MNIST/raw;\n"
        f"  3. pass --download (download=True) to fetch it into {root}."
    )


def load_mnist(
    data_dir: PathLike | None = None,
    download: bool = False,
    device: Device = "cpu",
    *,
    binarize: Binarize = "dynamic",
    seed: int = 0,
) -> Dataset:
    """Load MNIST as ``(N, 784)`` float32 intensities in ``[0, 1]`` (60,000 train, 10,000 test).

    Reads the raw IDX files in ``<data_dir>/MNIST/raw`` through ``torchvision.datasets.MNIST``;
    nothing is written there unless ``download=True``, so a read-only data folder works.

    :param data_dir: folder that holds ``MNIST/raw``; see :func:`resolve_data_dir` for the fallbacks.
    :param download: fetch MNIST into ``data_dir`` when it is not there.
    :param device: device to hold the tensors on.
    :param binarize: ``"dynamic"`` (resample binary pixels per minibatch, :meth:`Dataset.batch`),
        ``"static"`` (binarize once with ``seed``) or ``"none"`` (grey levels as they are).
    :param seed: seed of the static binarization.
    :raises DataNotFoundError: when the files are not there (or the download failed); the message
        names the folder searched and the three ways to point pyrovae at the data.
    :raises ValueError: when the files are there but cannot be read as MNIST.
    """
    if binarize not in get_args(Binarize):
        raise ValueError(f"Unknown binarize={binarize!r}; use one of {', '.join(map(repr, get_args(Binarize)))}.")
    # Imported here so that `import pyrovae` does not pay for torchvision unless MNIST is used.
    from torchvision.datasets import MNIST

    root = resolve_data_dir(data_dir)
    raw = root / "MNIST" / "raw"
    missing = [name for name in _MNIST_RAW_FILES if not (raw / name).is_file()]
    if missing and not download:
        raise DataNotFoundError(_missing_mnist_message(root, missing))

    splits = {}
    for train in (True, False):
        try:
            mnist = MNIST(str(root), train=train, download=download)
        except Exception as error:  # torchvision raises RuntimeError, URLError, OSError, ...
            # `from None`: the user needs the fix, not torchvision's traceback.
            missing = [name for name in _MNIST_RAW_FILES if not (raw / name).is_file()]
            if missing:
                reason = " ".join(str(error).split())
                raise DataNotFoundError(_missing_mnist_message(root, missing, reason)) from None
            raise ValueError(
                f"MNIST files in {raw} could not be read ({type(error).__name__}: {error}); they may "
                f"be truncated: delete them and fetch them again with --download (download=True)."
            ) from None
        images, labels = mnist.data, mnist.targets
        if images.dim() != 3 or images.dtype != torch.uint8 or len(images) != len(labels):
            raise ValueError(
                f"MNIST files in {raw} hold images of shape {tuple(images.shape)} and dtype "
                f"{images.dtype}; expected (N, 28, 28) uint8. Delete them and fetch them again with "
                f"--download (download=True)."
            )
        # Convert on the target device so only the uint8 bytes cross to an accelerator.
        images = images.to(device).reshape(len(images), -1).float().div_(255.0)
        splits[train] = (images, labels.to(device))

    dataset = Dataset(
        name="mnist",
        train=splits[True][0],
        test=splits[False][0],
        likelihood="bernoulli",
        binarize="none" if binarize == "none" else "dynamic",
        train_labels=splits[True][1],
        test_labels=splits[False][1],
        image_shape=(1,) + tuple(mnist.data.shape[1:]),
    )
    if binarize == "static":
        dataset.static_binarize_(seed)
    return dataset
