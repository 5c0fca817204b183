"""Generated data sets with known truth: a Gaussian mixture in R² and a linear-Gaussian latent model."""

from __future__ import annotations

import pyro.distributions as dist
import torch

from pyrovae.data.batching import _check_counts
from pyrovae.data.dataset import Dataset, Device

# Well separated (pairwise mean distances >= 5 component standard deviations) and not axis-aligned,
# so that a fitted mixture has a clear right answer and a diagonal-covariance fit visibly fails.
_GMM_WEIGHTS = (0.5, 0.3, 0.2)


_GMM_LOCS = ((-4.0, 0.0), (4.0, 0.0), (0.0, 5.0))


_GMM_COVARIANCES = (
    ((1.0, 0.6), (0.6, 0.8)),
    ((0.7, -0.4), (-0.4, 1.2)),
    ((0.5, 0.2), (0.2, 0.4)),
)


def gaussian_mixture(num_train: int = 3000, num_test: int = 1000, seed: int = 0, device: Device = "cpu") -> Dataset:
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
        raise ValueError(f"noise_scale must be a positive standard deviation, got {noise_scale}; pass e.g. 0.5.")
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
