"""Tests of pyrovae.data: MNIST loading, generated data against their known truth, batching."""

from __future__ import annotations

import math
import os
import pathlib

import pyro.distributions as dist
import pytest
import torch

from pyrovae.data import (
    DataNotFoundError,
    Dataset,
    check_data,
    gaussian_mixture,
    index_batches,
    linear_gaussian,
    load_dataset,
    load_mnist,
    resolve_data_dir,
)
from pyrovae.models.linear_gaussian import (
    linear_gaussian_log_marginal,
    linear_gaussian_posterior,
)


@pytest.fixture(scope="module")
def mnist_dir(mnist_root) -> str:  # type: ignore[no-untyped-def]
    # conftest's mnist_root: skips without MNIST, fails in CI
    return str(mnist_root)


@pytest.fixture(scope="module")
def mnist(mnist_dir: str) -> Dataset:
    return load_mnist(mnist_dir)


# ---------------------------------------------------------------------------------------------
# MNIST


def test_mnist_shapes_range_dtype(mnist: Dataset) -> None:
    assert mnist.name == "mnist"
    assert mnist.train.shape == (60000, 784) and mnist.test.shape == (10000, 784)
    assert (mnist.num_train, mnist.num_test, mnist.x_dim) == (60000, 10000, 784)
    assert mnist.train.dtype == torch.float32 and mnist.test.dtype == torch.float32
    assert mnist.train.device.type == "cpu"
    assert float(mnist.train.min()) == 0.0 and float(mnist.train.max()) == 1.0
    assert float(mnist.test.min()) == 0.0 and float(mnist.test.max()) == 1.0
    # Intensities are the raw bytes divided by 255, not rescaled some other way.
    pixels = mnist.train[:200] * 255
    assert torch.allclose(pixels, pixels.round(), atol=1e-4)
    assert mnist.train_labels.shape == (60000,) and mnist.test_labels.shape == (10000,)
    assert mnist.train_labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert set(mnist.train_labels.unique().tolist()) == set(range(10))
    assert mnist.image_shape == (1, 28, 28)
    assert mnist.likelihood == "bernoulli" and mnist.binarize == "dynamic"
    assert mnist.truth == {}


def test_mnist_load_writes_nothing(mnist_dir: str, mnist: Dataset) -> None:
    # The shared data folder is read-only; loading must not need to create processed files.
    before = sorted(p.relative_to(mnist_dir) for p in pathlib.Path(mnist_dir).rglob("*"))
    load_mnist(mnist_dir)
    after = sorted(p.relative_to(mnist_dir) for p in pathlib.Path(mnist_dir).rglob("*"))
    assert before == after


def test_mnist_dynamic_binarization(mnist: Dataset) -> None:
    x = mnist.train[:500]
    first = mnist.batch(x, torch.Generator().manual_seed(1))
    again = mnist.batch(x, torch.Generator().manual_seed(1))
    other = mnist.batch(x, torch.Generator().manual_seed(2))
    assert set(first.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(first, again) and not torch.equal(first, other)
    # E[Bernoulli(x)] = x: the mean of the binary draws matches the grey levels' mean.
    variance = (x * (1 - x)).sum()
    z = (first.sum() - x.sum()) / variance.sqrt()
    assert abs(float(z)) < 5


def test_mnist_static_binarization(mnist_dir: str) -> None:
    first = load_dataset("mnist", data_dir=mnist_dir, binarize="static", seed=3)
    assert first.binarize == "static"
    assert set(first.train[:1000].unique().tolist()) == {0.0, 1.0}
    assert set(first.test[:1000].unique().tolist()) == {0.0, 1.0}
    # Static data stay fixed: batch() returns them unchanged.
    assert torch.equal(first.batch(first.train[:10], torch.Generator().manual_seed(0)), first.train[:10])
    grey = Dataset("toy", torch.rand(50, 784), torch.rand(20, 784), "bernoulli", "dynamic")
    copy = Dataset("toy", grey.train.clone(), grey.test.clone(), "bernoulli", "dynamic")
    assert torch.equal(grey.static_binarize_(7).train, copy.static_binarize_(7).train)


def test_missing_mnist_names_the_three_fixes(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "no-data-here"
    with pytest.raises(DataNotFoundError) as info:
        load_mnist(root)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for fix in ("--data-dir", "PYROVAE_DATA", "--download", "download=True"):
        assert fix in message
    assert str(root) in message


def test_missing_mnist_via_environment(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYROVAE_DATA", str(tmp_path / "env-dir"))
    with pytest.raises(DataNotFoundError, match="env-dir"):
        load_dataset("mnist")


def test_failed_download_is_a_data_error_not_a_traceback(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision.datasets import MNIST

    def no_network(self: MNIST) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no route to host")

    monkeypatch.setattr(MNIST, "download", no_network)
    with pytest.raises(DataNotFoundError) as info:
        load_mnist(tmp_path, download=True)
    assert "no route to host" in str(info.value) and "--data-dir" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_truncated_mnist_files(tmp_path: pathlib.Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"\x00\x00\x08")
    with pytest.raises(ValueError, match="truncated"):
        load_mnist(tmp_path)


def test_resolve_data_dir_precedence(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYROVAE_DATA", str(tmp_path / "from-env"))
    assert resolve_data_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert resolve_data_dir(None) == tmp_path / "from-env"
    monkeypatch.delenv("PYROVAE_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_dir(None) == tmp_path / "home" / ".cache" / "pyrovae" / "data"
    monkeypatch.chdir(tmp_path)
    assert resolve_data_dir("rel/../data") == tmp_path / "data"


# ---------------------------------------------------------------------------------------------
# check_data and Dataset validation


def test_check_data_accepts_valid_data() -> None:
    check_data(torch.rand(5, 3), "bernoulli")
    check_data(torch.randn(5, 3) * 100, "gaussian")


def test_check_data_rejects_3d_input() -> None:
    with pytest.raises(ValueError) as info:
        check_data(torch.rand(4, 28, 28), "bernoulli", name="images")
    message = str(info.value)
    assert "(num_points, num_features)" in message and "(4, 28, 28)" in message
    assert "images.reshape(len(images), -1)" in message


def test_check_data_rejects_integer_input() -> None:
    with pytest.raises(ValueError, match=r"\.float\(\)"):
        check_data(torch.zeros(4, 3, dtype=torch.uint8), "bernoulli")


def test_check_data_counts_nan_and_inf() -> None:
    x = torch.rand(10, 4)
    x[0, 0] = float("nan")
    x[3, 2] = float("inf")
    x[7, 1] = float("-inf")
    with pytest.raises(ValueError, match=r"3 NaN or infinite entries \(of 40\)"):
        check_data(x, "gaussian")


def test_check_data_rejects_raw_pixels_for_bernoulli() -> None:
    x = torch.rand(10, 4)
    x[2, 3] = 255.0
    with pytest.raises(ValueError) as info:
        check_data(x, "bernoulli")
    message = str(info.value)
    assert "255" in message and "divide" in message and "likelihood='gaussian'" in message
    check_data(x, "gaussian")


def test_check_data_rejects_unknown_likelihood() -> None:
    with pytest.raises(ValueError, match="'bernoulli', 'gaussian'"):
        check_data(torch.rand(2, 2), "poisson")


def test_dataset_validation() -> None:
    with pytest.raises(ValueError, match="static_binarize_"):
        Dataset("grey", torch.rand(5, 4), torch.rand(3, 4), "bernoulli", "static")
    with pytest.raises(ValueError, match="binarize='none'"):
        Dataset("real", torch.rand(5, 4), torch.rand(3, 4), "gaussian", "dynamic")
    with pytest.raises(ValueError, match="one label per point"):
        Dataset("x", torch.rand(5, 4), torch.rand(3, 4), "gaussian", "none", train_labels=torch.zeros(4))
    with pytest.raises(ValueError, match="same feature layout"):
        Dataset("x", torch.rand(5, 4), torch.rand(3, 5), "gaussian", "none")
    with pytest.raises(ValueError, match="image_shape"):
        Dataset("x", torch.rand(5, 4), torch.rand(3, 4), "bernoulli", image_shape=(1, 3, 3))


def test_batch_leaves_non_dynamic_data_alone() -> None:
    data = gaussian_mixture(num_train=10, num_test=5)
    x = data.train[:4]
    assert data.batch(x, torch.Generator().manual_seed(0)) is x


# ---------------------------------------------------------------------------------------------
# index_batches


def test_index_batches_cover_every_index_once() -> None:
    batches = list(index_batches(103, 10, generator=torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [10] * 10 + [3]
    assert all(b.dtype == torch.long for b in batches)
    everything = torch.cat(batches)
    assert torch.equal(everything.sort().values, torch.arange(103))
    assert not torch.equal(everything, torch.arange(103))


def test_index_batches_seeded_and_ordered() -> None:
    first = torch.cat(list(index_batches(50, 7, generator=torch.Generator().manual_seed(4))))
    again = torch.cat(list(index_batches(50, 7, generator=torch.Generator().manual_seed(4))))
    assert torch.equal(first, again)
    ordered = list(index_batches(5, 2, shuffle=False))
    assert [b.tolist() for b in ordered] == [[0, 1], [2, 3], [4]]
    assert list(index_batches(0, 3)) == []


def test_index_batches_rejects_bad_batch_size_at_call_time() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        index_batches(10, 0)


# ---------------------------------------------------------------------------------------------
# Generated data sets


def test_gaussian_mixture_truth_and_determinism() -> None:
    before = torch.get_rng_state()
    data = gaussian_mixture(num_train=300, num_test=100, seed=5)
    assert torch.equal(torch.get_rng_state(), before), "generating data must not touch the global RNG"
    assert data.train.shape == (300, 2) and data.test.shape == (100, 2)
    assert data.likelihood == "gaussian" and data.binarize == "none" and data.image_shape is None
    truth = data.truth
    assert truth["weights"].shape == (3,) and truth["locs"].shape == (3, 2)
    assert truth["covariance_matrices"].shape == (3, 2, 2)
    assert math.isclose(float(truth["weights"].sum()), 1.0, abs_tol=1e-6)
    off_diagonal = truth["covariance_matrices"][:, 0, 1]
    assert (off_diagonal.abs() > 0.1).all(), "covariances should not be axis-aligned"
    assert (torch.linalg.eigvalsh(truth["covariance_matrices"]) > 0).all()
    assert torch.equal(data.train, gaussian_mixture(num_train=300, num_test=100, seed=5).train)
    assert not torch.equal(data.train, gaussian_mixture(num_train=300, num_test=100, seed=6).train)


def test_gaussian_mixture_matches_its_truth() -> None:
    data = gaussian_mixture(num_train=20000, num_test=10, seed=0)
    x, labels, truth = data.train.double(), data.train_labels, data.truth
    num = len(x)
    weights = truth["weights"].double()
    counts = torch.bincount(labels, minlength=3).double()
    z_weights = (counts - num * weights) / (num * weights * (1 - weights)).sqrt()
    assert (z_weights.abs() < 5).all(), z_weights

    for c in range(3):
        x_c = x[labels == c]
        loc = truth["locs"][c].double()
        cov = truth["covariance_matrices"][c].double()
        n_c = len(x_c)
        z_mean = (x_c.mean(0) - loc) / (cov.diagonal() / n_c).sqrt()
        assert (z_mean.abs() < 5).all(), (c, z_mean)
        # Var of the product of centred Gaussian coordinates i, j is S_ii S_jj + S_ij^2.
        centred = x_c - loc
        empirical = centred.T @ centred / n_c
        se = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / n_c).sqrt()
        z_cov = (empirical - cov) / se
        assert (z_cov.abs() < 5).all(), (c, z_cov)

    # The mixture mean, with the mixture's own covariance for the standard error.
    locs, covs = truth["locs"].double(), truth["covariance_matrices"].double()
    mean = weights @ locs
    second = (weights[:, None, None] * (covs + locs[:, :, None] * locs[:, None, :])).sum(0)
    mixture_var = (second - mean[:, None] * mean[None, :]).diagonal()
    z_total = (x.mean(0) - mean) / (mixture_var / num).sqrt()
    assert (z_total.abs() < 5).all(), z_total


def test_linear_gaussian_truth_and_moments() -> None:
    before = torch.get_rng_state()
    data = linear_gaussian(num_train=20000, num_test=100, x_dim=4, z_dim=2, noise_scale=0.5, seed=2)
    assert torch.equal(torch.get_rng_state(), before)
    truth = data.truth
    assert data.train.shape == (20000, 4) and data.test.shape == (100, 4)
    assert truth["weight"].shape == (4, 2) and truth["bias"].shape == (4,)
    assert truth["noise_scale"] == 0.5 and truth["z_dim"] == 2
    assert data.likelihood == "gaussian" and data.binarize == "none"
    assert data.train_labels is None

    x = data.train.double()
    weight, bias = truth["weight"].double(), truth["bias"].double()
    cov = weight @ weight.T + 0.25 * torch.eye(4, dtype=torch.float64)
    n = len(x)
    z_mean = (x.mean(0) - bias) / (cov.diagonal() / n).sqrt()
    assert (z_mean.abs() < 5).all(), z_mean
    centred = x - bias
    se = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / n).sqrt()
    z_cov = (centred.T @ centred / n - cov) / se
    assert (z_cov.abs() < 5).all(), z_cov


def _float64_linear_model(x_dim: int, z_dim: int, noise_scale: float, seed: int):
    truth = linear_gaussian(num_train=10, num_test=10, x_dim=x_dim, z_dim=z_dim, noise_scale=noise_scale, seed=seed).truth
    return truth["weight"].double(), truth["bias"].double(), truth["noise_scale"]


def test_linear_gaussian_log_marginal_matches_monte_carlo() -> None:
    weight, bias, sigma = _float64_linear_model(x_dim=3, z_dim=2, noise_scale=0.8, seed=1)
    generator = torch.Generator().manual_seed(0)
    x = bias + torch.randn(4, 3, generator=generator, dtype=torch.float64)
    log_px = linear_gaussian_log_marginal(x, weight, bias, sigma)
    assert log_px.shape == (4,)

    num_draws = 200_000
    z = torch.randn(num_draws, 2, generator=generator, dtype=torch.float64)
    likelihood = dist.Normal(z @ weight.T + bias, sigma).to_event(1)
    weights = likelihood.log_prob(x[:, None, :]).exp()  # p(x | z), shape (4, num_draws)
    assert weights.shape == (4, num_draws)
    estimate = weights.mean(1)
    se = weights.std(1) / math.sqrt(num_draws)
    assert (se < 0.05 * estimate).all(), "the Monte Carlo check is too weak to detect an error"
    z_score = (estimate - log_px.exp()) / se
    assert (z_score.abs() < 5).all(), z_score


def test_linear_gaussian_bayes_identity() -> None:
    # log p(x) = log p(x|z) + log p(z) - log p(z|x) at every z: ties the marginal to the posterior.
    weight, bias, sigma = _float64_linear_model(x_dim=10, z_dim=3, noise_scale=0.5, seed=3)
    generator = torch.Generator().manual_seed(1)
    x = bias + 3 * torch.randn(6, 10, generator=generator, dtype=torch.float64)
    z = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    posterior = linear_gaussian_posterior(x, weight, bias, sigma)
    log_joint = dist.Normal(z @ weight.T + bias, sigma).to_event(1).log_prob(x) + dist.Normal(
        torch.zeros(3, dtype=torch.float64), 1.0
    ).to_event(1).log_prob(z)
    log_px = linear_gaussian_log_marginal(x, weight, bias, sigma)
    assert torch.allclose(log_joint - posterior.log_prob(z), log_px, atol=1e-9, rtol=0)


def test_linear_gaussian_posterior_equals_joint_conditioning() -> None:
    weight, bias, sigma = _float64_linear_model(x_dim=5, z_dim=2, noise_scale=0.7, seed=4)
    x = bias + torch.randn(7, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    posterior = linear_gaussian_posterior(x, weight, bias, sigma)
    assert posterior.batch_shape == (7,) and posterior.event_shape == (2,)

    # Joint of (z, x): covariances [[I, W^T], [W, W W^T + s^2 I]]; condition z on x the textbook way.
    cov_zx = weight.T
    cov_xx = weight @ weight.T + sigma**2 * torch.eye(5, dtype=torch.float64)
    gain = torch.linalg.solve(cov_xx, cov_zx.T).T  # Sigma_zx Sigma_xx^{-1}
    loc = (gain @ (x - bias).T).T
    cov = torch.eye(2, dtype=torch.float64) - gain @ cov_zx.T
    assert torch.allclose(posterior.loc, loc, atol=1e-10, rtol=0)
    assert torch.allclose(posterior.covariance_matrix, cov.expand(7, 2, 2), atol=1e-10, rtol=0)


def test_linear_gaussian_argument_checks() -> None:
    weight, bias = torch.randn(4, 2), torch.randn(4)
    with pytest.raises(ValueError, match=r"\(num_points, 4\)"):
        linear_gaussian_log_marginal(torch.randn(3, 5), weight, bias, 1.0)
    with pytest.raises(ValueError, match="noise_scale"):
        linear_gaussian(noise_scale=0.0)
    with pytest.raises(ValueError, match="num_train"):
        gaussian_mixture(num_train=0)


# ---------------------------------------------------------------------------------------------
# load_dataset


def test_load_dataset_registry() -> None:
    gmm = load_dataset("gmm", seed=1, num_train=40, num_test=10)
    assert gmm.name == "gmm" and gmm.num_train == 40 and gmm.binarize == "none"
    assert torch.equal(gmm.train, gaussian_mixture(num_train=40, num_test=10, seed=1).train)
    linear = load_dataset("linear", x_dim=6, z_dim=3, num_train=20, num_test=5)
    assert linear.x_dim == 6 and linear.truth["z_dim"] == 3
    with pytest.raises(ValueError) as info:
        load_dataset("cifar")
    assert all(name in str(info.value) for name in ("'mnist'", "'gmm'", "'linear'"))
    with pytest.raises(ValueError, match="binarize"):
        load_dataset("gmm", binarize="sometimes")


def test_dataset_to_moves_everything() -> None:
    data = linear_gaussian(num_train=10, num_test=5)
    moved = data.to("cpu")
    assert moved is not data
    assert torch.equal(moved.train, data.train) and torch.equal(moved.truth["weight"], data.truth["weight"])
    assert moved.truth["noise_scale"] == data.truth["noise_scale"]


def test_missing_mnist_fails_in_ci_and_skips_elsewhere(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # The root conftest's mnist_root: with CI set a missing MNIST fails the test (a skip would hide
    # that the MNIST tests never ran); without CI it skips; a real folder is returned either way.
    # (Outcomes are caught here, so a skip where a failure is due fails this test, not skips it.)
    from conftest import find_mnist_root

    def outcome() -> tuple[str, str]:
        try:
            return "returned", str(find_mnist_root())
        except pytest.fail.Exception as error:
            return "failed", str(error)
        except pytest.skip.Exception as error:
            return "skipped", str(error)

    monkeypatch.setenv("PYROVAE_DATA", str(tmp_path / "nowhere"))
    for ci in ("true", "1"):
        monkeypatch.setenv("CI", ci)
        kind, message = outcome()
        assert kind == "failed" and "CI is set" in message and "holds no MNIST/raw" in message, (ci, kind, message)
    for ci in ("", "0", "false"):
        monkeypatch.setenv("CI", ci)
        kind, message = outcome()
        assert kind == "skipped" and "holds no MNIST/raw" in message, (ci, kind, message)
    monkeypatch.delenv("CI")
    monkeypatch.delenv("PYROVAE_DATA")
    assert outcome()[0] == "skipped" and "PYROVAE_DATA is not set" in outcome()[1]
    (tmp_path / "data" / "MNIST" / "raw").mkdir(parents=True)
    monkeypatch.setenv("PYROVAE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("CI", "true")
    assert outcome() == ("returned", str(tmp_path / "data"))
