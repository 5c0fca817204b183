"""Plain ``torch.nn`` encoders and decoders. They know nothing about Pyro.

The models and guides in :mod:`pyrovae.models` and :mod:`pyrovae.guides` register these networks
with ``pyro.module``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "gelu": nn.GELU,
}


def _activation(name: str) -> type[nn.Module]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}"
        ) from None


class MLP(nn.Sequential):
    """A multi-layer perceptron ``in_dim -> hidden_sizes... -> out_dim`` with a hidden activation
    and a linear output layer.

    :param in_dim: input features.
    :param hidden_sizes: width of each hidden layer (may be empty: a linear map).
    :param out_dim: output features.
    :param activation: one of :data:`ACTIVATIONS`.
    """

    def __init__(
        self, in_dim: int, hidden_sizes: Sequence[int], out_dim: int, activation: str = "relu"
    ) -> None:
        act = _activation(activation)
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), *(("hidden size", h) for h in hidden_sizes)):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        layers: list[nn.Module] = []
        sizes = [in_dim, *hidden_sizes]
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(n_in, n_out), act()]
        layers.append(nn.Linear(sizes[-1], out_dim))
        super().__init__(*layers)


class GaussianEncoder(nn.Module):
    """The amortized encoder of a diagonal Gaussian q_φ(z|x) = N(z_loc(x), diag z_scale(x)²).

    :param x_dim: data features.
    :param z_dim: latent dimension.
    :param hidden_sizes: hidden layer widths of the MLP.
    :param activation: hidden activation.
    :param min_scale: floor added to the softplus scale so ``log q`` stays finite.
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        hidden_sizes: Sequence[int] = (400,),
        activation: str = "relu",
        min_scale: float = 1e-4,
    ) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.min_scale = min_scale
        self.net = MLP(x_dim, hidden_sizes, 2 * z_dim, activation)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_loc, z_scale_raw = self.net(x).split(self.z_dim, dim=-1)
        return z_loc, F.softplus(z_scale_raw) + self.min_scale


class Decoder(MLP):
    """The decoder f_θ(z): Bernoulli logits or Gaussian means of p_θ(x|z)."""

    def __init__(
        self, z_dim: int, x_dim: int, hidden_sizes: Sequence[int] = (400,), activation: str = "relu"
    ) -> None:
        super().__init__(z_dim, hidden_sizes, x_dim, activation)
        self.z_dim = z_dim
        self.x_dim = x_dim
