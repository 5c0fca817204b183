r"""The quadrant task of Sohn, Lee & Yan (2015) and Pyro's ``examples/cvae``: an image is cut into
four quadrants, 1, 2 or 3 of which are observed (x_obs) and the others are to be predicted (y).

A data row stays the whole image, ``(..., D)`` with D = height × width; a fixed boolean mask
(:func:`quadrant_mask`, ``True`` = observed) splits it (:func:`split_quadrants`) into

- ``x_obs``: the whole row with the unobserved pixels set to :data:`UNOBSERVED` (-1), as the
  networks of Pyro's example read it, and
- ``y``: the unobserved pixels alone, ``(..., D_y)``, in row-major order,

and :func:`join_quadrants` puts the two back together. The quadrants are observed in Pyro's order
(:data:`QUADRANT_ORDER`): 1 → bottom-left; 2 → the left half; 3 → all but the bottom-right.

**References**

- [1] K. Sohn, H. Lee, X. Yan, "Learning Structured Output Representation using Deep Conditional
  Generative Models", NeurIPS 2015.
- [2] Pyro example ``examples/cvae`` (``util.py``'s ``MaskImages``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: The quadrants in the order they become observed: (row half, column half), 0 = top/left, 1 = bottom/right.
QUADRANT_ORDER: tuple[tuple[int, int], ...] = ((1, 0), (0, 0), (0, 1), (1, 1))

#: The value of an unobserved pixel in ``x_obs`` (Pyro's ``mask_with``).
UNOBSERVED = -1.0

#: The numbers of observed quadrants the task has.
QUADRANT_CHOICES: tuple[int, ...] = (1, 2, 3)


def _height_width(image_shape: Sequence[int]) -> tuple[int, int]:
    shape = tuple(int(s) for s in image_shape)
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2 or min(shape) < 2:
        raise ValueError(
            f"image_shape must be (height, width) or (1, height, width), each >= 2, got {tuple(image_shape)}"
        )
    return shape


def quadrant_mask(num_quadrants: int, image_shape: Sequence[int] = (28, 28)) -> torch.Tensor:
    """The flat boolean mask ``(height * width,)`` of the observed pixels, ``True`` where observed.

    An odd side splits at ``side // 2`` (Pyro's ``h // 2``): the bottom/right halves are the larger.

    :param num_quadrants: how many quadrants are observed, 1, 2 or 3 (:data:`QUADRANT_ORDER`).
    :param image_shape: ``(height, width)`` or ``(1, height, width)``.
    """
    if num_quadrants not in QUADRANT_CHOICES:
        raise ValueError(
            f"num_quadrants must be 1, 2 or 3 (how many of the four quadrants are observed), got {num_quadrants!r}"
        )
    height, width = _height_width(image_shape)
    rows = (slice(0, height // 2), slice(height // 2, height))
    cols = (slice(0, width // 2), slice(width // 2, width))
    mask = torch.zeros(height, width, dtype=torch.bool)
    for row, col in QUADRANT_ORDER[:num_quadrants]:
        mask[rows[row], cols[col]] = True
    return mask.reshape(-1)


def split_quadrants(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_obs, y)`` of whole rows ``x`` ``(..., D)``: ``x_obs`` ``(..., D)`` with the unobserved
    pixels set to :data:`UNOBSERVED`, ``y`` ``(..., D_y)`` the unobserved pixels.

    :param mask: ``(D,)`` boolean, ``True`` where observed (:func:`quadrant_mask`).
    """
    mask = _check_mask(x, mask)
    x_obs = torch.where(mask, x, torch.full_like(x, UNOBSERVED))
    y = x[..., ~mask]
    assert y.shape == (*x.shape[:-1], int((~mask).sum()))
    return x_obs, y


def join_quadrants(x_obs: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The whole rows ``(..., D)``: ``x_obs``'s observed pixels and ``y`` in the unobserved ones (the
    inverse of :func:`split_quadrants`; ``x_obs`` and ``y`` broadcast, e.g. samples ``(S, B, D_y)``
    against ``(B, D)``)."""
    mask = _check_mask(x_obs, mask)
    if y.shape[-1] != int((~mask).sum()):
        raise ValueError(f"y has {y.shape[-1]} pixels; the mask leaves {int((~mask).sum())} unobserved")
    shape = torch.broadcast_shapes(x_obs.shape[:-1], y.shape[:-1])
    out = x_obs.expand(*shape, x_obs.shape[-1]).clone()
    out[..., ~mask] = y.expand(*shape, y.shape[-1]).to(out.dtype)
    return out


def _check_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype != torch.bool or mask.dim() != 1:
        raise ValueError(f"mask must be a 1-D boolean tensor (True = observed), got {mask.dtype} {tuple(mask.shape)}")
    if x.shape[-1] != mask.shape[0]:
        raise ValueError(f"x has {x.shape[-1]} features but the mask has {mask.shape[0]}: pass whole images")
    return mask.to(x.device)


__all__ = ["QUADRANT_CHOICES", "QUADRANT_ORDER", "UNOBSERVED", "join_quadrants", "quadrant_mask", "split_quadrants"]
