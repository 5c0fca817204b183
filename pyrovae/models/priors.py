r"""Learned priors p(z) for :class:`pyrovae.models.VAE` (``VAE(..., prior=...)``).

A prior is called as ``prior(batch_size, device)`` inside the model (the :meth:`VAE.prior` hook)
and returns a ``pyro.distributions`` distribution of batch shape ``(batch_size,)`` and event shape
``(z_dim,)``. Its learned tensors are registered with :func:`pyrovae.params.register` when it is
called, so they are params in Pyro's store like the decoder's: trained by :func:`pyrovae.fit`,
saved in checkpoints and restored by :func:`pyrovae.load_run`. Densities are Pyro's, never written
by hand:

============================ ====================================================== ===========================
class                        p(z)                                                   Pyro pieces
============================ ====================================================== ===========================
:class:`StandardNormalPrior` N(0, I) (what ``VAE`` uses without a prior)            ``Normal``
:class:`MixturePrior`        Σ_k π_k N(μ_k, diag σ_k²), K learned components and    ``MixtureSameFamily``,
                             learned weights π = softmax(logits)                    ``Categorical``, ``Normal``
:class:`VampPrior`           (1/K) Σ_k q(z | u_k): the encoder's posteriors at K    the same, components from
                             learned pseudo-inputs u_k (Tomczak & Welling 2018)     the guide's encoder
:class:`FlowPrior`           N(0, I) pushed through a learned masked autoregressive ``TransformedDistribution``,
                             flow (Papamakarios et al. 2017): z = h⁻¹(ε),           ``affine_autoregressive`` /
                             log p(z) = log N(h(z)) + log|det ∂h/∂z|                ``spline_autoregressive``
============================ ====================================================== ===========================

**The VampPrior shares the guide's encoder.** Its components q(z | u_k) are the amortized guide's
own posteriors, so it is given the guide's encoder network and registers it under the same
``pyro.module`` name as the guide (``encoder_name``, ``"encoder"`` like
:class:`pyrovae.AmortizedGuide`): the param store then holds one entry per encoder tensor, which
takes the gradient of both the model's log p(z) and the guide's log q(z|x). (Under two names, one
tensor would be stepped twice by the optimizer; :func:`pyrovae.params.inspect`, which ``fit`` and
the evaluation run first, refuses that.) The models layer knows no guide: the prior holds only the
network, a :mod:`pyrovae.nets` module.

The flow's density direction h (ε = h(z), one pass of each autoregressive network) is the fast
one, as in a masked autoregressive flow: scoring the guide's draws, what training and importance
sampling do, costs one network pass per layer; drawing from the prior (``model.sample``) inverts
each layer one coordinate at a time, z_dim passes.

None of these priors has a closed-form KL to a Gaussian q: ``elbo-analytic``
(``TraceMeanField_ELBO``) falls back to Monte Carlo for the latent site (log p(z) − log q at the
draw), and :func:`pyrovae.kl_to_prior` does the same.

**References**

- [1] J. M. Tomczak, M. Welling, "VAE with a VampPrior", AISTATS 2018.
- [2] G. Papamakarios, T. Pavlakou, I. Murray, "Masked Autoregressive Flow for Density Estimation",
  NeurIPS 2017.
- [3] C. Durkan, A. Bekasov, I. Murray, G. Papamakarios, "Neural Spline Flows", NeurIPS 2019.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, cast

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.nn import AutoRegressiveNN
from torch import nn
from torch.nn import functional as F

from pyrovae.params import register

__all__ = [
    "DiagonalMixture",
    "FLOW_PRIOR_KINDS",
    "FlowPrior",
    "MixturePrior",
    "StandardNormalPrior",
    "VampPrior",
    "diagonal_mixture",
    "paper_pseudo_inputs",
    "pseudo_inputs_from_data",
]


def _softplus_inverse(value: torch.Tensor) -> torch.Tensor:
    return value + torch.log(-torch.expm1(-value))


class StandardNormalPrior:
    """p(z) = N(0, I), no parameters."""

    def __init__(self, z_dim: int) -> None:
        self.z_dim = int(z_dim)

    def to(self, device: torch.device | str) -> StandardNormalPrior:
        return self

    def __call__(self, batch_size: int, device: torch.device | str) -> dist.TorchDistribution:
        zeros = torch.zeros(batch_size, self.z_dim, device=device)
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)


class DiagonalMixture(dist.MixtureSameFamily):
    """Pyro's ``MixtureSameFamily`` of diagonal Gaussians (components ``Normal(loc, scale).to_event(1)``)
    whose ``log_prob`` scores all components with two matrix products instead of a
    ``(..., K, z_dim)`` tensor of per-coordinate densities. Importance sampling of a VampPrior on
    MNIST asks for 100 particles × 100 points × K = 500 components × 50 latent dimensions at once:
    ``MixtureSameFamily.log_prob`` builds 1 GB per intermediate (5.5 GB at the peak, measured) and
    runs element by element. Here

        log N(z; μ_k, diag σ_k²) = −½ z²·a_k + z·b_k − ½ Σ_d μ_kd² a_kd − Σ_d log σ_kd − (D/2) log 2π,

    a_k = 1/σ_k², b_k = μ_k/σ_k², so ``z² @ a.T`` and ``z @ b.T`` give every component at once. The
    products are taken in float64: the expansion subtracts terms of size z²/σ² to leave (z − μ)²/σ²,
    and float64 keeps that difference exact to ~1e-12 nats where float32 would lose ~1e-3.
    The value is ``MixtureSameFamily.log_prob``'s: logsumexp_k [log π_k + log N(z; μ_k, diag σ_k²)].

    Build it with :func:`diagonal_mixture`.
    """

    _loc: Optional[torch.Tensor] = None
    _scale: Optional[torch.Tensor] = None

    def expand(self, batch_shape, _instance=None):
        new = super().expand(batch_shape, _instance)
        new._loc, new._scale = self._loc, self._scale
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        if self._loc is None or self._scale is None:
            normal = self.component_distribution.base_dist
            loc, scale = normal.loc, normal.scale
        else:
            loc, scale = self._loc, self._scale  # (..., K, z_dim), broadcastable to the batch
        batch = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        z, loc, scale = value.double().unsqueeze(-2), loc.double(), scale.double()  # z: (..., 1, z_dim)
        precision = scale.pow(-2)  # a: (..., K, z_dim)
        shift = loc * precision  # b
        constant = (
            -0.5 * (loc * shift).sum(-1) - torch.log(scale).sum(-1) - 0.5 * loc.shape[-1] * math.log(2 * math.pi)
        )  # (..., K)
        quadratic = (-0.5 * z.pow(2) @ precision.transpose(-1, -2) + z @ shift.transpose(-1, -2)).squeeze(-2)
        log_prob_z = (quadratic + constant).to(value.dtype)
        log_weights = torch.log_softmax(self.mixture_distribution.logits, dim=-1)
        out = torch.logsumexp(log_prob_z + log_weights, dim=-1)
        return out.expand(torch.broadcast_shapes(out.shape, batch))


def diagonal_mixture(loc: torch.Tensor, scale: torch.Tensor, logits: torch.Tensor) -> DiagonalMixture:
    """Σ_k softmax(logits)_k N(loc_k, diag scale_k²) over the last dimension (:class:`DiagonalMixture`):
    ``loc`` and ``scale`` of shape ``(..., K, z_dim)``, ``logits`` ``(..., K)``."""
    mixture = DiagonalMixture(dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1))
    mixture._loc, mixture._scale = loc, scale
    return mixture


class _MixtureParams(nn.Module):
    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, logits: torch.Tensor) -> None:
        super().__init__()
        self.loc = nn.Parameter(loc)
        self.scale_unconstrained = nn.Parameter(_softplus_inverse(scale))
        self.logits = nn.Parameter(logits)


class MixturePrior:
    """A mixture-of-Gaussians prior p(z) = Σ_k π_k N(z; μ_k, diag σ_k²) with learned means μ_k,
    scales σ_k = softplus(·) and weights π = softmax(logits).

    :param z_dim: latent dimension.
    :param num_components: K.
    :param loc: initial means ``(K, z_dim)`` (default: N(0, I) draws, so the components start apart).
    :param scale: initial scales ``(K, z_dim)`` or a number (default 1).
    :param logits: initial mixture logits ``(K,)`` (default 0: equal weights).
    :param name: the ``pyro.module`` name of its parameters (``name$$$loc``, ...).
    """

    def __init__(
        self,
        z_dim: int,
        num_components: int = 10,
        loc: Optional[torch.Tensor] = None,
        scale: torch.Tensor | float = 1.0,
        logits: Optional[torch.Tensor] = None,
        name: str = "prior",
    ) -> None:
        if int(num_components) < 1:
            raise ValueError(f"num_components must be at least 1, got {num_components}")
        self.z_dim, self.num_components, self.name = int(z_dim), int(num_components), name
        shape = (self.num_components, self.z_dim)
        loc = torch.randn(shape) if loc is None else torch.as_tensor(loc, dtype=torch.get_default_dtype())
        scale = torch.as_tensor(scale, dtype=torch.get_default_dtype()).expand(shape).clone()
        logits = (
            torch.zeros(self.num_components)
            if logits is None
            else torch.as_tensor(logits, dtype=torch.get_default_dtype())
        )
        if loc.shape != shape or logits.shape != (self.num_components,):
            raise ValueError(
                f"loc must be {shape} and logits ({self.num_components},), got "
                f"{tuple(loc.shape)} and {tuple(logits.shape)}"
            )
        if not bool((scale > 0).all()):
            raise ValueError("the initial scales must be positive")
        self.module = _MixtureParams(loc.clone(), scale, logits.clone())

    def to(self, device: torch.device | str) -> MixturePrior:
        self.module.to(device)
        return self

    def components(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loc, scale, logits)`` of the components as the density uses them."""
        m = self.module
        return m.loc, F.softplus(m.scale_unconstrained), m.logits

    def __call__(self, batch_size: int, device: torch.device | str) -> dist.TorchDistribution:
        register(self.name, self.module)
        loc, scale, logits = self.components()
        return diagonal_mixture(loc, scale, logits).expand([batch_size])


def paper_pseudo_inputs(num: int, x_dim: int, mean: float = 0.05, std: float = 0.01) -> torch.Tensor:
    """Tomczak & Welling's initialisation of the pseudo-inputs (their code's default for MNIST):
    every pixel N(mean, std²), by default N(0.05, 0.01²)."""
    return mean + std * torch.randn(num, x_dim)


def pseudo_inputs_from_data(num: int, data: torch.Tensor, std: float = 0.01) -> torch.Tensor:
    """Tomczak & Welling's ``--use_training_data_init``: ``num`` training points (here drawn at
    random without replacement; with replacement if there are fewer than ``num``) plus
    N(0, std²) noise."""
    data = data.reshape(data.shape[0], -1).detach()
    n = data.shape[0]
    rows = torch.randperm(n, device=data.device)[:num] if n >= num else torch.randint(n, (num,), device=data.device)
    return data[rows].to(torch.get_default_dtype()).cpu() + std * torch.randn(num, data.shape[1])


class _PseudoInputs(nn.Module):
    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.pseudo_inputs = nn.Parameter(init)


class VampPrior:
    r"""The VampPrior p(z) = (1/K) Σ_k q(z | u_k) (Tomczak & Welling 2018): a uniform mixture of the
    encoder's diagonal Gaussians at K learned pseudo-inputs u_k.

    As in the paper's code, the pseudo-inputs are a free matrix passed through a hard tanh onto
    ``bounds`` (``(0, 1)`` for images in [0, 1]; ``None`` leaves them unbounded, for real-valued
    data): u_k = clamp(w_k, 0, 1). Initialise w with :func:`paper_pseudo_inputs` (the default) or
    :func:`pseudo_inputs_from_data`.

    :param encoder: the amortized guide's encoder, ``x -> (z_loc, z_scale)`` (e.g.
        :class:`pyrovae.nets.GaussianEncoder`): the very module the guide uses.
    :param x_dim: data features (the size of a pseudo-input).
    :param num_pseudo_inputs: K (500 in the paper).
    :param init: initial pseudo-inputs ``(K, x_dim)`` (default :func:`paper_pseudo_inputs`).
    :param bounds: the hard-tanh range of the pseudo-inputs, or ``None``.
    :param encoder_name: the ``pyro.module`` name of ``encoder``: the guide's (``"encoder"``).
    :param name: the ``pyro.module`` name of the pseudo-inputs (``name$$$pseudo_inputs``).
    """

    def __init__(
        self,
        encoder: nn.Module,
        x_dim: int,
        num_pseudo_inputs: int = 500,
        init: Optional[torch.Tensor] = None,
        bounds: Optional[tuple[float, float]] = (0.0, 1.0),
        encoder_name: str = "encoder",
        name: str = "prior",
    ) -> None:
        if int(num_pseudo_inputs) < 1:
            raise ValueError(f"num_pseudo_inputs must be at least 1, got {num_pseudo_inputs}")
        if encoder_name == name:
            raise ValueError(f"the pseudo-inputs and the encoder need different names, got {name!r} for both")
        self.encoder = encoder
        self.x_dim, self.num_pseudo_inputs = int(x_dim), int(num_pseudo_inputs)
        self.bounds = None if bounds is None else (float(bounds[0]), float(bounds[1]))
        self.encoder_name, self.name = encoder_name, name
        init = paper_pseudo_inputs(self.num_pseudo_inputs, self.x_dim) if init is None else torch.as_tensor(init)
        if tuple(init.shape) != (self.num_pseudo_inputs, self.x_dim):
            raise ValueError(
                f"init must be (num_pseudo_inputs, x_dim) = {(self.num_pseudo_inputs, self.x_dim)}, "
                f"got {tuple(init.shape)}"
            )
        device = next((p.device for p in encoder.parameters()), torch.device("cpu"))
        self.module = _PseudoInputs(init.detach().clone().to(torch.get_default_dtype())).to(device)

    def to(self, device: torch.device | str) -> VampPrior:
        self.module.to(device)
        return self

    def init_pseudo_inputs_(self, values: torch.Tensor) -> None:
        """Set the pseudo-inputs' free values in place (e.g. to :func:`pseudo_inputs_from_data`)."""
        with torch.no_grad():
            self.module.pseudo_inputs.copy_(values)

    def pseudo_inputs(self) -> torch.Tensor:
        """u, ``(K, x_dim)``: the free values through the hard tanh."""
        w = self.module.pseudo_inputs
        return w if self.bounds is None else F.hardtanh(w, *self.bounds)

    def components(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)``, each ``(K, z_dim)``: the encoder at the pseudo-inputs."""
        return self.encoder(self.pseudo_inputs())

    def __call__(self, batch_size: int, device: torch.device | str) -> dist.TorchDistribution:
        register(self.encoder_name, self.encoder)  # the guide's name: one store entry per tensor
        register(self.name, self.module)
        loc, scale = self.components()
        uniform = torch.zeros(self.num_pseudo_inputs, device=loc.device, dtype=loc.dtype)
        return diagonal_mixture(loc, scale, uniform).expand([batch_size])


#: The layers :class:`FlowPrior` stacks: Pyro's autoregressive transforms, used in their fast
#: (density) direction.
FLOW_PRIOR_KINDS = ("affine", "spline")


class FlowPrior:
    r"""p(z): N(0, I) pushed through a learned normalizing flow, z = h⁻¹(ε), ε ~ N(0, I), with
    h = T_L ∘ … ∘ T_1 a stack of autoregressive layers (Pyro's ``affine_autoregressive``, a masked
    autoregressive flow, or ``spline_autoregressive``), each with its own random variable order.
    log p(z) = log N(h(z); 0, I) + log|det ∂h/∂z| by change of variables (Pyro's
    ``TransformedDistribution`` over the layers' inverses).

    :param z_dim: latent dimension (at least 2: the layers are autoregressive).
    :param num_layers: L.
    :param kind: ``"affine"`` or ``"spline"`` (:data:`FLOW_PRIOR_KINDS`).
    :param hidden_dims: the widths of each layer's autoregressive network (default Pyro's).
    :param identity_init: start at h = identity, p(z) = N(0, I) (affine layers: the networks'
        output layers are zeroed).
    :param name: the ``pyro.module`` name of the layers.
    """

    def __init__(
        self,
        z_dim: int,
        num_layers: int = 2,
        kind: str = "affine",
        hidden_dims: Optional[Sequence[int]] = None,
        identity_init: bool = False,
        name: str = "prior",
    ) -> None:
        if kind not in FLOW_PRIOR_KINDS:
            raise ValueError(f"unknown flow prior {kind!r}; choose one of {list(FLOW_PRIOR_KINDS)}")
        if int(z_dim) < 2:
            raise ValueError(f"an autoregressive flow prior needs z_dim ≥ 2, got z_dim={z_dim}")
        if int(num_layers) < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        if identity_init and kind != "affine":
            raise ValueError("identity_init=True zeroes the affine layers' networks; use kind='affine'")
        self.z_dim, self.num_layers, self.kind, self.name = int(z_dim), int(num_layers), kind, name
        hidden = None if hidden_dims is None else list(hidden_dims)
        make = T.affine_autoregressive if kind == "affine" else T.spline_autoregressive
        self.layers = nn.ModuleList(make(self.z_dim, hidden_dims=hidden) for _ in range(self.num_layers))
        if identity_init:
            with torch.no_grad():
                for layer in self.layers:
                    # an affine autoregressive transform: its network's last layer is a (masked) nn.Linear
                    last = cast(nn.Linear, cast(AutoRegressiveNN, layer.arn).layers[-1])
                    last.weight.zero_()
                    last.bias.zero_()

    def to(self, device: torch.device | str) -> FlowPrior:
        self.layers.to(device)
        return self

    def flow(self, z: torch.Tensor) -> torch.Tensor:
        """h(z) = ε, the density direction (one network pass per layer)."""
        for layer in self.layers:
            z = layer(z)
        return z

    def __call__(self, batch_size: int, device: torch.device | str) -> dist.TorchDistribution:
        register(self.name, self.layers)
        zeros = torch.zeros(batch_size, self.z_dim, device=device)
        base = dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)
        # z = T_1⁻¹(… T_L⁻¹(ε)): TransformedDistribution applies its list left to right.
        return dist.TransformedDistribution(base, [layer.inv for layer in reversed(self.layers)])
