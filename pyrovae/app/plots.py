"""Figures and image grids: sample grids, reconstructions, training curves, 2-D scatters, histograms.

Every function writes one PNG file, creating its parent folders. Figures are built as
:class:`matplotlib.figure.Figure` objects and rendered by the Agg canvas, so this module never imports
:mod:`matplotlib.pyplot`: importing it or calling it leaves a user's interactive backend and pyplot's
figure registry untouched, and no figure outlives the call.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch
import torchvision.utils
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse
from matplotlib.ticker import MaxNLocator
from torch import Tensor

__all__ = [
    "save_image_grid",
    "save_reconstructions",
    "plot_curves",
    "plot_2d_samples",
    "plot_2d_panels",
    "plot_step_curves",
    "plot_bar_panels",
    "plot_histogram",
]

PathLike = Union[str, os.PathLike]
#: ``(C, H, W)``; data sets carry any tuple, so other lengths are refused at run time (:func:`_as_image_batch`).
ImageShape = tuple[int, ...]

_FIGSIZE = (6.0, 4.0)
_DPI = 100
_N_STD = (1.0, 2.0)


def save_image_grid(
    images: Tensor,
    path: PathLike,
    image_shape: ImageShape = (1, 28, 28),
    nrow: int = 10,
    image_format: str = "png",
) -> None:
    """
    Save flattened images as one PNG (or JPEG) grid with :func:`torchvision.utils.save_image`.

    Images are tiled row by row, ``nrow`` per row, with torchvision's default padding of 2 pixels.
    Grey images are written as RGB PNGs (torchvision repeats the single channel). Values are
    expected in [0, 1]; values outside are clipped when converted to 8-bit pixels.

    :param images: tensor of shape ``(N, C * H * W)``, e.g. Bernoulli means ``sigmoid(logits)``.
    :param path: file to write; the format is ``image_format`` whatever the file's extension.
    :param image_shape: ``(C, H, W)`` of one image, with ``C`` equal to 1 (grey) or 3 (RGB).
    :param nrow: number of images per row of the grid.
    :param image_format: ``"png"`` or ``"jpeg"``.
    :raises ValueError: if ``images`` is not 2-D, is empty, or its feature count is not ``C * H * W``.
    """
    batch = _as_image_batch(images, image_shape, "images")
    nrow = _check_nrow(nrow)
    torchvision.utils.save_image(batch, _prepare_path(path), nrow=nrow, format=_check_format(image_format))


def save_reconstructions(
    originals: Tensor,
    reconstructions: Tensor,
    path: PathLike,
    image_shape: ImageShape = (1, 28, 28),
    nrow: int = 10,
) -> None:
    """
    Save originals and their reconstructions as one PNG grid of alternating rows.

    Rows ``0, 2, 4, ...`` hold up to ``nrow`` originals and the row below each holds their
    reconstructions in the same columns. When ``N`` is not a multiple of ``nrow`` the last pair of
    rows is filled with blank (black) tiles so that every reconstruction stays under its original.

    :param originals: tensor of shape ``(N, C * H * W)`` with values in [0, 1].
    :param reconstructions: tensor of the same shape as ``originals``, e.g. decoder means.
    :param path: file to write; the PNG format is used whatever the file's extension.
    :param image_shape: ``(C, H, W)`` of one image, with ``C`` equal to 1 (grey) or 3 (RGB).
    :param nrow: number of images per row of the grid.
    :raises ValueError: if either tensor has the wrong shape or their shapes differ.
    """
    if originals.shape != reconstructions.shape:
        raise ValueError(
            f"originals and reconstructions must have the same shape, got {tuple(originals.shape)} "
            f"and {tuple(reconstructions.shape)}; pass one reconstruction per original, in the same order"
        )
    originals = _as_image_batch(originals, image_shape, "originals")
    reconstructions = _as_image_batch(reconstructions, image_shape, "reconstructions")
    nrow = _check_nrow(nrow)

    blank = originals.new_zeros((1,) + tuple(image_shape))
    rows = []
    for start in range(0, originals.shape[0], nrow):
        for batch in (originals, reconstructions):
            row = batch[start : start + nrow]
            rows.append(torch.cat([row, blank.expand(nrow - row.shape[0], -1, -1, -1)]))
    grid = torch.cat(rows)
    assert grid.shape == (2 * nrow * math.ceil(originals.shape[0] / nrow),) + tuple(image_shape)
    torchvision.utils.save_image(grid, _prepare_path(path), nrow=nrow, format="png")


def plot_curves(history: Mapping[str, Any], path: PathLike, title: str | None = None) -> None:
    """
    Plot the training (and test) bound per epoch as one PNG line chart.

    :param history: mapping with ``"epoch"`` (list of ints), ``"train_bound"`` (list of floats, nats
        per data point, same length), optionally ``"test_bound"`` (same length; ``None`` entries, for
        epochs without a test evaluation, are skipped) and ``"bound_name"`` (e.g. ``"ELBO"`` or
        ``"IWAE (K=5)"``, used in the legend).
    :param path: file to write; the PNG format is used whatever the file's extension.
    :param title: figure title; defaults to the bound name when the history has one.
    :raises ValueError: if a required key is missing or the lists differ in length.
    """
    for key in ("epoch", "train_bound"):
        if key not in history:
            raise ValueError(
                f"history has no {key!r} entry (keys: {sorted(history)}); pass the history returned "
                f"by training, with 'epoch' and 'train_bound' lists"
            )
    epochs = [int(e) for e in history["epoch"]]
    train = [float(v) for v in history["train_bound"]]
    test_raw = history.get("test_bound")
    test = [None] * len(epochs) if test_raw is None else [None if v is None else float(v) for v in test_raw]
    if not (len(epochs) == len(train) == len(test)):
        raise ValueError(
            f"history lists differ in length: epoch {len(epochs)}, train_bound {len(train)}, "
            f"test_bound {len(test)}; record one value per epoch (use None for epochs without a test bound)"
        )
    bound_name = str(history.get("bound_name") or "bound")

    fig = _new_figure()
    ax = fig.add_subplot()
    ax.plot(epochs, train, marker="o", markersize=3, label=f"train {bound_name}")
    test_points = [(e, v) for e, v in zip(epochs, test) if v is not None]
    if test_points:
        test_epochs, test_values = zip(*test_points)
        ax.plot(test_epochs, test_values, marker="s", markersize=3, label=f"test {bound_name}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("bound (nats per data point)")
    if title is None and "bound_name" in history:
        title = bound_name
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    _save_figure(fig, path)


def plot_2d_samples(
    data: Tensor,
    samples: Tensor,
    path: PathLike,
    title: str | None = None,
    ellipses: Sequence[tuple[Tensor, Tensor]] | None = None,
    image_format: str = "png",
) -> None:
    """
    Scatter data against model samples in the plane of their first two coordinates.

    Meant for 2-D or generated data sets where an image grid makes no sense. Each optional
    ellipse is drawn at 1 and 2 standard deviations of a Gaussian with the given mean and
    covariance, i.e. the contours ``(x - mean)^T covariance^{-1} (x - mean) = k^2`` for ``k = 1, 2``.

    :param data: tensor of shape ``(N, D)`` with ``D >= 2``; only columns 0 and 1 are plotted.
    :param samples: tensor of shape ``(M, D')`` with ``D' >= 2``, e.g. draws from the model.
    :param path: file to write; the PNG format is used whatever the file's extension.
    :param title: figure title.
    :param ellipses: list of ``(mean, covariance)`` pairs of shapes ``(2,)`` and ``(2, 2)``, e.g. the
        components of a fitted mixture or the exact posterior of a linear-Gaussian model.
    :param image_format: ``"png"`` or ``"jpeg"`` (then ``path``'s extension is not read).
    :raises ValueError: if a tensor has the wrong shape or a covariance is not symmetric
        positive semi-definite.
    """
    fig = _new_figure()
    _draw_2d_samples(fig.add_subplot(), data, samples, title, ellipses)
    _save_figure(fig, path, _check_format(image_format))


def plot_2d_panels(
    panels: Sequence[Mapping[str, Any]],
    path: PathLike,
    ncols: int = 2,
    title: str | None = None,
) -> None:
    """
    Several :func:`plot_2d_samples` scatters side by side in one PNG, with the same axis limits.

    Each panel may also draw ``reference_ellipses`` (e.g. the true components) at 1 std as thick
    red lines under its own (thin, black) ellipses, so that a fit can be compared with the truth in
    place: where they agree, the black line runs inside the red band.

    :param panels: mappings with keys ``data`` and ``samples`` (tensors ``(N, D >= 2)``; ``samples``
        may be ``None``), optional ``title``, ``ellipses`` and ``reference_ellipses`` (lists of
        ``(mean, covariance)`` as in :func:`plot_2d_samples`), ``reference_label`` and
        ``legend_loc`` (a matplotlib legend location, default ``"best"``).
    :param path: file to write; the PNG format is used whatever the file's extension.
    :param ncols: panels per row.
    :param title: title of the whole figure.
    :raises ValueError: if there are no panels or a panel is malformed.
    """
    if not panels:
        raise ValueError("panels is empty; pass at least one mapping with 'data' and 'samples'")
    ncols = _check_nrow(ncols)
    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.0 * ncols, 4.0 * nrows), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).reshape(-1)
    for ax, panel in zip(axes, panels):
        if "data" not in panel:
            raise ValueError(f"every panel needs a 'data' entry, got keys {sorted(panel)}")
        _draw_2d_samples(
            ax,
            panel["data"],
            panel.get("samples"),
            panel.get("title"),
            panel.get("ellipses"),
            panel.get("reference_ellipses"),
            panel.get("reference_label", "truth (1 std)"),
            legend=dict(loc=panel.get("legend_loc", "best"), fontsize="small"),
        )
    # The same limits on every panel (shared axes would forbid the equal-aspect "datalim" mode).
    bounds = [ax.dataLim for ax in axes[: len(panels)]]
    (x0, x1), (y0, y1) = [(min(b.extents[i] for b in bounds), max(b.extents[i + 2] for b in bounds)) for i in (0, 1)]
    pad = 0.05 * max(x1 - x0, y1 - y0)
    for ax in axes[: len(panels)]:
        ax.set_xlim(x0 - pad, x1 + pad)
        ax.set_ylim(y0 - pad, y1 + pad)
        ax.set_aspect("equal", adjustable="box")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    _save_figure(fig, path)


def _draw_2d_samples(
    ax: Any,
    data: Tensor,
    samples: Tensor | None,
    title: str | None,
    ellipses: Sequence[tuple[Tensor, Tensor]] | None,
    reference_ellipses: Sequence[tuple[Tensor, Tensor]] | None = None,
    reference_label: str = "truth (1 std)",
    legend: Mapping[str, Any] | None = None,
) -> None:
    data_xy = _first_two_columns(data, "data")
    ax.scatter(data_xy[:, 0], data_xy[:, 1], s=6, alpha=0.5, color="tab:blue", label="data")
    if samples is not None:
        samples_xy = _first_two_columns(samples, "samples")
        ax.scatter(samples_xy[:, 0], samples_xy[:, 1], s=6, alpha=0.5, color="tab:orange", label="model samples")
    for i, (mean, covariance) in enumerate(reference_ellipses or []):
        center, width, height, angle = _ellipse_geometry(mean, covariance, i)
        ax.add_patch(
            Ellipse(
                center,
                width=width,
                height=height,
                angle=angle,
                fill=False,
                color="tab:red",
                alpha=0.7,
                linewidth=3.5,
                zorder=2.5,
                label=reference_label if i == 0 else None,
            )
        )
    for i, (mean, covariance) in enumerate(ellipses or []):
        center, width, height, angle = _ellipse_geometry(mean, covariance, i)
        for k, linestyle in zip(_N_STD, ("-", "--")):
            ax.add_patch(
                Ellipse(
                    center,
                    width=k * width,
                    height=k * height,
                    angle=angle,
                    fill=False,
                    color="black",
                    linestyle=linestyle,
                    linewidth=1.0,
                    zorder=3,
                    label=f"{k:g} std" if i == 0 else None,
                )
            )
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    # Equal units on both axes, so that a circular covariance is drawn as a circle.
    ax.set_aspect("equal", adjustable="datalim")
    if title:
        ax.set_title(title)
    ax.legend(**{"loc": "best", "markerscale": 2, **(legend or {})})


def plot_step_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: PathLike,
    ylabel: str,
    title: str | None = None,
    references: Sequence[tuple[str, float]] = (),
    zoom_ylim: tuple[float, float] | None = None,
    log_steps: bool = False,
) -> None:
    """
    Line charts of a quantity against the optimisation step, one line per run.

    :param curves: ``{label: (steps, values)}``.
    :param path: file to write; the PNG format is used whatever the file's extension.
    :param ylabel: label of the vertical axis, with units.
    :param title: figure title.
    :param references: ``(label, value)`` pairs drawn as horizontal lines (e.g. the truth's value).
    :param zoom_ylim: if given, a second panel shows the same curves with this vertical range, so
        that small differences near the optimum show.
    :param log_steps: a symmetric-log step axis in the first panel (linear below 1, so step 0 is
        shown), for curves evaluated on a geometric schedule; the zoom panel stays linear.
    :raises ValueError: if ``curves`` is empty or a curve's lists differ in length.
    """
    if not curves:
        raise ValueError("curves is empty; pass {label: (steps, values)}")
    for label, (steps, values) in curves.items():
        if len(steps) != len(values) or len(steps) == 0:
            raise ValueError(
                f"curve {label!r} has {len(steps)} steps and {len(values)} values; pass one value per step"
            )
    if zoom_ylim is not None and not zoom_ylim[0] < zoom_ylim[1]:
        raise ValueError(f"zoom_ylim must be (low, high) with low < high, got {zoom_ylim}")
    fig = Figure(figsize=(11.0 if zoom_ylim else 6.0, 4.0), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if zoom_ylim else 1, squeeze=False).reshape(-1)
    for i, ax in enumerate(axes):
        for label, (steps, values) in curves.items():
            ax.plot(
                [float(s) for s in steps],
                [float(v) for v in values],
                marker="o",
                markersize=2,
                linewidth=1.2,
                label=label,
            )
        for (label, value), linestyle in zip(references, itertools.cycle(["--", ":", "-."])):
            ax.axhline(value, color="black", linestyle=linestyle, linewidth=1.0, label=label)
        if log_steps and i == 0:
            ax.set_xscale("symlog", linthresh=1.0)
            ax.set_xlim(left=0)
        if i == 1:
            assert zoom_ylim is not None  # the second panel exists only with zoom_ylim
            ax.set_ylim(*zoom_ylim)
            ax.set_title("zoom (linear steps)" if log_steps else "zoom")
        elif title:
            ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="small")
    _save_figure(fig, path)


def plot_bar_panels(panels: Sequence[Mapping[str, Any]], path: PathLike, title: str | None = None) -> None:
    """
    Bar charts side by side: per panel, groups on the horizontal axis and one bar per series,
    side by side or stacked.

    :param panels: mappings with ``groups`` (list of group names), ``series`` (``{label: values}``,
        one value per group), optional ``stacked`` (bool), ``annotate`` (write each bar's value on
        it, if at least 0.05), ``ylabel``, ``title``, ``ylim`` and
        ``markers`` (``{label: values}`` drawn as black ticks over the bars of the series ``label``,
        e.g. the exact value a bar estimates) with their legend entry ``marker_label``.
    :param path: file to write; the PNG format is used whatever the file's extension.
    :param title: title of the whole figure.
    :raises ValueError: if there are no panels or a series does not have one value per group.
    """
    if not panels:
        raise ValueError("panels is empty; pass at least one mapping with 'groups' and 'series'")
    fig = Figure(figsize=(5.5 * len(panels), 4.0), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False).reshape(-1)
    for ax, panel in zip(axes, panels):
        groups = list(panel["groups"])
        series = {label: [float(v) for v in values] for label, values in panel["series"].items()}
        for label, values in series.items():
            if len(values) != len(groups):
                raise ValueError(f"series {label!r} has {len(values)} values for {len(groups)} groups")
        stacked = bool(panel.get("stacked", False))
        width = 0.8 if stacked else 0.8 / max(len(series), 1)
        bottom = [0.0] * len(groups)
        marked = False
        for j, (label, values) in enumerate(series.items()):
            xs = list(range(len(groups))) if stacked else [g - 0.4 + (j + 0.5) * width for g in range(len(groups))]
            bars = ax.bar(xs, values, width=width, bottom=bottom if stacked else None, label=label)
            if panel.get("annotate"):
                ax.bar_label(
                    bars,
                    labels=[f"{v:.3g}" if abs(v) >= 0.05 else "" for v in values],
                    label_type="center" if stacked else "edge",
                    fontsize="small",
                )
            if stacked:
                bottom = [b + v for b, v in zip(bottom, values)]
            marks = (panel.get("markers") or {}).get(label)
            if marks is not None:
                ax.scatter(
                    xs,
                    [float(m) for m in marks],
                    marker="_",
                    s=300,
                    color="black",
                    zorder=3,
                    label=None if marked else panel.get("marker_label", "exact value"),
                )
                marked = True
        ax.set_xticks(range(len(groups)), groups)
        if panel.get("ylim") is not None:
            ax.set_ylim(*panel["ylim"])
        ax.set_ylabel(panel.get("ylabel", ""))
        if panel.get("title"):
            ax.set_title(panel["title"])
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    _save_figure(fig, path)


def plot_histogram(
    values: Tensor,
    path: PathLike,
    xlabel: str,
    title: str | None = None,
    bins: int = 50,
) -> None:
    """
    Plot a histogram of values with their mean marked by a vertical line.

    :param values: tensor of any shape; all entries are pooled, e.g. per-point log-likelihoods.
    :param path: file to write; the PNG format is used whatever the file's extension.
    :param xlabel: label of the horizontal axis, with units (e.g. ``"log p(x) (nats)"``).
    :param title: figure title.
    :param bins: number of equal-width bins.
    :raises ValueError: if ``values`` is empty or holds NaN or infinite entries, or ``bins < 1``.
    """
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}")
    flat = values.detach().reshape(-1).to("cpu", torch.float64)
    if flat.numel() == 0:
        raise ValueError("values is empty; pass at least one value to plot a histogram")
    finite = torch.isfinite(flat)
    if not bool(finite.all()):
        raise ValueError(
            f"values holds {int((~finite).sum())} NaN or infinite entries; "
            f"drop them first with values[torch.isfinite(values)]"
        )
    mean = float(flat.mean())

    fig = _new_figure()
    ax = fig.add_subplot()
    ax.hist(flat.numpy(), bins=bins, color="tab:blue", alpha=0.7)
    ax.axvline(mean, color="black", linestyle="--", label=f"mean = {mean:.4g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    if title:
        ax.set_title(title)
    ax.legend()
    _save_figure(fig, path)


def _prepare_path(path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _check_nrow(nrow: int) -> int:
    if not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow must be a positive int, got {nrow!r}")
    return nrow


def _as_image_batch(images: Tensor, image_shape: ImageShape, name: str) -> Tensor:
    """Check ``images`` of shape ``(N, C*H*W)`` and return a detached CPU ``(N, C, H, W)`` float copy."""
    if len(image_shape) != 3 or not all(isinstance(s, int) and s > 0 for s in image_shape):
        raise ValueError(f"image_shape must be three positive ints (C, H, W), got {image_shape!r}")
    if image_shape[0] not in (1, 3):
        raise ValueError(f"image_shape has {image_shape[0]} channels; pass 1 (grey) or 3 (RGB) channels as (C, H, W)")
    if images.dim() != 2:
        raise ValueError(
            f"{name} must have shape (N, C*H*W), got {tuple(images.shape)}; "
            f"flatten each image with {name}.reshape(len({name}), -1)"
        )
    num_features = math.prod(image_shape)
    if images.shape[1] != num_features:
        raise ValueError(
            f"{name} has {images.shape[1]} features per row but image_shape {tuple(image_shape)} needs "
            f"{num_features}; pass the image_shape (C, H, W) the data was flattened from"
        )
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty; pass at least one image")
    return images.detach().to("cpu", torch.float32).reshape((-1,) + tuple(image_shape))


def _first_two_columns(points: Tensor, name: str) -> Tensor:
    if points.dim() != 2 or points.shape[1] < 2:
        raise ValueError(
            f"{name} must have shape (N, D) with D >= 2, got {tuple(points.shape)}; "
            f"plot_2d_samples shows columns 0 and 1 of two-dimensional (or higher) points"
        )
    return points.detach()[:, :2].to("cpu", torch.float64)


def _ellipse_geometry(mean: Tensor, covariance: Tensor, index: int) -> tuple[tuple[float, float], float, float, float]:
    """Return center, 1-std width and height, and angle in degrees of a 2-D Gaussian's contour."""
    mean = torch.as_tensor(mean).detach().to("cpu", torch.float64)
    covariance = torch.as_tensor(covariance).detach().to("cpu", torch.float64)
    if mean.shape != (2,) or covariance.shape != (2, 2):
        raise ValueError(
            f"ellipses[{index}] must be (mean, covariance) of shapes (2,) and (2, 2), got "
            f"{tuple(mean.shape)} and {tuple(covariance.shape)}; slice them to the first two coordinates"
        )
    scale = float(covariance.abs().max())
    if not torch.allclose(covariance, covariance.T, rtol=1e-5, atol=1e-8 * max(scale, 1.0)):
        raise ValueError(f"ellipses[{index}] covariance is not symmetric; pass (cov + cov.T) / 2")
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    if float(eigenvalues[0]) < -1e-8 * max(scale, 1.0):
        raise ValueError(
            f"ellipses[{index}] covariance has a negative eigenvalue {float(eigenvalues[0]):.3g}; "
            f"pass a positive semi-definite covariance matrix, not e.g. a precision or a Cholesky factor"
        )
    std = eigenvalues.clamp(min=0.0).sqrt()
    major = eigenvectors[:, 1]  # eigh sorts eigenvalues in ascending order
    angle = math.degrees(math.atan2(float(major[1]), float(major[0])))
    return (float(mean[0]), float(mean[1])), 2.0 * float(std[1]), 2.0 * float(std[0]), angle


def _new_figure() -> Figure:
    fig = Figure(figsize=_FIGSIZE, dpi=_DPI, layout="constrained")
    # An explicit Agg canvas renders without touching pyplot or the user's selected backend.
    FigureCanvasAgg(fig)
    return fig


def _check_format(image_format: str) -> str:
    if image_format not in ("png", "jpeg"):
        raise ValueError(f"image_format={image_format!r} is not 'png' or 'jpeg'")
    return image_format


def _save_figure(fig: Figure, path: PathLike, image_format: str = "png") -> None:
    try:
        fig.savefig(_prepare_path(path), format=image_format, dpi=_DPI)
    finally:
        # Not registered with pyplot, so nothing holds the figure once its artists are dropped.
        fig.clear()
