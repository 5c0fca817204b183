"""The data set container and loading by name."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args

import torch
from torch import Tensor

from pyrovae.checks import Likelihood, check_data

Binarize = Literal["dynamic", "static", "none"]


DatasetName = Literal["mnist", "gmm", "linear"]


PathLike = Union[str, os.PathLike]


Device = Union[str, torch.device]


@dataclass
class Dataset:
    """A data set held as dense ``(num_points, num_features)`` tensors on one device.

    :param name: the data set's name, e.g. ``"mnist"``.
    :param train: training points, shape ``(num_train, x_dim)``.
    :param test: test points, shape ``(num_test, x_dim)``.
    :param likelihood: the observation likelihood the data suit: ``"bernoulli"`` for values in
        ``[0, 1]``, ``"gaussian"`` for real values.
    :param binarize: ``"dynamic"``: :meth:`batch` draws a fresh binary sample
        ``x_bin ~ Bernoulli(x)`` each time it is called; ``"static"``: the data were binarized once
        (see :meth:`static_binarize_`) and hold only 0s and 1s; ``"none"``: used as they are.
    :param train_labels: class labels of the training points, or ``None``.
    :param test_labels: class labels of the test points, or ``None``.
    :param image_shape: shape of one data point as an image, e.g. ``(1, 28, 28)``, or ``None`` for
        data that are not images.
    :param truth: the parameters that generated the data (generated data sets); empty for real data.
    """

    name: str
    train: Tensor
    test: Tensor
    likelihood: Likelihood
    binarize: Binarize = "none"
    train_labels: Tensor | None = None
    test_labels: Tensor | None = None
    image_shape: tuple[int, ...] | None = None
    truth: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.binarize not in get_args(Binarize):
            raise ValueError(
                f"Unknown binarize={self.binarize!r}; use one of {', '.join(map(repr, get_args(Binarize)))}."
            )
        check_data(self.train, self.likelihood, name=f"{self.name} train")
        check_data(self.test, self.likelihood, name=f"{self.name} test")
        if self.train.shape[1] != self.test.shape[1]:
            raise ValueError(
                f"{self.name}: train points have {self.train.shape[1]} features but test points have "
                f"{self.test.shape[1]}; both splits must share the same feature layout."
            )
        if self.binarize != "none" and self.likelihood != "bernoulli":
            raise ValueError(
                f"{self.name}: binarize={self.binarize!r} needs likelihood='bernoulli'; use "
                f"binarize='none' for real-valued data."
            )
        if self.binarize == "static":
            for split, x in (("train", self.train), ("test", self.test)):
                if not ((x == 0) | (x == 1)).all():
                    raise ValueError(
                        f"{self.name}: binarize='static' needs {split} values in {{0, 1}}; build the "
                        f"data set with binarize='dynamic' and call .static_binarize_(seed)."
                    )
        for split, x, labels in (
            ("train", self.train, self.train_labels),
            ("test", self.test, self.test_labels),
        ):
            if labels is not None and labels.shape != (len(x),):
                raise ValueError(
                    f"{self.name}: {split}_labels must have shape ({len(x)},), one label per point, "
                    f"got {tuple(labels.shape)}."
                )
        if self.image_shape is not None and _prod(self.image_shape) != self.x_dim:
            raise ValueError(
                f"{self.name}: image_shape {self.image_shape} holds {_prod(self.image_shape)} values "
                f"but points have {self.x_dim} features; pass the matching image_shape or None."
            )

    @property
    def num_train(self) -> int:
        """Number of training points."""
        return self.train.shape[0]

    @property
    def num_test(self) -> int:
        """Number of test points."""
        return self.test.shape[0]

    @property
    def x_dim(self) -> int:
        """Number of features of one data point."""
        return self.train.shape[1]

    def to(self, device: Device) -> Dataset:
        """Return a copy with every tensor (data, labels, tensors in :attr:`truth`) on ``device``.

        :param device: the target device, e.g. ``"cpu"`` or ``"cuda:0"``.
        """

        def move(value: Any) -> Any:
            return value.to(device) if isinstance(value, Tensor) else value

        return dataclasses.replace(
            self,
            train=self.train.to(device),
            test=self.test.to(device),
            train_labels=move(self.train_labels),
            test_labels=move(self.test_labels),
            truth={key: move(value) for key, value in self.truth.items()},
        )

    def batch(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Prepare a minibatch of this data set for the model.

        With ``binarize="dynamic"`` this returns a fresh binary sample ``Bernoulli(x)`` (a new one on
        every call, which acts as data augmentation); otherwise ``x`` unchanged.

        :param x: a minibatch, e.g. ``dataset.train[index]``.
        :param generator: random-number generator on ``x``'s device for the binarization, or
            ``None`` for the global one.
        """
        if self.binarize == "dynamic":
            return torch.bernoulli(x, generator=generator)
        return x

    def static_binarize_(self, seed: int = 0) -> Dataset:
        """Binarize train and test in place, once, with a fixed seed, and set ``binarize="static"``.

        Each value ``p`` is replaced by a draw from ``Bernoulli(p)``; the same ``seed`` gives the same
        binary data set on the same device.

        :param seed: seed of the generator used for the draw.
        :returns: ``self``, binarized.
        """
        if self.likelihood != "bernoulli":
            raise ValueError(
                f"{self.name}: static binarization needs likelihood='bernoulli', got "
                f"{self.likelihood!r}; keep binarize='none' for real-valued data."
            )
        generator = torch.Generator(device=self.train.device).manual_seed(seed)
        self.train = torch.bernoulli(self.train, generator=generator)
        self.test = torch.bernoulli(self.test, generator=generator)
        self.binarize = "static"
        return self


def _prod(shape: tuple[int, ...]) -> int:
    result = 1
    for size in shape:
        result *= size
    return result
