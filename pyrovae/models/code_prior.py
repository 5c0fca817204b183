r"""An autoregressive prior over grids of discrete codes (a small PixelCNN), fitted after a VQ-VAE.

p(c) = Π_{i,j} p(c_ij | c_{<ij}) in raster order, each factor a categorical over the K codes whose
logits come from masked convolutions (van den Oord et al. 2016): the first layer (mask "A") sees
only the cells before (i, j), later layers (mask "B") also their own position's features, so the
output at (i, j) depends on c_{<ij} alone. An optional ``condition`` (e.g. the top-level codes of
VQ-VAE-2, brought to this grid) is added to the features of every layer; it may depend on anything
but this grid.

As a Pyro model, :class:`CodePrior` observes the code grid at site ``"codes"`` inside the data plate,
so ``pyro.infer.SVI`` with an empty guide and ``Trace_ELBO`` is maximum likelihood, and
:func:`pyrovae.fit` trains it like any other model (:func:`fit_code_prior`).

**References**

- [1] A. van den Oord, N. Kalchbrenner, K. Kavukcuoglu, "Pixel Recurrent Neural Networks", ICML 2016.
- [2] A. van den Oord et al., "Neural Discrete Representation Learning", NeurIPS 2017.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from pyrovae.handlers import data_plate
from pyrovae.params import register

__all__ = ["CodePrior", "ConditionalCodePrior", "MaskedConv2d", "empty_guide"]


class MaskedConv2d(nn.Conv2d):
    """A convolution that sees only the cells before the centre in raster order (mask ``"A"``),
    or those and the centre (mask ``"B"``)."""

    mask: torch.Tensor  # a registered buffer

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, mask: str) -> None:
        if mask not in ("A", "B"):
            raise ValueError(f"mask must be 'A' or 'B', got {mask!r}")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        centre = kernel_size // 2
        m = torch.ones_like(self.weight)
        m[:, :, centre, centre + (mask == "B") :] = 0
        m[:, :, centre + 1 :] = 0
        self.register_buffer("mask", m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class _PixelCNN(nn.Module):
    def __init__(self, num_codes: int, channels: int, layers: int, condition_channels: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_codes, channels)
        self.first = MaskedConv2d(channels, channels, 5, "A")
        self.hidden = nn.ModuleList(MaskedConv2d(channels, channels, 3, "B") for _ in range(layers))
        self.condition = nn.Conv2d(condition_channels, channels, 1) if condition_channels else None
        self.out = nn.Conv2d(channels, num_codes, 1)

    def forward(self, codes: torch.Tensor, condition: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.embed(codes).permute(0, 3, 1, 2)
        c = self.condition(condition) if self.condition is not None and condition is not None else 0
        h = F.relu(self.first(h) + c)
        for layer in self.hidden:
            h = F.relu(layer(h) + c) + h
        return self.out(h).permute(0, 2, 3, 1)  # (B, H, W, K)


class CodePrior:
    """p(c) over ``(H, W)`` grids of K codes, autoregressive in raster order (see the module
    docstring), as a Pyro model with the pyrovae signature ``(x, index, num_data)``: ``x`` holds
    the code grids flattened to ``(B, H·W)`` (as floats, so :func:`pyrovae.fit` can batch them).

    :param num_codes: K.
    :param grid: ``(H, W)``.
    :param channels: feature channels of the masked convolutions.
    :param layers: masked 3×3 layers after the first 5×5 one.
    :param condition_channels: channels of an optional per-cell condition (0: none).
    :param name: ``pyro.module`` name.
    """

    amortized = True

    def __init__(
        self,
        num_codes: int,
        grid: Sequence[int],
        channels: int = 64,
        layers: int = 4,
        condition_channels: int = 0,
        name: str = "code_prior",
    ) -> None:
        self.num_codes = int(num_codes)
        self.grid = tuple(int(g) for g in grid)
        self.net = _PixelCNN(self.num_codes, channels, layers, condition_channels)
        self.name = name
        # fit() saves the networks it finds under "decoder"/"encoder"; the prior's is its decoder.
        self.decoder = self.net

    def logits(self, codes: torch.Tensor, condition: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, H, W, K)`` logits of p(c_ij | c_{<ij}) for integer grids ``(B, H, W)``."""
        return self.net(codes, condition)

    def __call__(
        self,
        x: Optional[torch.Tensor] = None,
        index: Optional[torch.Tensor] = None,
        num_data: Optional[int] = None,
        condition: Optional[torch.Tensor] = None,
    ) -> Any:
        register(self.name, self.net)
        if x is None:
            raise ValueError("CodePrior scores code grids; use .sample(n) to draw new ones")
        codes = x.round().long().reshape(-1, *self.grid)
        if codes.min() < 0 or codes.max() >= self.num_codes:
            raise ValueError(
                f"codes must lie in [0, {self.num_codes - 1}], got [{int(codes.min())}, {int(codes.max())}]"
            )
        with data_plate(x, index, num_data):
            fn = dist.Categorical(logits=self.logits(codes, condition)).to_event(2)
            pyro.sample("codes", fn, obs=codes)

    @torch.no_grad()
    def log_prob(self, codes: torch.Tensor, condition: Optional[torch.Tensor] = None) -> torch.Tensor:
        """log p(c) per grid ``(B,)``, in nats."""
        return dist.Categorical(logits=self.logits(codes, condition)).log_prob(codes).sum((-2, -1))

    @torch.no_grad()
    def sample(
        self,
        num: int,
        device: torch.device | str = "cpu",
        condition: Optional[torch.Tensor] = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Draw ``num`` code grids ``(num, H, W)`` cell by cell in raster order."""
        if num < 1:
            raise ValueError(f"num must be at least 1, got {num}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        codes = torch.zeros(num, *self.grid, dtype=torch.long, device=device)
        for i in range(self.grid[0]):
            for j in range(self.grid[1]):
                logits = self.logits(codes, condition)[:, i, j] / temperature
                codes[:, i, j] = torch.distributions.Categorical(logits=logits).sample()
        return codes


def empty_guide(
    x: Optional[torch.Tensor] = None, index: Optional[torch.Tensor] = None, num_data: Optional[int] = None
) -> None:
    """The guide of a model without latent sites: SVI with it is maximum likelihood."""
    return None


class ConditionalCodePrior(CodePrior):
    """p(c | c') over a grid, given a coarser grid c' of codes (VQ-VAE-2's bottom prior given the
    top codes): the one-hot c', resized to this grid (nearest), is the per-cell condition of
    :class:`CodePrior`. As a Pyro model, ``x`` holds both grids flattened, this grid's codes first.

    :param cond_num_codes: the number of codes of the conditioning grid.
    :param cond_grid: its shape.
    """

    def __init__(
        self,
        num_codes: int,
        grid: Sequence[int],
        cond_num_codes: int,
        cond_grid: Sequence[int],
        channels: int = 64,
        layers: int = 4,
        name: str = "code_prior_bottom",
    ) -> None:
        super().__init__(num_codes, grid, channels, layers, condition_channels=cond_num_codes, name=name)
        self.cond_num_codes = int(cond_num_codes)
        self.cond_grid = tuple(int(g) for g in cond_grid)

    def condition_from(self, cond_codes: torch.Tensor) -> torch.Tensor:
        """``(B, K', H, W)`` one-hot of the conditioning codes ``(B, H', W')`` resized to this grid."""
        one_hot = F.one_hot(cond_codes, self.cond_num_codes).permute(0, 3, 1, 2).float()
        return F.interpolate(one_hot, size=self.grid, mode="nearest")

    def __call__(  # type: ignore[override]  # on purpose: the condition comes from x, not from a keyword
        self,
        x: Optional[torch.Tensor] = None,
        index: Optional[torch.Tensor] = None,
        num_data: Optional[int] = None,
    ) -> Any:
        if x is None:
            raise ValueError("ConditionalCodePrior scores code grids; use .sample(condition_codes) to draw")
        cells = self.grid[0] * self.grid[1]
        cond = x[..., cells:].round().long().reshape(-1, *self.cond_grid)
        return super().__call__(x[..., :cells], index, num_data, condition=self.condition_from(cond))

    @torch.no_grad()
    def sample_given(self, cond_codes: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """One grid per conditioning grid ``(B, H', W')``."""
        return self.sample(cond_codes.shape[0], cond_codes.device, self.condition_from(cond_codes), temperature)
