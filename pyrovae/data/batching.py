"""Shuffled index batches over a data set held as one tensor."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from pyrovae.data.dataset import Device


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
