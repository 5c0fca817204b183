"""Tests of pyrovae.app.plots: every function writes a readable PNG of the expected size and content."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pyrovae.app import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PADDING = 2  # torchvision.utils.make_grid's default


def read_png(path: Path) -> torch.Tensor:
    """Check the PNG signature and decode the file as a uint8 (C, H, W) tensor."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    # PIL rather than torchvision.io, whose image decoding is deprecated since torchvision 0.29.
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def grid_size(num_images: int, nrow: int, height: int, width: int) -> tuple[int, int]:
    """Pixel (height, width) of torchvision's grid of ``num_images`` >= 2 tiles, ``nrow`` per row."""
    cols = min(nrow, num_images)
    rows = math.ceil(num_images / cols)
    return rows * (height + PADDING) + PADDING, cols * (width + PADDING) + PADDING


def tile(image: torch.Tensor, row: int, col: int, height: int, width: int) -> torch.Tensor:
    """The pixels of the grid tile at (row, col), padding excluded."""
    top = PADDING + row * (height + PADDING)
    left = PADDING + col * (width + PADDING)
    return image[:, top : top + height, left : left + width]


def figure_size() -> tuple[int, int]:
    width, height = plots._FIGSIZE
    return round(height * plots._DPI), round(width * plots._DPI)


# save_image_grid


@pytest.mark.parametrize(
    "num_images, nrow, image_shape",
    [(20, 10, (1, 28, 28)), (7, 3, (3, 8, 8)), (5, 10, (1, 4, 6))],
)
def test_save_image_grid_size(tmp_path, num_images, nrow, image_shape):
    images = torch.rand(num_images, math.prod(image_shape))
    path = tmp_path / "nested" / "dir" / "grid.png"
    plots.save_image_grid(images, path, image_shape=image_shape, nrow=nrow)
    image = read_png(path)
    # Grey tiles are written as RGB: make_grid repeats the single channel.
    assert image.shape == (3,) + grid_size(num_images, nrow, *image_shape[1:])


def test_save_image_grid_mnist_shape_default(tmp_path):
    path = tmp_path / "grid.png"
    plots.save_image_grid(torch.rand(20, 784), path)
    assert read_png(path).shape == (3, 2 * (28 + 2) + 2, 10 * (28 + 2) + 2)


def test_save_image_grid_places_images_row_major(tmp_path):
    images = torch.zeros(20, 28 * 28)
    images[11] = 1.0
    path = tmp_path / "grid.png"
    plots.save_image_grid(images, path, nrow=10)
    image = read_png(path)
    assert (tile(image, 1, 1, 28, 28) == 255).all()
    assert int(image.sum()) == 255 * 3 * 28 * 28


def test_save_image_grid_writes_png_whatever_the_extension(tmp_path):
    path = tmp_path / "grid_without_extension"
    plots.save_image_grid(torch.rand(4, 784), path)
    assert read_png(path).shape == (3,) + grid_size(4, 10, 28, 28)


def test_save_image_grid_accepts_gradients_and_doubles(tmp_path):
    images = torch.rand(3, 784, dtype=torch.float64, requires_grad=True)
    plots.save_image_grid(images, tmp_path / "grid.png")
    assert read_png(tmp_path / "grid.png").numel() > 0


def test_save_image_grid_feature_count_mismatch(tmp_path):
    with pytest.raises(ValueError, match=r"784.*image_shape"):
        plots.save_image_grid(torch.rand(20, 784), tmp_path / "grid.png", image_shape=(1, 32, 32))
    assert not (tmp_path / "grid.png").exists()


def test_save_image_grid_unflattened_images(tmp_path):
    with pytest.raises(ValueError, match=r"reshape"):
        plots.save_image_grid(torch.rand(20, 1, 28, 28), tmp_path / "grid.png")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"image_shape": (2, 28, 14)}, "channels"),
        ({"image_shape": (28, 28)}, "three positive ints"),
        ({"nrow": 0}, "nrow"),
    ],
)
def test_save_image_grid_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plots.save_image_grid(torch.rand(4, 784), tmp_path / "grid.png", **kwargs)


def test_save_image_grid_empty(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        plots.save_image_grid(torch.rand(0, 784), tmp_path / "grid.png")


# save_reconstructions


def test_save_reconstructions_alternates_rows(tmp_path):
    num_images, nrow = 15, 10
    originals = torch.ones(num_images, 784)
    reconstructions = torch.full((num_images, 784), 0.5)
    path = tmp_path / "sub" / "recon.png"
    plots.save_reconstructions(originals, reconstructions, path, nrow=nrow)
    image = read_png(path)
    # Two pairs of rows, the second pair padded from 5 to 10 columns with blank tiles.
    assert image.shape == (3,) + grid_size(4 * nrow, nrow, 28, 28)
    grey = round(0.5 * 255)
    for col in range(nrow):
        assert (tile(image, 0, col, 28, 28) == 255).all()
        assert (tile(image, 1, col, 28, 28) == grey).all()
    for col in range(num_images - nrow):
        assert (tile(image, 2, col, 28, 28) == 255).all()
        assert (tile(image, 3, col, 28, 28) == grey).all()
    for col in range(num_images - nrow, nrow):
        assert (tile(image, 2, col, 28, 28) == 0).all()
        assert (tile(image, 3, col, 28, 28) == 0).all()


def test_save_reconstructions_keeps_pairs_in_columns(tmp_path):
    originals = torch.zeros(6, 3 * 4 * 4)
    reconstructions = torch.zeros(6, 3 * 4 * 4)
    originals[4] = 1.0
    reconstructions[4] = 1.0
    path = tmp_path / "recon.png"
    plots.save_reconstructions(originals, reconstructions, path, image_shape=(3, 4, 4), nrow=3)
    image = read_png(path)
    assert image.shape == (3,) + grid_size(12, 3, 4, 4)
    # Image 4 is column 1 of the second pair of rows: original in grid row 2, reconstruction in row 3.
    assert (tile(image, 2, 1, 4, 4) == 255).all()
    assert (tile(image, 3, 1, 4, 4) == 255).all()
    assert int(image.sum()) == 2 * 255 * 3 * 4 * 4


def test_save_reconstructions_shape_mismatch(tmp_path):
    with pytest.raises(ValueError, match="same shape"):
        plots.save_reconstructions(torch.rand(10, 784), torch.rand(9, 784), tmp_path / "recon.png")


def test_save_reconstructions_feature_count_mismatch(tmp_path):
    with pytest.raises(ValueError, match="image_shape"):
        plots.save_reconstructions(torch.rand(10, 100), torch.rand(10, 100), tmp_path / "recon.png")


# plot_curves


def test_plot_curves_skips_missing_test_bounds(tmp_path):
    history = {
        "epoch": [1, 2, 3, 4],
        "train_bound": [-200.0, -150.5, -130.25, -120.0],
        "test_bound": [None, -155.0, None, -125.0],
        "bound_name": "IWAE (K=5)",
    }
    path = tmp_path / "figs" / "curves.png"
    plots.plot_curves(history, path, title="training curves")
    assert read_png(path).shape[1:] == figure_size()


@pytest.mark.parametrize(
    "history",
    [
        {"epoch": [1], "train_bound": [-100.0], "test_bound": [None]},
        {"epoch": [1, 2], "train_bound": [-100.0, -90.0]},
        {"epoch": [], "train_bound": [], "test_bound": []},
    ],
)
def test_plot_curves_partial_histories(tmp_path, history):
    path = tmp_path / "curves.png"
    plots.plot_curves(history, path)
    assert read_png(path).shape[1:] == figure_size()


def test_plot_curves_length_mismatch(tmp_path):
    history = {"epoch": [1, 2, 3], "train_bound": [-1.0, -2.0, -3.0], "test_bound": [None, -2.0]}
    with pytest.raises(ValueError, match="None for epochs"):
        plots.plot_curves(history, tmp_path / "curves.png")


def test_plot_curves_missing_key(tmp_path):
    with pytest.raises(ValueError, match="train_bound"):
        plots.plot_curves({"epoch": [1]}, tmp_path / "curves.png")


# plot_2d_samples


def test_plot_2d_samples_with_ellipses(tmp_path):
    data = torch.randn(300, 2) * torch.tensor([2.0, 0.5])
    samples = torch.randn(300, 3)
    ellipses = [
        (torch.zeros(2), torch.diag(torch.tensor([4.0, 0.25]))),
        (torch.tensor([1.0, -1.0]), torch.tensor([[1.0, 0.8], [0.8, 1.0]])),
    ]
    path = tmp_path / "a" / "b" / "scatter.png"
    plots.plot_2d_samples(data, samples, path, title="samples", ellipses=ellipses)
    assert read_png(path).shape[1:] == figure_size()


def test_plot_2d_samples_without_ellipses(tmp_path):
    path = tmp_path / "scatter.png"
    plots.plot_2d_samples(torch.randn(50, 2), torch.randn(80, 2), path)
    assert read_png(path).shape[1:] == figure_size()


def test_ellipse_geometry_matches_rotated_covariance():
    # covariance = R diag(3^2, 0.5^2) R^T with R the rotation by 30 degrees.
    theta = math.radians(30.0)
    rotation = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    covariance = rotation @ torch.diag(torch.tensor([9.0, 0.25])) @ rotation.T
    center, width, height, angle = plots._ellipse_geometry(torch.tensor([1.0, 2.0]), covariance, 0)
    assert center == (1.0, 2.0)
    assert width == pytest.approx(2 * 3.0, rel=1e-6)
    assert height == pytest.approx(2 * 0.5, rel=1e-6)
    # An eigenvector's sign is arbitrary, so the axis angle is defined modulo 180 degrees.
    assert math.isclose(angle % 180.0, 30.0, abs_tol=1e-4)


@pytest.mark.parametrize(
    "mean, covariance, match",
    [
        (torch.zeros(3), torch.eye(3), r"\(2,\) and \(2, 2\)"),
        (torch.zeros(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]]), "symmetric"),
        (torch.zeros(2), torch.tensor([[1.0, 2.0], [2.0, 1.0]]), "positive semi-definite"),
    ],
)
def test_plot_2d_samples_bad_ellipse(tmp_path, mean, covariance, match):
    with pytest.raises(ValueError, match=match):
        plots.plot_2d_samples(
            torch.randn(10, 2), torch.randn(10, 2), tmp_path / "scatter.png", ellipses=[(mean, covariance)]
        )


@pytest.mark.parametrize("data", [torch.randn(10), torch.randn(10, 1), torch.randn(2, 10, 2)])
def test_plot_2d_samples_bad_data(tmp_path, data):
    with pytest.raises(ValueError, match="D >= 2"):
        plots.plot_2d_samples(data, torch.randn(10, 2), tmp_path / "scatter.png")


# plot_histogram


def test_plot_histogram(tmp_path):
    path = tmp_path / "deep" / "hist.png"
    plots.plot_histogram(torch.randn(4, 250) - 90.0, path, xlabel="log p(x) (nats)", title="log-likelihood")
    assert read_png(path).shape[1:] == figure_size()


def test_plot_histogram_single_value(tmp_path):
    path = tmp_path / "hist.png"
    plots.plot_histogram(torch.tensor([3.0]), path, xlabel="x", bins=5)
    assert read_png(path).shape[1:] == figure_size()


@pytest.mark.parametrize(
    "values, bins, match",
    [
        (torch.tensor([1.0, float("nan"), 2.0]), 50, "isfinite"),
        (torch.tensor([1.0, float("inf")]), 50, "isfinite"),
        (torch.tensor([]), 50, "empty"),
        (torch.randn(10), 0, "bins"),
    ],
)
def test_plot_histogram_bad_values(tmp_path, values, bins, match):
    with pytest.raises(ValueError, match=match):
        plots.plot_histogram(values, tmp_path / "hist.png", xlabel="x", bins=bins)


# side effects


def test_plots_leave_pyplot_and_backend_alone(tmp_path):
    """Importing and using the module never imports pyplot, so no backend is switched and no figure leaks."""
    script = textwrap.dedent(
        f"""
        import sys
        import matplotlib
        backend = dict.__getitem__(matplotlib.rcParams, "backend")
        import torch
        from pyrovae.app import plots
        assert "matplotlib.pyplot" not in sys.modules
        out = {str(tmp_path)!r}
        plots.plot_curves({{"epoch": [1, 2], "train_bound": [-2.0, -1.0]}}, out + "/c.png")
        plots.plot_2d_samples(torch.randn(5, 2), torch.randn(5, 2), out + "/s.png",
                              ellipses=[(torch.zeros(2), torch.eye(2))])
        plots.plot_histogram(torch.randn(20), out + "/h.png", xlabel="x")
        plots.save_image_grid(torch.rand(3, 784), out + "/g.png")
        assert "matplotlib.pyplot" not in sys.modules
        assert dict.__getitem__(matplotlib.rcParams, "backend") == backend
        """
    )
    repo_root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for name in ("c.png", "s.png", "h.png", "g.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE
