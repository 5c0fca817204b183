"""Plain ``torch.nn`` encoders and decoders. They know nothing about Pyro.

The models and guides in :mod:`pyrovae.models` and :mod:`pyrovae.guides` register these networks
with ``pyro.module``.
"""

from __future__ import annotations

from collections.abc import Sequence

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
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


class MLP(nn.Sequential):
    """A multi-layer perceptron ``in_dim -> hidden_sizes[0] -> … -> out_dim`` with a hidden
    activation and a linear output layer.

    :param in_dim: input features.
    :param hidden_sizes: width of each hidden layer (may be empty: a linear map).
    :param out_dim: output features.
    :param activation: one of :data:`ACTIVATIONS`.
    """

    def __init__(self, in_dim: int, hidden_sizes: Sequence[int], out_dim: int, activation: str = "relu") -> None:
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
        self.net: nn.Sequential = MLP(x_dim, hidden_sizes, 2 * z_dim, activation)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_loc, z_scale_raw = self.net(x).split(self.z_dim, dim=-1)
        return z_loc, F.softplus(z_scale_raw) + self.min_scale


class ZeroLinear(nn.Linear):
    """A linear layer that starts at zero (weights and bias), also under :func:`glorot_init_`: a head
    whose output should start at nothing, e.g. the off-diagonal entries of a Cholesky factor."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class FullCovEncoder(nn.Module):
    """The amortized encoder of a full-covariance Gaussian q_φ(z|x) = N(z_loc(x), L(x) L(x)ᵀ).

    ``forward(x)`` returns ``(z_loc, scale_tril)``: the lower-triangular Cholesky factor ``L`` has a
    softplus diagonal (plus ``min_scale``) and free entries below it, ``z_dim (z_dim + 3) / 2``
    outputs in all. The entries below the diagonal come from their own head on the last hidden
    layer, a :class:`ZeroLinear`: the encoder starts as a diagonal Gaussian one. From a random
    start instead, the off-diagonal terms add up along each row of L, so the later coordinates of z
    start with larger variances (up to 2.5 times the first's under Glorot init), and MNIST VAEs
    learn markedly slower.
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
        self.num_off_diagonal = z_dim * (z_dim - 1) // 2
        self.net = MLP(x_dim, hidden_sizes, 2 * z_dim, activation)
        features = hidden_sizes[-1] if len(hidden_sizes) else x_dim
        self.off_diagonal = ZeroLinear(features, self.num_off_diagonal)
        rows, cols = torch.tril_indices(z_dim, z_dim, offset=-1)
        self.register_buffer("_below", rows * z_dim + cols, persistent=False)  # flat positions under the diagonal

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        *layers, last = self.net
        hidden = x
        for layer in layers:  # to the MLP's last hidden layer (x itself for a linear map)
            hidden = layer(hidden)
        z_loc, diagonal = last(hidden).split([self.z_dim, self.z_dim], dim=-1)
        below = self.off_diagonal(hidden)
        flat = below.new_zeros(*below.shape[:-1], self.z_dim * self.z_dim).index_copy(-1, self._below, below)
        scale_tril = flat.unflatten(-1, (self.z_dim, self.z_dim)) + torch.diag_embed(
            F.softplus(diagonal) + self.min_scale
        )
        return z_loc, scale_tril


class ContextGaussianEncoder(nn.Module):
    """The encoder of a flow guide: the base Gaussian's ``(z_loc, z_scale)`` and a context vector
    ``h(x)`` that conditions the flow's layers, ``forward(x) -> (z_loc, z_scale, h)``.

    :param context_dim: size of ``h`` (the flow's hypernetworks read it).
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        hidden_sizes: Sequence[int] = (400,),
        context_dim: int = 16,
        activation: str = "relu",
        min_scale: float = 1e-4,
    ) -> None:
        super().__init__()
        if int(context_dim) < 1:
            raise ValueError(f"context_dim must be a positive integer, got {context_dim}")
        self.z_dim = z_dim
        self.context_dim = int(context_dim)
        self.min_scale = min_scale
        self.net = MLP(x_dim, hidden_sizes, 2 * z_dim + self.context_dim, activation)
        self.context_activation = _activation(activation)()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z_loc, z_scale_raw, h = self.net(x).split([self.z_dim, self.z_dim, self.context_dim], dim=-1)
        return z_loc, F.softplus(z_scale_raw) + self.min_scale, self.context_activation(h)


class Decoder(MLP):
    """The decoder f_θ(z): Bernoulli logits or Gaussian means of p_θ(x|z)."""

    def __init__(self, z_dim: int, x_dim: int, hidden_sizes: Sequence[int] = (400,), activation: str = "relu") -> None:
        super().__init__(z_dim, hidden_sizes, x_dim, activation)
        self.z_dim = z_dim
        self.x_dim = x_dim


def _latent_dims(z_dims: Sequence[int]) -> tuple[int, ...]:
    dims = tuple(int(d) for d in z_dims)
    if len(dims) < 2 or min(dims) < 1:
        raise ValueError(f"a hierarchical VAE needs at least two latent layers of positive size, got z_dims={dims}")
    return dims


class HierarchicalDecoder(nn.Module):
    """The networks of a VAE with L stochastic layers z_1 (next to x), ..., z_L (top):
    a Gaussian MLP p(z_l | z_{l+1}) for each l < L and the decoder f_θ(z_1) of p(x | z_1).

    ``forward(z_1)`` is the decoder, so :meth:`pyrovae.models.VAE.decode` works unchanged.

    :param x_dim: data features.
    :param z_dims: latent sizes from the bottom (z_1) to the top (z_L), e.g. ``(100, 50)``.
    :param hidden_sizes: hidden widths between z_1 and x.
    :param upper_hidden_sizes: hidden widths of every p(z_l | z_{l+1}).
    :param activation: hidden activation.
    :param image_shape: with it, the x-level network is convolutional (:class:`ConvDecoder` /
        :class:`ConvGaussianEncoder`, dense width ``hidden_sizes[0]``).
    """

    def __init__(
        self,
        x_dim: int,
        z_dims: Sequence[int],
        hidden_sizes: Sequence[int] = (200, 200),
        upper_hidden_sizes: Sequence[int] = (100, 100),
        activation: str = "tanh",
        image_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.z_dims = _latent_dims(z_dims)
        self.x_dim = x_dim
        self.z_dim = self.z_dims[0]
        self.decoder: nn.Module = (
            Decoder(self.z_dims[0], x_dim, hidden_sizes, activation)
            if image_shape is None
            else ConvDecoder(self.z_dims[0], image_shape, _conv_width(hidden_sizes), activation=activation)
        )
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
    :param image_shape: with it, the x-level network is convolutional (:class:`ConvDecoder` /
        :class:`ConvGaussianEncoder`, dense width ``hidden_sizes[0]``).
    """

    def __init__(
        self,
        x_dim: int,
        z_dims: Sequence[int],
        hidden_sizes: Sequence[int] = (200, 200),
        upper_hidden_sizes: Sequence[int] = (100, 100),
        activation: str = "tanh",
        image_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.z_dims = _latent_dims(z_dims)
        sizes = (x_dim, *self.z_dims)
        first: nn.Module = (
            GaussianEncoder(x_dim, self.z_dims[0], hidden_sizes, activation)
            if image_shape is None
            else ConvGaussianEncoder(image_shape, self.z_dims[0], _conv_width(hidden_sizes), activation=activation)
        )
        self.nets = nn.ModuleList(
            [first]
            + [
                GaussianEncoder(sizes[level], sizes[level + 1], upper_hidden_sizes, activation)
                for level in range(1, len(self.z_dims))
            ]
        )


def _image_dims(image_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in image_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape must be (channels, height, width) or (height, width), got {tuple(image_shape)}")
    channels, height, width = shape
    if height % 4 or width % 4:
        raise ValueError(
            f"the convolutional networks halve the image twice, so height and width must be multiples of 4; "
            f"got {height}x{width}"
        )
    return channels, height, width


class ConvTrunk(nn.Module):
    """Flattened images ``(..., C·H·W)`` → features ``(..., out_dim)``: two stride-2 4×4
    convolutions (``channels``), then a dense layer. Any leading batch dims (particles, plates)
    are folded into one for the convolutions and restored after."""

    def __init__(
        self, image_shape: Sequence[int], out_dim: int, channels: Sequence[int] = (32, 64), activation: str = "relu"
    ) -> None:
        super().__init__()
        self.image_shape = _image_dims(image_shape)
        c, h, w = self.image_shape
        c1, c2 = (int(v) for v in channels)
        act = _activation(activation)
        self.conv = nn.Sequential(
            nn.Conv2d(c, c1, 4, stride=2, padding=1),
            act(),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1),
            act(),
        )
        self.dense = nn.Linear(c2 * (h // 4) * (w // 4), out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[:-1]
        out = self.conv(x.reshape(-1, *self.image_shape))
        return self.dense(out.flatten(1)).reshape(*batch, -1)


class ConvGaussianEncoder(GaussianEncoder):
    """A convolutional q_φ(z|x) = N(z_loc(x), diag z_scale(x)²): :class:`ConvTrunk` to
    ``hidden`` features, the activation, then a linear map to ``(z_loc, z_scale)``. Same interface
    as :class:`GaussianEncoder` (input: flattened images)."""

    def __init__(
        self,
        image_shape: Sequence[int],
        z_dim: int,
        hidden: int = 256,
        channels: Sequence[int] = (32, 64),
        activation: str = "relu",
        min_scale: float = 1e-4,
    ) -> None:
        nn.Module.__init__(self)
        self.z_dim = z_dim
        self.min_scale = min_scale
        self.net = nn.Sequential(
            ConvTrunk(image_shape, hidden, channels, activation),
            _activation(activation)(),
            nn.Linear(hidden, 2 * z_dim),
        )


class ConvDecoder(nn.Module):
    """A convolutional decoder f_θ(z): dense layers to a ``(channels[-1], H/4, W/4)`` grid, then two
    stride-2 4×4 transposed convolutions to the image; output flattened to ``(..., C·H·W)``
    (Bernoulli logits or Gaussian means), like :class:`Decoder`."""

    def __init__(
        self,
        z_dim: int,
        image_shape: Sequence[int],
        hidden: int = 256,
        channels: Sequence[int] = (32, 64),
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.image_shape = _image_dims(image_shape)
        c, h, w = self.image_shape
        c1, c2 = (int(v) for v in channels)
        act = _activation(activation)
        self.z_dim = z_dim
        self.x_dim = c * h * w
        self.grid = (c2, h // 4, w // 4)
        self.dense = nn.Sequential(nn.Linear(z_dim, hidden), act(), nn.Linear(hidden, c2 * (h // 4) * (w // 4)), act())
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1),
            act(),
            nn.ConvTranspose2d(c1, c, 4, stride=2, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch = z.shape[:-1]
        out = self.dense(z.reshape(-1, z.shape[-1])).reshape(-1, *self.grid)
        return self.deconv(out).reshape(*batch, self.x_dim)


def _conv_width(hidden_sizes: Sequence[int]) -> int:
    # The dense width of a convolutional network: the first hidden size (256 if none is given).
    return int(hidden_sizes[0]) if len(hidden_sizes) else 256


def glorot_init_(module: nn.Module) -> nn.Module:
    """Re-initialise every linear and convolutional layer of ``module`` in place: Glorot-uniform
    weights (Glorot and Bengio 2010, the scale meant for tanh networks) and zero biases, as in
    Burda et al.'s IWAE code. torch's default draws smaller weights, U(±1/√fan_in). A
    :class:`ZeroLinear` stays at zero.

    :return: ``module``.
    """
    for layer in module.modules():
        if isinstance(layer, ZeroLinear):  # starts at zero by design
            continue
        if isinstance(layer, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return module


def init_output_bias_(decoder: nn.Module, x_mean: torch.Tensor, likelihood: str = "bernoulli") -> nn.Module:
    """Start an MLP decoder at the data's mean image, in place: the bias of its output layer is set
    to logit(mean) for a Bernoulli likelihood (the mean clamped to [10⁻³, 1 − 10⁻³]) or to the mean
    for a Gaussian one. Burda et al.'s IWAE code starts its decoder this way. Without it, the first
    epochs are spent learning the mean image while the KL term switches latent units off. On MNIST,
    Burda et al.'s two-layer model reaches a test ELBO of −107.09 after 10 epochs with it and
    −143.08 without (``experiments/init_study.py``).

    :param decoder: a :class:`Decoder` (or any MLP ending in ``nn.Linear``), or a
        :class:`HierarchicalDecoder` whose x-level network is one.
    :param x_mean: the mean of the training data, shape ``(x_dim,)``.
    :param likelihood: ``"bernoulli"`` or ``"gaussian"``.
    :return: ``decoder``.
    """
    net = decoder.decoder if isinstance(decoder, HierarchicalDecoder) else decoder
    last = list(net.children())[-1] if isinstance(net, nn.Sequential) else None
    if not isinstance(last, nn.Linear):
        raise ValueError(
            f"the data-mean output bias needs a decoder whose last layer is nn.Linear (an MLP); "
            f"{type(net).__name__} is not one (a convolutional decoder has one bias per channel): use "
            "--network mlp, or leave --data-bias off"
        )
    if x_mean.shape != last.bias.shape:
        raise ValueError(
            f"x_mean has shape {tuple(x_mean.shape)}; the decoder outputs {tuple(last.bias.shape)} features"
        )
    if likelihood == "bernoulli":
        value = torch.logit(x_mean.clamp(1e-3, 1 - 1e-3))
    elif likelihood == "gaussian":
        value = x_mean
    else:
        raise ValueError(f"likelihood must be 'bernoulli' or 'gaussian', got {likelihood!r}")
    with torch.no_grad():
        last.bias.copy_(value.to(last.bias))
    return decoder
