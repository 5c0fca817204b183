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


class HierarchicalDecoder(nn.Module):
    """The networks of a VAE with L stochastic layers z_1 (next to x), ..., z_L (top):
    a Gaussian MLP p(z_l | z_{l+1}) for each l < L and the decoder f_θ(z_1) of p(x | z_1).

    ``forward(z_1)`` is the decoder, so :meth:`pyrovae.models.VAE.decode` works unchanged.

    :param x_dim: data features.
    :param z_dims: latent sizes from the bottom (z_1) to the top (z_L), e.g. ``(100, 50)``.
    :param hidden_sizes: hidden widths between z_1 and x.
    :param upper_hidden_sizes: hidden widths of every p(z_l | z_{l+1}).
    :param activation: hidden activation.
    """

    def __init__(
        self,
        x_dim: int,
        z_dims: Sequence[int],
        hidden_sizes: Sequence[int] = (200, 200),
        upper_hidden_sizes: Sequence[int] = (100, 100),
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        if len(z_dims) < 2:
            raise ValueError(f"a hierarchical VAE needs at least two latent layers, got z_dims={tuple(z_dims)}")
        self.z_dims = tuple(int(d) for d in z_dims)
        self.x_dim = x_dim
        self.z_dim = self.z_dims[0]
        self.decoder = Decoder(self.z_dims[0], x_dim, hidden_sizes, activation)
        self.priors = nn.ModuleList(
            GaussianEncoder(self.z_dims[level + 1], self.z_dims[level], upper_hidden_sizes, activation)
            for level in range(len(self.z_dims) - 1)
        )

    def forward(self, z1: torch.Tensor) -> torch.Tensor:
        return self.decoder(z1)


class HierarchicalEncoder(nn.Module):
    """The inference networks q(z_1 | x) and q(z_{l+1} | z_l) of a hierarchical VAE (bottom-up, as
    in Burda et al. 2016), each a diagonal Gaussian MLP.

    :param x_dim: data features.
    :param z_dims: latent sizes from the bottom (z_1) to the top (z_L).
    :param hidden_sizes: hidden widths between x and z_1.
    :param upper_hidden_sizes: hidden widths of every q(z_{l+1} | z_l).
    :param activation: hidden activation.
    """

    def __init__(
        self,
        x_dim: int,
        z_dims: Sequence[int],
        hidden_sizes: Sequence[int] = (200, 200),
        upper_hidden_sizes: Sequence[int] = (100, 100),
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        if len(z_dims) < 2:
            raise ValueError(f"a hierarchical VAE needs at least two latent layers, got z_dims={tuple(z_dims)}")
        self.z_dims = tuple(int(d) for d in z_dims)
        sizes = (x_dim, *self.z_dims)
        self.nets = nn.ModuleList(
            GaussianEncoder(sizes[level], sizes[level + 1], hidden_sizes if level == 0 else upper_hidden_sizes, activation)
            for level in range(len(self.z_dims))
        )
