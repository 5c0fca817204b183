r"""VQ-VAE (van den Oord, Vinyals & Kavukcuoglu 2017) as a Pyro model/guide pair.

The latent is a grid of discrete codes c_ij ∈ {1..K}, each standing for a codebook vector
e_{c_ij} ∈ R^D. In Pyro:

- **Model.** The site ``"z"`` holds the grid of chosen codebook vectors, shape ``(H', W', D)``.
  During training its prior is uniform over the K codes of each cell
  (:class:`CodebookUniform`, log p = -H'W' log K), and the decoder reads it to give p(x | z).
  :meth:`VQVAE.sample` draws codes from this uniform prior; :mod:`pyrovae.models.code_prior`
  fits an autoregressive prior afterwards for real samples.
- **Guide.** Deterministic (``Delta``). The encoder gives z_e(x) ``(H', W', D)``, and each cell takes
  its nearest codebook vector. The site's value is z_e + sg(e_c - z_e): numerically e_c, with the
  straight-through gradient d/dz_e = identity.
- **Extra losses.** The guide adds them with ``pyro.factor("vq_loss", ..., has_rsample=True)``:
  the codebook loss ‖sg(z_e) - e_c‖² and the commitment loss β‖z_e - sg(e_c)‖² (β = 0.25), summed
  over the grid, per data point. A guide factor adds to log q, so the ELBO
  E_q[log p(x|z) + log p(z) - log q] loses exactly these terms, and ``Trace_ELBO`` (``--objective
  elbo``) minimises reconstruction + codebook + commitment losses, as in the paper. The KL term
  H'W' log K is a constant.

**EMA codebook** (``ema_decay=γ``, the paper's alternative, as in Sonnet's ``VectorQuantizerEMA``).
The codebook is then a buffer, not a parameter: the optimizer never sees it and the guide factor
holds the commitment loss alone. At every training step (the guide run with gradients enabled) each
code's count n_c and sum s_c of the encoder outputs assigned to it enter exponential moving
averages N_c ← γ N_c + (1-γ) n_c, M_c ← γ M_c + (1-γ) s_c (debiased by 1 - γ^t), and
e_c = M_c / Ñ_c with Laplace-smoothed counts Ñ_c = (N_c + ε) / (Σ N + K ε) · Σ N: online k-means.
Codes never assigned keep their initial vectors (Sonnet's zero-initialised averages would move
them to 0). Evaluation (under ``torch.no_grad``) does not update.

The bound reported by evaluation is log p(x) ≥ log p(x | z_q(x)) - H'W' log K (the paper's, with the
uniform prior).

**References**

- [1] A. van den Oord, O. Vinyals, K. Kavukcuoglu, "Neural Discrete Representation Learning",
  NeurIPS 2017.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, cast

import pyro
import pyro.distributions as dist
import torch
import torch.distributed
from pyro.distributions import constraints
from torch import nn

from pyrovae.handlers import data_plate
from pyrovae.models.vae import VAE, Likelihood
from pyrovae.nets import _activation, _image_dims
from pyrovae.params import register

__all__ = [
    "CodebookUniform",
    "add_codebook",
    "ema_update_",
    "VQ2Guide",
    "VQ2Networks",
    "VQDecoder",
    "VQEncoder",
    "VQGuide",
    "VQVAE",
    "VQVAE2",
    "code_perplexity",
    "nearest_codes",
    "quantize",
    "vq2_metrics",
    "vq_metrics",
]


class CodebookUniform(dist.TorchDistribution):
    """The uniform prior over a grid of codebook vectors: each of the ``grid`` cells holds one of
    the K rows of ``codebook`` with probability 1/K.

    Values are the vectors themselves, event shape ``(*grid, D)``; ``log_prob`` is the constant
    -(cells) log K (values are not checked for membership: the straight-through value of the VQ
    guide equals a codebook vector only up to rounding).

    :param codebook: ``(K, D)``.
    :param grid: the latent grid, e.g. ``(7, 7)``.
    :param batch_shape: batch shape (e.g. ``(B,)`` inside the data plate).
    """

    arg_constraints: dict = {}
    support = constraints.real  # the vectors of the codebook, a finite subset of R^D
    has_rsample = False

    def __init__(
        self,
        codebook: torch.Tensor,
        grid: Sequence[int],
        batch_shape: Sequence[int] = (),
        validate_args: Optional[bool] = None,
    ) -> None:
        self.codebook = codebook
        self.grid = tuple(int(g) for g in grid)
        event_shape = torch.Size(self.grid + (codebook.shape[-1],))
        super().__init__(torch.Size(batch_shape), event_shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return CodebookUniform(self.codebook, self.grid, batch_shape)

    def sample(self, sample_shape=torch.Size()):
        shape = torch.Size(sample_shape) + self.batch_shape + self.grid
        index = torch.randint(self.codebook.shape[0], shape, device=self.codebook.device)
        return self.codebook.detach()[index]

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        cells = math.prod(self.grid)
        batch = value.shape[: value.dim() - len(self.event_shape)]
        return torch.full(batch, -cells * math.log(self.codebook.shape[0]), dtype=value.dtype, device=value.device)


def nearest_codes(z_e: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row (squared Euclidean) for every vector of ``z_e (..., D)``."""
    flat = z_e.reshape(-1, z_e.shape[-1])
    distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.T + codebook.pow(2).sum(1)
    return distances.argmin(1).reshape(z_e.shape[:-1])


def quantize(
    z_e: torch.Tensor, codebook: torch.Tensor, commitment: float, codebook_loss: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vector-quantize ``z_e (..., H', W', D)``: the straight-through value z_e + sg(e_c - z_e), the
    codes c, and the per-point codebook + β·commitment loss summed over the grid (the commitment
    loss alone with ``codebook_loss=False``, for an EMA codebook)."""
    codes = nearest_codes(z_e.detach(), codebook.detach())
    e = codebook[codes]
    dims = (-3, -2, -1)
    loss = commitment * (z_e - e.detach()).pow(2).sum(dims)
    if codebook_loss:
        loss = loss + (z_e.detach() - e).pow(2).sum(dims)
    return z_e + (e - z_e).detach(), codes, loss


def add_codebook(
    module: nn.Module,
    name: str,
    num_codes: int,
    code_dim: int,
    ema_decay: Optional[float] = None,
    ema_eps: float = 1e-5,
) -> None:
    """Give ``module`` a ``num_codes × code_dim`` codebook called ``name``, drawn from U(-1/K, 1/K):
    a parameter (trained by the codebook loss), or with ``ema_decay`` a buffer with its moving
    averages ``<name>_ema_count``, ``<name>_ema_sum`` and step counter ``<name>_ema_steps``
    (updated by :func:`ema_update_`)."""
    init = torch.empty(num_codes, code_dim).uniform_(-1 / num_codes, 1 / num_codes)
    if ema_decay is None:
        setattr(module, name, nn.Parameter(init))
        return
    if not 0 < ema_decay < 1:
        raise ValueError(f"ema_decay must be in (0, 1), e.g. 0.99, got {ema_decay}")
    if not ema_eps > 0:
        raise ValueError(f"ema_eps must be positive, got {ema_eps}")
    module.register_buffer(name, init)
    module.register_buffer(f"{name}_ema_count", torch.zeros(num_codes))
    module.register_buffer(f"{name}_ema_sum", torch.zeros(num_codes, code_dim))
    module.register_buffer(f"{name}_ema_steps", torch.zeros((), dtype=torch.long))
    # torch types Module.__setattr__'s value as Tensor | Module; plain attributes are allowed too
    module.ema_decay, module.ema_eps = float(ema_decay), float(ema_eps)  # type: ignore[assignment]


def _one_of_several_processes() -> bool:
    """Whether ``torch.distributed`` has joined this process to a group of more than one.

    Asked of torch itself, the way the guides ask ``torch.is_grad_enabled()`` whether this is a
    training step: a model sits below pyrovae's runtime layer and does not import it
    (tests/test_layers.py)."""
    group = torch.distributed
    return group.is_available() and group.is_initialized() and group.get_world_size() > 1


@torch.no_grad()
def ema_update_(module: nn.Module, name: str, z_e: torch.Tensor, codes: torch.Tensor) -> None:
    """One EMA codebook update (module docstring) of the codebook ``name`` of ``module`` (made by
    :func:`add_codebook` with ``ema_decay``) from encoder outputs ``z_e (..., D)`` and their codes.

    Refused in data-parallel training: the update is buffer state, not a gradient, so the step's
    all-reduce never sees it, and each process would move its codebook by its own slice's codes."""
    if _one_of_several_processes():
        raise ValueError(
            "EMA codebook updates are not supported in data-parallel training (each process would average "
            "its own slice); train in one process, or build the model without ema_decay (--codebook-ema) to train "
            "the codebook by its loss"
        )
    codebook = getattr(module, name)
    count, total = getattr(module, f"{name}_ema_count"), getattr(module, f"{name}_ema_sum")
    steps = getattr(module, f"{name}_ema_steps")
    decay, eps = cast(float, module.ema_decay), cast(float, module.ema_eps)  # set by add_codebook
    num_codes = codebook.shape[0]
    flat_codes = codes.reshape(-1)
    flat = z_e.reshape(-1, z_e.shape[-1]).to(total.dtype)
    count.mul_(decay).add_(torch.bincount(flat_codes, minlength=num_codes).to(count.dtype), alpha=1 - decay)
    total.mul_(decay).index_add_(0, flat_codes, flat, alpha=1 - decay)
    steps.add_(1)
    debias = 1 - decay ** int(steps)
    n = count / debias
    smoothed = (n + eps) / (n.sum() + num_codes * eps) * n.sum()
    updated = (total / debias) / smoothed.unsqueeze(-1)
    codebook.copy_(torch.where((n > 0).unsqueeze(-1), updated, codebook))


class VQEncoder(nn.Module):
    """Images ``(..., C·H·W)`` → z_e ``(..., H/4, W/4, D)``: two stride-2 4×4 convolutions and a 1×1
    convolution to D channels."""

    def __init__(
        self, image_shape: Sequence[int], code_dim: int, channels: Sequence[int] = (32, 64), activation: str = "relu"
    ) -> None:
        super().__init__()
        self.image_shape = _image_dims(image_shape)
        c1, c2 = (int(v) for v in channels)
        act = _activation(activation)
        self.net = nn.Sequential(
            nn.Conv2d(self.image_shape[0], c1, 4, 2, 1),
            act(),
            nn.Conv2d(c1, c2, 4, 2, 1),
            act(),
            nn.Conv2d(c2, code_dim, 1),
        )
        self.grid = (self.image_shape[1] // 4, self.image_shape[2] // 4)
        self.code_dim = code_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[:-1]
        out = self.net(x.reshape(-1, *self.image_shape)).permute(0, 2, 3, 1)
        return out.reshape(*batch, *out.shape[1:])


class VQDecoder(nn.Module):
    """Code grids ``(..., H', W', D)`` → images ``(..., C·H·W)`` (logits or means): a 3×3
    convolution, then two stride-2 4×4 transposed convolutions."""

    def __init__(
        self, image_shape: Sequence[int], code_dim: int, channels: Sequence[int] = (32, 64), activation: str = "relu"
    ) -> None:
        super().__init__()
        self.image_shape = _image_dims(image_shape)
        c1, c2 = (int(v) for v in channels)
        act = _activation(activation)
        self.net = nn.Sequential(
            nn.Conv2d(code_dim, c2, 3, 1, 1),
            act(),
            nn.ConvTranspose2d(c2, c1, 4, 2, 1),
            act(),
            nn.ConvTranspose2d(c1, self.image_shape[0], 4, 2, 1),
        )
        self.x_dim = math.prod(self.image_shape)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch = z.shape[:-3]
        out = self.net(z.reshape(-1, *z.shape[-3:]).permute(0, 3, 1, 2))
        return out.reshape(*batch, self.x_dim)


class VQVAE(VAE):
    """The VQ-VAE generative model: a uniform prior over code grids and a convolutional decoder
    (see the module docstring). The codebook (``K × D``) is a parameter of the decoder module,
    registered with it by ``pyro.module``; the guide reads the same tensor.

    :param decoder: a :class:`VQDecoder`.
    :param num_codes: K.
    :param code_dim: D.
    :param grid: the latent grid ``(H', W')``.
    :param ema_decay: γ of EMA codebook updates (e.g. 0.99); ``None``: the codebook loss trains it.
    """

    def __init__(
        self,
        decoder: VQDecoder,
        num_codes: int,
        code_dim: int,
        grid: Sequence[int],
        likelihood: Likelihood = "bernoulli",
        x_scale: float = 1.0,
        learn_x_scale: bool = False,
        name: str = "decoder",
        ema_decay: Optional[float] = None,
    ) -> None:
        if num_codes < 2:
            raise ValueError(f"num_codes must be at least 2, got {num_codes}")
        if not hasattr(decoder, "codebook"):
            add_codebook(decoder, "codebook", num_codes, code_dim, ema_decay)
        super().__init__(decoder, code_dim, likelihood, x_scale, learn_x_scale, 1.0, name)
        self.num_codes = int(num_codes)
        self.grid = tuple(int(g) for g in grid)

    @property
    def codebook(self) -> torch.Tensor:
        return cast(torch.Tensor, self.decoder.codebook)  # a parameter or buffer (add_codebook)

    @property
    def ema(self) -> bool:
        """Whether the codebook is updated by moving averages (a buffer) rather than its loss."""
        return getattr(self.decoder, "ema_decay", None) is not None

    def sample_latents(self, batch_size: int, device: torch.device) -> torch.Tensor:
        return pyro.sample("z", CodebookUniform(self.codebook, self.grid, (batch_size,)))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """The mean of p(x | z) for integer code grids ``(..., H', W')``."""
        return self.decode(self.codebook[codes])

    @torch.no_grad()
    def reconstruct(self, guide: VQGuide, x: torch.Tensor) -> torch.Tensor:
        """The decoder's mean at the codes the guide gives ``x``."""
        return self.decode_codes(guide.codes(x))


class VQGuide:
    """The deterministic VQ-VAE guide: nearest codebook vectors with straight-through gradients,
    and the codebook and commitment losses as a guide factor (see the module docstring).

    :param encoder: a :class:`VQEncoder`.
    :param model: the :class:`VQVAE` whose codebook it quantizes to.
    :param commitment: β of the commitment loss.
    """

    amortized = True

    def __init__(self, encoder: VQEncoder, model: VQVAE, commitment: float = 0.25, name: str = "encoder") -> None:
        if not commitment >= 0:
            raise ValueError(f"commitment must be >= 0, got {commitment}")
        self.encoder = encoder
        self.model = model
        self.commitment = float(commitment)
        self.name = name

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integer code grid ``(..., H', W')`` of each image."""
        with torch.no_grad():
            return nearest_codes(self.encoder(x), self.model.codebook)

    def __call__(
        self, x: Optional[torch.Tensor], index: Optional[torch.Tensor] = None, num_data: Optional[int] = None
    ) -> torch.Tensor:
        if x is None:
            raise ValueError("the VQ guide needs the data x")
        register(self.name, self.encoder)
        register(self.model.name, self.model.decoder)  # the codebook lives in the decoder module
        ema = self.model.ema
        with data_plate(x, index, num_data):
            z_e = self.encoder(x)
            z_q, codes, loss = quantize(z_e, self.model.codebook, self.commitment, codebook_loss=not ema)
            if ema and torch.is_grad_enabled():
                ema_update_(self.model.decoder, "codebook", z_e.detach(), codes)
            pyro.factor("vq_loss", loss, has_rsample=True)
            return pyro.sample("z", dist.Delta(z_q, event_dim=3))


def code_perplexity(codes: torch.Tensor, num_codes: int) -> float:
    """exp(entropy) of the codes' empirical distribution: K if all codes are used equally, 1 if one."""
    counts = torch.bincount(codes.reshape(-1), minlength=num_codes).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float(entropy.exp())


@torch.no_grad()
def vq_metrics(model: VQVAE, guide: VQGuide, x: torch.Tensor, batch_size: int = 500) -> dict[str, float]:
    """Test metrics of a VQ-VAE on ``x`` (nats per image): the reconstruction term
    log p(x | z_q(x)), the bound log p(x) ≥ log p(x | z_q) - H'W' log K under the uniform prior,
    squared reconstruction error of the decoder's mean, and the code perplexity."""
    log_lik, sq_err, codes = [], [], []
    for xb in x.split(batch_size):
        c = guide.codes(xb)
        out = model.decoder(model.codebook[c])
        log_lik.append(model.likelihood_dist(out).log_prob(xb))
        mean = torch.sigmoid(out) if model.likelihood == "bernoulli" else out
        sq_err.append((mean - xb).pow(2).sum(-1))
        codes.append(c)
    log_lik_t = torch.cat(log_lik)
    kl = math.prod(model.grid) * math.log(model.num_codes)
    all_codes = torch.cat(codes)
    return {
        "reconstruction_log_lik": log_lik_t.mean().item(),
        "bound": (log_lik_t - kl).mean().item(),
        "kl_uniform_prior": kl,
        "squared_error": torch.cat(sq_err).mean().item(),
        "perplexity": code_perplexity(all_codes, model.num_codes),
        "codes_used": int(torch.unique(all_codes).numel()),
        "num_codes": model.num_codes,
    }


# ------------------------------------------------------------------------------------------------
# VQ-VAE-2: two levels of codes


class VQ2Networks(nn.Module):
    """The networks of a two-level VQ-VAE-2 for small images (MNIST-sized), after Razavi et al.
    (2019), scaled down: a bottom encoder to a ``(H/2, W/2)`` feature map, a top encoder to
    ``(H/4, W/4)`` top codes, the top codes decoded back to ``(H/2, W/2)`` and joined with the bottom
    features to give the bottom codes, and a decoder from both levels to the image. Both codebooks
    (``K_top × D``, ``K_bottom × D``) are parameters here.
    """

    # registered by add_codebook, as parameters or (EMA) buffers
    codebook_top: torch.Tensor
    codebook_bottom: torch.Tensor

    def __init__(
        self,
        image_shape: Sequence[int],
        code_dim: int,
        num_codes_top: int,
        num_codes_bottom: int,
        channels: int = 64,
        activation: str = "relu",
        ema_decay: Optional[float] = None,
    ) -> None:
        super().__init__()
        self.image_shape = _image_dims(image_shape)
        c, h, w = self.image_shape
        act = _activation(activation)
        d = code_dim
        self.code_dim = d
        self.grid_top = (h // 4, w // 4)
        self.grid_bottom = (h // 2, w // 2)
        self.x_dim = c * h * w
        self.enc_bottom = nn.Sequential(
            nn.Conv2d(c, channels, 4, 2, 1), act(), nn.Conv2d(channels, channels, 3, 1, 1), act()
        )
        self.enc_top = nn.Sequential(nn.Conv2d(channels, channels, 4, 2, 1), act(), nn.Conv2d(channels, d, 1))
        self.top_to_bottom = nn.ConvTranspose2d(d, channels, 4, 2, 1)
        self.pre_bottom = nn.Conv2d(2 * channels, d, 1)
        self.upsample_top = nn.ConvTranspose2d(d, d, 4, 2, 1)
        self.dec = nn.Sequential(
            nn.Conv2d(2 * d, channels, 3, 1, 1),
            act(),
            nn.ConvTranspose2d(channels, c, 4, 2, 1),
        )
        add_codebook(self, "codebook_top", num_codes_top, d, ema_decay)
        add_codebook(self, "codebook_bottom", num_codes_bottom, d, ema_decay)
        self.ema = ema_decay is not None

    @staticmethod
    def _channels_last(t: torch.Tensor) -> torch.Tensor:
        return t.permute(0, 2, 3, 1)

    @staticmethod
    def _channels_first(t: torch.Tensor) -> torch.Tensor:
        return t.permute(0, 3, 1, 2)

    def encode_bottom_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc_bottom(x.reshape(-1, *self.image_shape))

    def forward(self, z: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Decode ``(z_bottom (..., H/2, W/2, D), z_top (..., H/4, W/4, D))`` to ``(..., C·H·W)``."""
        z_bottom, z_top = z
        batch = z_bottom.shape[:-3]
        bottom = self._channels_first(z_bottom.reshape(-1, *z_bottom.shape[-3:]))
        top = self.upsample_top(self._channels_first(z_top.reshape(-1, *z_top.shape[-3:])))
        return self.dec(torch.cat([bottom, top], 1)).reshape(*batch, self.x_dim)


class VQVAE2(VAE):
    """The two-level VQ-VAE-2 generative model: uniform priors over the top grid (site ``"z2"``,
    ``(H/4, W/4, D)``) and the bottom grid (site ``"z"``, ``(H/2, W/2, D)``) during training, and
    the decoder p(x | z, z2). Pair with :class:`VQ2Guide`; fit priors afterwards with
    :func:`studies.vq.fit_code_prior_2`.

    **References**

    - [1] A. Razavi, A. van den Oord, O. Vinyals, "Generating Diverse High-Fidelity Images with
      VQ-VAE-2", NeurIPS 2019.
    """

    def __init__(
        self,
        networks: VQ2Networks,
        likelihood: Likelihood = "bernoulli",
        x_scale: float = 1.0,
        learn_x_scale: bool = False,
        name: str = "decoder",
    ) -> None:
        super().__init__(networks, networks.code_dim, likelihood, x_scale, learn_x_scale, 1.0, name)
        self.networks = networks
        self.grid = networks.grid_bottom
        self.grid_top = networks.grid_top
        self.num_codes = networks.codebook_bottom.shape[0]
        self.num_codes_top = networks.codebook_top.shape[0]

    def sample_latents(self, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        z_top = pyro.sample("z2", CodebookUniform(self.networks.codebook_top, self.grid_top, (batch_size,)))
        z_bottom = pyro.sample("z", CodebookUniform(self.networks.codebook_bottom, self.grid, (batch_size,)))
        return z_bottom, z_top

    def decode_codes(self, codes: torch.Tensor, codes_top: torch.Tensor) -> torch.Tensor:
        """The mean of p(x | z, z2) for integer code grids (bottom, top)."""
        return self.decode((self.networks.codebook_bottom[codes], self.networks.codebook_top[codes_top]))

    @torch.no_grad()
    def reconstruct(self, guide: VQ2Guide, x: torch.Tensor) -> torch.Tensor:
        return self.decode_codes(*guide.codes(x))

    @torch.no_grad()
    def sample(
        self, num_samples: int, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ancestral sampling under the uniform training priors: ``(z, x_mean, x)``, z the bottom grid."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        index = torch.arange(num_samples, device=device)
        trace = pyro.poutine.trace(self).get_trace(None, index=index, num_data=num_samples)
        z, z_top = cast(torch.Tensor, trace.nodes["z"]["value"]), cast(torch.Tensor, trace.nodes["z2"]["value"])
        return z, self.decode((z, z_top)), cast(torch.Tensor, trace.nodes["x"]["value"])


class VQ2Guide:
    """The deterministic VQ-VAE-2 guide: top codes from the top encoder, bottom codes from the
    bottom features joined with the decoded top codes; straight-through values at sites ``"z2"``
    and ``"z"``; both levels' codebook + commitment losses as the guide factor ``"vq_loss"``.
    The networks are the model's (one module holds encoders, decoder and codebooks).

    :param model: the :class:`VQVAE2`.
    :param commitment: β of the commitment losses.
    """

    amortized = True

    def __init__(self, model: VQVAE2, commitment: float = 0.25) -> None:
        if not commitment >= 0:
            raise ValueError(f"commitment must be >= 0, got {commitment}")
        self.model = model
        self.commitment = float(commitment)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        net = self.model.networks
        batch = x.shape[:-1]
        features = net.encode_bottom_features(x)
        z_e_top = net._channels_last(net.enc_top(features))
        z_top, codes_top, loss_top = quantize(z_e_top, net.codebook_top, self.commitment, codebook_loss=not net.ema)
        decoded_top = net.top_to_bottom(net._channels_first(z_top))
        z_e_bottom = net._channels_last(net.pre_bottom(torch.cat([features, decoded_top], 1)))
        z_bottom, codes_bottom, loss_bottom = quantize(
            z_e_bottom, net.codebook_bottom, self.commitment, codebook_loss=not net.ema
        )
        if net.ema and torch.is_grad_enabled():
            # After both quantizations, so the bottom codes are chosen with the codebooks of this step.
            ema_update_(net, "codebook_top", z_e_top.detach(), codes_top)
            ema_update_(net, "codebook_bottom", z_e_bottom.detach(), codes_bottom)
        return tuple(
            t.reshape(*batch, *t.shape[1:]) for t in (z_bottom, z_top, codes_bottom, codes_top, loss_bottom + loss_top)
        )

    def codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The integer code grids (bottom ``(..., H/2, W/2)``, top ``(..., H/4, W/4)``)."""
        with torch.no_grad():
            _, _, codes_bottom, codes_top, _ = self._encode(x)
        return codes_bottom, codes_top

    def __call__(
        self, x: Optional[torch.Tensor], index: Optional[torch.Tensor] = None, num_data: Optional[int] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if x is None:
            raise ValueError("the VQ-VAE-2 guide needs the data x")
        register(self.model.name, self.model.networks)
        with data_plate(x, index, num_data):
            z_bottom, z_top, _, _, loss = self._encode(x)
            pyro.factor("vq_loss", loss, has_rsample=True)
            z_top = pyro.sample("z2", dist.Delta(z_top, event_dim=3))
            z_bottom = pyro.sample("z", dist.Delta(z_bottom, event_dim=3))
        return z_bottom, z_top


@torch.no_grad()
def vq2_metrics(model: VQVAE2, guide: VQ2Guide, x: torch.Tensor, batch_size: int = 500) -> dict[str, float]:
    """:func:`vq_metrics` for the two-level model: bound log p(x|z, z2) - (cells log K) of both
    levels, reconstruction, squared error, and each level's perplexity."""
    log_lik, sq_err, bottoms, tops = [], [], [], []
    for xb in x.split(batch_size):
        c, ct = guide.codes(xb)
        out = model.decoder((model.networks.codebook_bottom[c], model.networks.codebook_top[ct]))
        log_lik.append(model.likelihood_dist(out).log_prob(xb))
        mean = torch.sigmoid(out) if model.likelihood == "bernoulli" else out
        sq_err.append((mean - xb).pow(2).sum(-1))
        bottoms.append(c)
        tops.append(ct)
    ll = torch.cat(log_lik)
    kl = math.prod(model.grid) * math.log(model.num_codes) + math.prod(model.grid_top) * math.log(model.num_codes_top)
    bottom, top = torch.cat(bottoms), torch.cat(tops)
    return {
        "reconstruction_log_lik": ll.mean().item(),
        "bound": (ll - kl).mean().item(),
        "kl_uniform_prior": kl,
        "squared_error": torch.cat(sq_err).mean().item(),
        "perplexity": code_perplexity(bottom, model.num_codes),
        "perplexity_top": code_perplexity(top, model.num_codes_top),
        "codes_used": int(torch.unique(bottom).numel()),
        "codes_used_top": int(torch.unique(top).numel()),
        "num_codes": model.num_codes,
        "num_codes_top": model.num_codes_top,
    }
