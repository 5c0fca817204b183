"""Data sets for pyrovae: MNIST, generated data with known truth, and index batching.

Every data set is held as two dense tensors ``(num_points, num_features)`` on one device, so a
training step is an index lookup rather than a trip through a ``DataLoader``.

Generated data sets carry the parameters that generated them in :attr:`Dataset.truth`, which is what
lets the tests compare fitted models with exact answers (the linear-Gaussian marginal likelihood and
posterior have closed forms, see :func:`linear_gaussian_log_marginal` and
:func:`linear_gaussian_posterior`).

**References**

- Y. LeCun, L. Bottou, Y. Bengio, P. Haffner, *Gradient-based learning applied to document
  recognition* (1998) — MNIST.
- R. Salakhutdinov, I. Murray, *On the quantitative analysis of deep belief networks* (ICML 2008) —
  the statically binarized MNIST.
- Y. Burda, R. Grosse, R. Salakhutdinov, *Importance weighted autoencoders* (ICLR 2016) — dynamic
  binarization, resampled at every minibatch.
- M. E. Tipping, C. M. Bishop, *Probabilistic principal component analysis* (JRSS-B 1999) — the
  linear-Gaussian model and its closed-form marginal and posterior.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Union, get_args

import torch
from torch import Tensor

import pyro.distributions as dist

__all__ = [
    "DATA_ENV_VAR",
    "Binarize",
    "DataNotFoundError",
    "Dataset",
    "DatasetName",
    "Likelihood",
    "check_data",
    "gaussian_mixture",
    "index_batches",
    "linear_gaussian",
    "linear_gaussian_log_marginal",
    "linear_gaussian_posterior",
    "load_dataset",
    "load_mnist",
    "resolve_data_dir",
]

Likelihood = Literal["bernoulli", "gaussian"]
Binarize = Literal["dynamic", "static", "none"]
DatasetName = Literal["mnist", "gmm", "linear"]
PathLike = Union[str, os.PathLike]
Device = Union[str, torch.device]

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


def check_data(x: Tensor, likelihood: str, name: str = "x") -> None:
    """Check that ``x`` can be fed to a model with the given observation likelihood.

    :param x: the data, expected to be a floating tensor of shape ``(num_points, num_features)``.
    :param likelihood: ``"bernoulli"`` (values must lie in ``[0, 1]``) or ``"gaussian"``.
    :param name: how to call ``x`` in error messages.
    :raises ValueError: with a message that names the fix, when ``x`` is not a 2-D floating tensor,
        holds NaN or infinite entries, or (Bernoulli) holds values outside ``[0, 1]``.
    """
    if likelihood not in get_args(Likelihood):
        raise ValueError(
            f"Unknown likelihood {likelihood!r}; use one of {', '.join(map(repr, get_args(Likelihood)))}."
        )
    if not isinstance(x, Tensor):
        raise ValueError(
            f"{name} must be a torch.Tensor of shape (num_points, num_features), got "
            f"{type(x).__name__}; convert it with torch.as_tensor({name}, dtype=torch.float32)."
        )
    if x.dim() != 2:
        raise ValueError(
            f"{name} must be 2-D with shape (num_points, num_features), got shape {tuple(x.shape)}; "
            f"flatten each data point with {name}.reshape(len({name}), -1)."
        )
    if not x.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor, got dtype {x.dtype}; convert it with "
            f"{name}.float() (and divide raw 0-255 pixel values by 255)."
        )
    if x.numel() == 0:
        raise ValueError(
            f"{name} is empty (shape {tuple(x.shape)}); it needs at least one data point and one feature."
        )
    # A NaN or inf entry makes the sum non-finite, so one cheap reduction clears the common case;
    # the exact count is only taken when something is wrong (or the sum merely overflowed).
    num_bad = 0 if torch.isfinite(x.sum()) else int((~torch.isfinite(x)).sum())
    if num_bad:
        raise ValueError(
            f"{name} has {num_bad} NaN or infinite entries (of {x.numel()}); drop or impute those "
            f"entries before fitting, e.g. keep rows {name}[torch.isfinite({name}).all(1)]."
        )
    if likelihood == "bernoulli":
        low, high = (float(value) for value in torch.aminmax(x))
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"{name} has values in [{low:g}, {high:g}], but the Bernoulli likelihood needs values "
                f"in [0, 1]; divide raw pixel values by 255, or use likelihood='gaussian' for "
                f"real-valued data."
            )


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
                f"Unknown binarize={self.binarize!r}; use one of "
                f"{', '.join(map(repr, get_args(Binarize)))}."
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
        raise ValueError(
            f"Unknown binarize={binarize!r}; use one of {', '.join(map(repr, get_args(Binarize)))}."
        )
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


# Well separated (pairwise mean distances >= 5 component standard deviations) and not axis-aligned,
# so that a fitted mixture has a clear right answer and a diagonal-covariance fit visibly fails.
_GMM_WEIGHTS = (0.5, 0.3, 0.2)
_GMM_LOCS = ((-4.0, 0.0), (4.0, 0.0), (0.0, 5.0))
_GMM_COVARIANCES = (
    ((1.0, 0.6), (0.6, 0.8)),
    ((0.7, -0.4), (-0.4, 1.2)),
    ((0.5, 0.2), (0.2, 0.4)),
)


def gaussian_mixture(
    num_train: int = 3000, num_test: int = 1000, seed: int = 0, device: Device = "cpu"
) -> Dataset:
    r"""Draw a data set from a fixed 3-component Gaussian mixture in :math:`\mathbb{R}^2`.

    .. math:: c \sim \mathrm{Categorical}(\pi), \qquad x \mid c \sim \mathcal{N}(\mu_c, \Sigma_c)

    with full (rotated) covariance matrices. ``truth`` holds ``weights`` (3,), ``locs`` (3, 2) and
    ``covariance_matrices`` (3, 2, 2); the labels are the component indices ``c``.

    :param num_train: number of training points.
    :param num_test: number of test points.
    :param seed: seed of the generator; the same seed gives the same points on every device.
    :param device: device to hold the tensors on.
    """
    _check_counts(num_train=num_train, num_test=num_test)
    weights = torch.tensor(_GMM_WEIGHTS)
    locs = torch.tensor(_GMM_LOCS)
    covariance_matrices = torch.tensor(_GMM_COVARIANCES)
    mixing = dist.Categorical(probs=weights)
    components = dist.MultivariateNormal(locs, covariance_matrix=covariance_matrices)

    # Distribution.sample() has no generator argument and would consume (and depend on) the global
    # RNG; drawing standard noise from our own generator and pushing it through the distributions'
    # parameters gives the same law and keeps the data set a pure function of `seed`.
    generator = torch.Generator().manual_seed(seed)
    num = num_train + num_test
    labels = torch.multinomial(mixing.probs, num, replacement=True, generator=generator)
    noise = torch.randn(num, 2, generator=generator)
    x = components.loc[labels] + (components.scale_tril[labels] @ noise.unsqueeze(-1)).squeeze(-1)
    assert x.shape == (num, 2)

    return Dataset(
        name="gmm",
        train=x[:num_train],
        test=x[num_train:],
        likelihood="gaussian",
        binarize="none",
        train_labels=labels[:num_train],
        test_labels=labels[num_train:],
        image_shape=None,
        truth={
            "weights": weights,
            "locs": locs,
            "covariance_matrices": covariance_matrices,
        },
    ).to(device)


def linear_gaussian(
    num_train: int = 2000,
    num_test: int = 500,
    x_dim: int = 10,
    z_dim: int = 2,
    noise_scale: float = 0.5,
    seed: int = 0,
    device: Device = "cpu",
) -> Dataset:
    r"""Draw a data set from a linear-Gaussian latent-variable model (probabilistic PCA).

    .. math:: z \sim \mathcal{N}(0, I_{z}), \qquad x \mid z \sim \mathcal{N}(W z + b, \sigma^2 I_{x})

    with :math:`W_{ij} \sim \mathcal{N}(0, 1)` and :math:`b_i \sim \mathcal{N}(0, 1)` drawn once
    from the same seeded generator. ``truth`` holds ``weight`` (x_dim, z_dim), ``bias`` (x_dim,),
    ``noise_scale`` (float) and ``z_dim`` (int). The exact marginal and posterior are
    :func:`linear_gaussian_log_marginal` and :func:`linear_gaussian_posterior`.

    :param num_train: number of training points.
    :param num_test: number of test points.
    :param x_dim: dimension of the observations.
    :param z_dim: dimension of the latent variable.
    :param noise_scale: observation noise standard deviation :math:`\sigma`.
    :param seed: seed of the generator; the same seed gives the same parameters and points.
    :param device: device to hold the tensors on.
    """
    _check_counts(num_train=num_train, num_test=num_test, x_dim=x_dim, z_dim=z_dim)
    if not noise_scale > 0:
        raise ValueError(
            f"noise_scale must be a positive standard deviation, got {noise_scale}; pass e.g. 0.5."
        )
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(x_dim, z_dim, generator=generator)
    bias = torch.randn(x_dim, generator=generator)
    num = num_train + num_test
    # Noise from our generator rather than Distribution.sample(), for the reason given in
    # gaussian_mixture: the data set must not touch the global RNG.
    z = torch.randn(num, z_dim, generator=generator)
    x = z @ weight.T + bias + noise_scale * torch.randn(num, x_dim, generator=generator)
    assert x.shape == (num, x_dim)

    return Dataset(
        name="linear",
        train=x[:num_train],
        test=x[num_train:],
        likelihood="gaussian",
        binarize="none",
        image_shape=None,
        truth={
            "weight": weight,
            "bias": bias,
            "noise_scale": float(noise_scale),
            "z_dim": int(z_dim),
        },
    ).to(device)


def _check_linear_gaussian_args(x: Tensor, weight: Tensor, bias: Tensor, noise_scale: float) -> None:
    if weight.dim() != 2:
        raise ValueError(
            f"weight must have shape (x_dim, z_dim), got {tuple(weight.shape)}; pass "
            f"dataset.truth['weight']."
        )
    if bias.shape != weight.shape[:1]:
        raise ValueError(
            f"bias must have shape ({weight.shape[0]},) to match weight {tuple(weight.shape)}, got "
            f"{tuple(bias.shape)}."
        )
    if x.dim() != 2 or x.shape[1] != weight.shape[0]:
        raise ValueError(
            f"x must have shape (num_points, {weight.shape[0]}), got {tuple(x.shape)}; reshape single "
            f"points with x.reshape(1, -1)."
        )
    if not noise_scale > 0:
        raise ValueError(f"noise_scale must be positive, got {noise_scale}.")


def linear_gaussian_log_marginal(
    x: Tensor, weight: Tensor, bias: Tensor, noise_scale: float
) -> Tensor:
    r"""Exact log marginal likelihood of the linear-Gaussian model, one value per row of ``x``.

    .. math:: \log p(x) = \log \mathcal{N}(x;\ b,\ W W^\top + \sigma^2 I)

    :param x: observations, shape ``(num_points, x_dim)``.
    :param weight: :math:`W`, shape ``(x_dim, z_dim)``.
    :param bias: :math:`b`, shape ``(x_dim,)``.
    :param noise_scale: :math:`\sigma`.
    :returns: ``log p(x)``, shape ``(num_points,)``.
    """
    _check_linear_gaussian_args(x, weight, bias, noise_scale)
    eye = torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device)
    marginal = dist.MultivariateNormal(
        bias, covariance_matrix=weight @ weight.T + noise_scale**2 * eye
    )
    log_px = marginal.log_prob(x)
    assert log_px.shape == (x.shape[0],)
    return log_px


def linear_gaussian_posterior(
    x: Tensor, weight: Tensor, bias: Tensor, noise_scale: float
) -> torch.distributions.MultivariateNormal:
    r"""Exact posterior :math:`p(z \mid x)` of the linear-Gaussian model, batched over rows of ``x``.

    .. math::
        \Sigma = (I + W^\top W / \sigma^2)^{-1}, \qquad \mu = \Sigma W^\top (x - b) / \sigma^2

    :param x: observations, shape ``(num_points, x_dim)``.
    :param weight: :math:`W`, shape ``(x_dim, z_dim)``.
    :param bias: :math:`b`, shape ``(x_dim,)``.
    :param noise_scale: :math:`\sigma`.
    :returns: a ``MultivariateNormal`` with batch shape ``(num_points,)`` and event shape
        ``(z_dim,)``.
    """
    _check_linear_gaussian_args(x, weight, bias, noise_scale)
    z_dim = weight.shape[1]
    eye = torch.eye(z_dim, dtype=weight.dtype, device=weight.device)
    precision = eye + weight.T @ weight / noise_scale**2
    precision_tril = torch.linalg.cholesky(precision)
    # Solving with the Cholesky factor avoids forming the inverse just to multiply by it.
    loc = torch.cholesky_solve(weight.T @ (x - bias).T / noise_scale**2, precision_tril).T
    assert loc.shape == (x.shape[0], z_dim)
    return dist.MultivariateNormal(loc, precision_matrix=precision)


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def index_batches(
    num_data: int,
    batch_size: int,
    generator: torch.Generator | None = None,
    device: Device = "cpu",
    shuffle: bool = True,
) -> Iterator[Tensor]:
    """Split ``range(num_data)`` into minibatches of indices, one pass over the data.

    Every index appears in exactly one batch; all batches have ``batch_size`` indices except
    possibly the last, which holds the remainder.

    :param num_data: number of data points.
    :param batch_size: indices per batch.
    :param generator: generator for the permutation (``None``: the global one).
    :param device: device of the index tensors.
    :param shuffle: use a random permutation; ``False`` gives ``0, 1, ..., num_data - 1`` in order.
    :returns: an iterator over ``LongTensor`` batches of indices.
    """
    # Validated here, not inside the generator body, so a bad call fails where it is made.
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}; pass e.g. 128.")
    if not isinstance(num_data, int) or num_data < 0:
        raise ValueError(f"num_data must be a non-negative integer, got {num_data!r}.")
    if shuffle:
        # The permutation is drawn where the generator lives, then moved: randperm refuses a
        # generator on another device.
        perm_device = generator.device if generator is not None else device
        order = torch.randperm(num_data, generator=generator, device=perm_device).to(device)
    else:
        order = torch.arange(num_data, device=device)
    # split() of an empty tensor gives one empty batch; an empty data set has no batches.
    return iter(order.split(batch_size) if num_data else ())


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
        raise ValueError(
            f"Unknown binarize={binarize!r}; use one of {', '.join(map(repr, get_args(Binarize)))}."
        )
    return _DATASETS[name](
        data_dir=data_dir, download=download, binarize=binarize, seed=seed, device=device, **kwargs
    )
