"""Loading a data set by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, get_args

from pyrovae.data.dataset import Binarize, Dataset, DatasetName, Device, PathLike
from pyrovae.data.mnist import load_mnist
from pyrovae.data.synthetic import gaussian_mixture, linear_gaussian


def _load_mnist_entry(
    *, data_dir: PathLike | None, download: bool, binarize: Binarize, seed: int, device: Device, **kwargs: Any
) -> Dataset:
    return load_mnist(data_dir, download, device, binarize=binarize, seed=seed, **kwargs)


def _load_gmm_entry(
    *, data_dir: PathLike | None, download: bool, binarize: Binarize, seed: int, device: Device, **kwargs: Any
) -> Dataset:
    return gaussian_mixture(seed=seed, device=device, **kwargs)


def _load_linear_entry(
    *, data_dir: PathLike | None, download: bool, binarize: Binarize, seed: int, device: Device, **kwargs: Any
) -> Dataset:
    return linear_gaussian(seed=seed, device=device, **kwargs)


_DATASETS: dict[str, Callable[..., Dataset]] = {
    "mnist": _load_mnist_entry,
    "gmm": _load_gmm_entry,
    "linear": _load_linear_entry,
}


def load_dataset(
    name: DatasetName,
    *,
    data_dir: PathLike | None = None,
    download: bool = False,
    binarize: Binarize = "dynamic",
    seed: int = 0,
    device: Device = "cpu",
    **kwargs: Any,
) -> Dataset:
    """Load a data set by name.

    :param name: ``"mnist"`` (:func:`load_mnist`), ``"gmm"`` (:func:`gaussian_mixture`) or
        ``"linear"`` (:func:`linear_gaussian`).
    :param data_dir: folder that holds the downloaded data sets (MNIST only).
    :param download: fetch a missing data set (MNIST only).
    :param binarize: binarization of data with a Bernoulli likelihood (MNIST); real-valued generated
        data sets are never binarized and report ``binarize="none"``.
    :param seed: seed of the static binarization (MNIST) or of the generator (generated data sets).
    :param device: device to hold the tensors on.
    :param kwargs: passed on to the loader, e.g. ``num_train=500`` or ``x_dim=5``.
    """
    if name not in _DATASETS:
        raise ValueError(f"Unknown data set {name!r}; use one of {', '.join(map(repr, _DATASETS))}.")
    if binarize not in get_args(Binarize):
        raise ValueError(f"Unknown binarize={binarize!r}; use one of {', '.join(map(repr, get_args(Binarize)))}.")
    return _DATASETS[name](data_dir=data_dir, download=download, binarize=binarize, seed=seed, device=device, **kwargs)
