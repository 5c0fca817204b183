r"""Flexible amortized posteriors: a full-covariance Gaussian and normalizing-flow guides.

A diagonal Gaussian q(z|x) cannot equal a posterior whose coordinates are correlated, so its gap
log p(x) − ELBO stays at KL(q ‖ p(z|x)) > 0 however well it is trained. These guides can close it:

- :class:`FullCovarianceGuide`: q(z|x) = N(μ(x), L(x) L(x)ᵀ), exact for the linear-Gaussian model
  (whose posterior is a full-covariance Gaussian with a mean linear in x).
- :class:`FlowGuide`: z = f_K ∘ … ∘ f_1(ε), ε ~ N(μ(x), diag σ(x)²), each layer f_k conditioned on
  a context h(x) from the same encoder, with log q(z|x) = log N(ε) − Σ_k log|det ∂f_k/∂·| by
  change of variables (Pyro's ``TransformedDistribution``). Layers (:func:`flow_layers`):

  ========== =========================================================== ===========================
  kind       layer                                                       Pyro piece
  ========== =========================================================== ===========================
  iaf        inverse autoregressive flow (Kingma et al. 2016), order      ``ConditionalAffineAutoregressive``
             reversed between layers
  planar     z + u tanh(wᵀz + b) (Rezende & Mohamed 2015)                 ``ConditionalPlanar``
  sylvester  z + Q R tanh(S Qᵀ z + b), Q a product of Householder         :class:`ConditionalSylvester`
             reflections (van den Berg et al. 2018)                       (here: Pyro's ``Sylvester``
                                                                          has a wrong log-determinant)
  spline     rational-quadratic autoregressive spline (Durkan et al.      ``ConditionalSplineAutoregressive``
             2019), order reversed between layers
  ========== =========================================================== ===========================

**Pyro's ``Sylvester`` log-determinant.** Pyro 1.9's ``Sylvester`` computes y = x + tanh(x B + b) A
with rows x, A = Q R and B = S Qᵀ, and reports log|det J| = Σ_i log(1 + h'_i R_ii S_ii). That
identity holds for z' = z + Q R h(S Qᵀ z + b) in column form, where the Jacobian's determinant
reduces to det(I + diag(h') S R); in Pyro's row form the product is Q R S Qᵀ, which is not
triangular, and its reported value differs from the autograd Jacobian's by up to 0.28 nats per
layer (measured with parameters of scale 0.7; ``tests/test_flows.py`` shows it). Its default
initialisation (uniform ±0.01) hides the error at the start of training. :class:`ConditionalSylvester`
implements the column form, whose log-determinant the same test checks against autograd.

Samples are scored through the transforms' cache (planar and Sylvester layers have no closed-form
inverse), so log q is available for the guide's own draws — what every ELBO and importance
sampler needs. STL and DReG need log q with the flow's parameters detached at the same z, which
that cache cannot give; :mod:`pyrovae.infer.objectives.pathwise` refuses flow guides with that
reason (the full-covariance guide is supported).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Optional, cast

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.transforms.planar import ConditionedPlanar
from pyro.nn import DenseNN
from torch import nn
from torch.distributions import constraints

from pyrovae.distributions import non_reparameterized
from pyrovae.guides.per_datapoint import PerDatapointGuide
from pyrovae.handlers import data_plate, latent_scale
from pyrovae.nets import ContextGaussianEncoder, FullCovEncoder
from pyrovae.params import register

__all__ = [
    "FLOW_KINDS",
    "LOCAL_FLOW_KINDS",
    "ConditionalSylvester",
    "FlowGuide",
    "FlowNet",
    "FullCovarianceGuide",
    "PerDatapointFlowGuide",
    "PerDatapointFullCovarianceGuide",
    "flow_layers",
    "sylvester_matrices",
]


class FullCovarianceGuide:
    """q_φ(z|x) = N(z_loc(x), L(x) L(x)ᵀ) with ``(z_loc, L) = encoder(x)``, ``L`` lower-triangular.

    :param encoder: maps ``x`` to ``(z_loc, scale_tril)`` (e.g. :class:`pyrovae.nets.FullCovEncoder`).
    :param beta: KL weight; must equal the model's β.
    :param reparameterized: ``False`` for score-function gradients only.
    :param name: the ``pyro.module`` name of the encoder.
    """

    amortized = True

    def __init__(
        self, encoder: nn.Module, beta: float = 1.0, reparameterized: bool = True, name: str = "encoder"
    ) -> None:
        self.encoder = encoder
        self.beta = float(beta)
        self.reparameterized = reparameterized
        self.name = name

    def __call__(
        self, x: Optional[torch.Tensor], index: Optional[torch.Tensor] = None, num_data: Optional[int] = None
    ) -> torch.Tensor:
        if x is None:
            raise ValueError("the full-covariance guide needs the data x: q(z|x) is a function of x")
        register(self.name, self.encoder)
        with data_plate(x, index, num_data):
            z_loc, scale_tril = self.encoder(x)
            fn = dist.MultivariateNormal(z_loc, scale_tril=scale_tril)
            with latent_scale(self.beta):
                return pyro.sample("z", fn if self.reparameterized else non_reparameterized(fn))


# ---------------------------------------------------------------------------------------------
# Sylvester layers, conditioned on a context


class _ConditionedSylvester(T.Transform):
    r"""y = x + Q R tanh(S Qᵀ x + b) for column vectors x, with Q = H_1 ⋯ H_M (Householder
    reflections H = I − 2 u uᵀ/‖u‖²), R and S upper triangular with diagonals in (−1, 1). Then
    det ∂y/∂x = det(I + Q R D S Qᵀ) = det(I + D S R) = Π_i (1 + h'_i S_ii R_ii) with D = diag(h'),
    h' = 1 − tanh² ∈ (0, 1]: every factor is positive, so the layer is invertible."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, params: Callable[[], tuple[torch.Tensor, ...]]) -> None:
        super().__init__(cache_size=1)
        self._params = params
        self._cached_log_det: Optional[torch.Tensor] = None

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        u, r, s, b = self._params()
        xq = _reflect(x, u, reverse=True)  # Qᵀ x = H_M ⋯ H_1 x
        pre = _matvec(s, xq) + b  # S Qᵀ x + b
        h = torch.tanh(pre)
        y = x + _reflect(_matvec(r, h), u, reverse=False)  # Q R h = H_1 ⋯ H_M R h
        diagonal = torch.diagonal(r, dim1=-2, dim2=-1) * torch.diagonal(s, dim1=-2, dim2=-1)
        self._cached_log_det = torch.log1p((1 - h.pow(2)) * diagonal).sum(-1)
        return y

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        raise KeyError("a Sylvester layer has no closed-form inverse: only its own samples can be scored")

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_old, y_old = self._cached_x_y
        if x is not x_old or y is not y_old or self._cached_log_det is None:
            self(x)
        assert self._cached_log_det is not None
        return self._cached_log_det


def _matvec(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``m @ v`` for matrices ``m`` (shape ``(*batch, D, D)``) and vectors ``v`` (shape ``(*draws,
    *batch, D)``). ``m @ v.unsqueeze(-1)`` would expand ``m`` to ``(*draws, *batch, D, D)`` (a copy
    per draw: S·N·D² numbers for S draws at N points); here the draws become the columns of one
    ``(*batch, D, S)`` block, so each point's matrix multiplies all its draws at once, uncopied."""
    extra = v.dim() - 1 - (m.dim() - 2)
    if extra <= 0 or v.shape[extra:-1] != m.shape[:-2]:
        return (m @ v.unsqueeze(-1)).squeeze(-1)
    draws = v.shape[:extra]
    columns = v.reshape(-1, *v.shape[extra:]).movedim(0, -1)  # (*batch, D, S)
    return (m @ columns).movedim(-1, 0).reshape(*draws, *v.shape[extra:-1], m.shape[-2])


def _reflect(v: torch.Tensor, u: torch.Tensor, reverse: bool) -> torch.Tensor:
    """H_1 ⋯ H_M v (``reverse``: H_M ⋯ H_1 v) for the unit rows u_k of ``u`` (shape ``(..., M, D)``),
    H_k = I − 2 u_k u_kᵀ, applied to ``v`` (shape ``(..., D)``) one reflection at a time: M·D
    operations per vector, where forming Q would cost M·D² per point and a D × D product per draw."""
    rows = u.unbind(-2)  # one backward stack for all rows, not a zero-filled (..., M, D) per row
    for uk in rows if reverse else rows[::-1]:
        v = v - 2 * (v * uk).sum(-1, keepdim=True) * uk
    return v


def householder_product(u: torch.Tensor) -> torch.Tensor:
    """Q = H_1 ⋯ H_M as a matrix (shape ``(..., D, D)``) for the unit rows of ``u``: what
    :class:`_ConditionedSylvester` applies without forming it (for tests and inspection)."""
    d = u.shape[-1]
    eye = torch.eye(d, dtype=u.dtype, device=u.device).expand(*u.shape[:-2], d, d)
    return _reflect(eye.transpose(-1, -2), u.unsqueeze(-3), reverse=False).transpose(-1, -2)


def _constant(value: tuple[torch.Tensor, ...]) -> Callable[[], tuple[torch.Tensor, ...]]:
    return lambda: value


def sylvester_matrices(raw: Sequence[torch.Tensor], input_dim: int, count_householder: int) -> tuple[torch.Tensor, ...]:
    """``(U, R, S, b)`` of a Sylvester layer from unconstrained ``(u, r_dense, r_diag, s_dense,
    s_diag, b)`` (sizes :meth:`ConditionalSylvester.param_dims`, any batch shape in front): U the
    unit Householder vectors (shape ``(..., M, D)``; Q = H_1 ⋯ H_M, :func:`householder_product`),
    R and S upper triangular with tanh diagonals."""
    d, m = input_dim, count_householder
    u, r_dense, r_diag, s_dense, s_diag, b = raw
    batch = u.shape[:-1]
    u = u.reshape(*batch, m, d)
    u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    upper = torch.triu(torch.ones(d, d, dtype=u.dtype, device=u.device), diagonal=1)
    r = r_dense.reshape(*batch, d, d) * upper + torch.diag_embed(torch.tanh(r_diag))
    s = s_dense.reshape(*batch, d, d) * upper + torch.diag_embed(torch.tanh(s_diag))
    return u, r, s, b


class _SplitDenseNN(DenseNN):
    """Pyro's ``DenseNN`` whose outputs are split with ``torch.split`` rather than sliced: the
    backward of six slices zero-fills the whole output six times (a third of a Sylvester step,
    measured), the backward of a split concatenates once."""

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = x
        for layer in self.layers[:-1]:
            h = self.f(layer(h))
        return torch.split(self.layers[-1](h), list(self.param_dims), dim=-1)


class ConditionalSylvester(ConditionalTransformModule):
    """A Sylvester flow layer (van den Berg et al. 2018, Householder variety) whose parameters are
    a function of a context (amortized over x). ``nn(context)`` returns ``(u, r_dense, r_diag,
    s_dense, s_diag, b)`` of sizes ``(M·D, D·D, D, D·D, D, D)``.

    :param input_dim: D, the dimension of z.
    :param nn: the hypernetwork (e.g. ``pyro.nn.DenseNN(context_dim, hidden, param_dims)``).
    :param count_householder: M, the number of Householder reflections in Q.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, input_dim: int, nn: Callable, count_householder: int) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.count_householder = count_householder
        self.nn = nn

    @staticmethod
    def param_dims(input_dim: int, count_householder: int) -> list[int]:
        return [
            count_householder * input_dim,
            input_dim * input_dim,
            input_dim,
            input_dim * input_dim,
            input_dim,
            input_dim,
        ]

    def _params(self, context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return sylvester_matrices(self.nn(context), self.input_dim, self.count_householder)

    def condition(self, context: torch.Tensor) -> T.Transform:
        return _ConditionedSylvester(partial(self._params, context))


# ---------------------------------------------------------------------------------------------
# Flow guides

#: The flow layers :func:`flow_layers` builds, by name.
FLOW_KINDS = ("iaf", "planar", "sylvester", "spline")
_REVERSED_ORDER = {"iaf", "spline"}  # autoregressive layers: reverse the order between them


def flow_layers(
    kind: str, z_dim: int, context_dim: int, num_layers: int, hidden_dims: Optional[Sequence[int]] = None
) -> nn.ModuleList:
    """``num_layers`` conditional flow layers of one ``kind`` (:data:`FLOW_KINDS`) over z of size
    ``z_dim``, each conditioned on a context of size ``context_dim``; ``hidden_dims`` are the
    widths of each layer's (hyper)network (default ``[max(10 z_dim, 32)]``)."""
    if kind not in FLOW_KINDS:
        raise ValueError(f"unknown flow {kind!r}; choose one of {list(FLOW_KINDS)}")
    if int(num_layers) < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    hidden = list(hidden_dims) if hidden_dims is not None else [max(10 * z_dim, 32)]
    if kind in _REVERSED_ORDER and z_dim < 2:
        raise ValueError(f"an autoregressive flow ({kind!r}) needs z_dim ≥ 2; use 'planar' or 'sylvester' for z_dim=1")
    layers: list[nn.Module] = []
    for _ in range(int(num_layers)):
        if kind == "iaf":
            layers.append(T.conditional_affine_autoregressive(z_dim, context_dim, hidden_dims=hidden))
        elif kind == "planar":
            layers.append(T.conditional_planar(z_dim, context_dim, hidden_dims=hidden))
        elif kind == "spline":
            layers.append(T.conditional_spline_autoregressive(z_dim, context_dim, hidden_dims=hidden))
        else:
            count = z_dim // 2 + 1
            net = _SplitDenseNN(context_dim, hidden, param_dims=ConditionalSylvester.param_dims(z_dim, count))
            layers.append(ConditionalSylvester(z_dim, net, count))
    return nn.ModuleList(layers)


class FlowNet(nn.Module):
    """The networks of a flow guide, one module (so one ``pyro.module`` name holds them all):
    ``forward(x) -> (z_loc, z_scale, transforms)``, the base Gaussian and the flow layers
    conditioned on the encoder's context h(x)."""

    def __init__(self, encoder: ContextGaussianEncoder, layers: nn.ModuleList, reverse_between: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.layers = layers
        self.reverse_between = reverse_between

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[T.Transform]]:
        z_loc, z_scale, context = self.encoder(x)
        transforms: list[T.Transform] = []
        z_dim = z_loc.shape[-1]
        for k, layer in enumerate(self.layers):
            transforms.append(cast(ConditionalTransformModule, layer).condition(context))
            if self.reverse_between and k < len(self.layers) - 1:
                transforms.append(T.Permute(torch.arange(z_dim - 1, -1, -1, device=z_loc.device)))
        return z_loc, z_scale, transforms

    @classmethod
    def build(
        cls,
        kind: str,
        x_dim: int,
        z_dim: int,
        hidden_sizes: Sequence[int] = (400,),
        num_layers: int = 2,
        context_dim: Optional[int] = None,
        activation: str = "relu",
        flow_hidden: Optional[Sequence[int]] = None,
    ) -> FlowNet:
        """An MLP encoder with a context of ``context_dim`` (default ``max(2 z_dim, 16)``) and
        ``num_layers`` layers of ``kind``."""
        context_dim = int(context_dim) if context_dim is not None else max(2 * z_dim, 16)
        encoder = ContextGaussianEncoder(x_dim, z_dim, hidden_sizes, context_dim, activation)
        layers = flow_layers(kind, z_dim, context_dim, num_layers, flow_hidden)
        return cls(encoder, layers, reverse_between=kind in _REVERSED_ORDER)


class FlowGuide:
    """q_φ(z|x): a normalizing flow on a Gaussian base, both conditioned on x (see the module
    docstring). Site ``"z"``, the pyrovae guide signature; swaps with any other guide.

    :param net: a :class:`FlowNet` (e.g. ``FlowNet.build("iaf", x_dim, z_dim, num_layers=4)``),
        held as ``encoder`` like every amortized guide's network (its encoder and flow layers).
    :param beta: KL weight; must equal the model's β.
    :param name: the ``pyro.module`` name of ``net``.
    """

    amortized = True

    def __init__(self, net: FlowNet, beta: float = 1.0, name: str = "encoder") -> None:
        self.encoder = net
        self.beta = float(beta)
        self.name = name

    def distribution(self, x: torch.Tensor) -> dist.TransformedDistribution:
        """q(z|x) for a batch, batch shape ``(B,)``, event shape ``(z_dim,)``."""
        z_loc, z_scale, transforms = self.encoder(x)
        return dist.TransformedDistribution(dist.Normal(z_loc, z_scale).to_event(1), transforms)

    def __call__(
        self, x: Optional[torch.Tensor], index: Optional[torch.Tensor] = None, num_data: Optional[int] = None
    ) -> torch.Tensor:
        if x is None:
            raise ValueError("the flow guide needs the data x: q(z|x) is a function of x")
        register(self.name, self.encoder)
        with data_plate(x, index, num_data):
            fn = self.distribution(x)
            with latent_scale(self.beta):
                return pyro.sample("z", fn)


def flow_guide(kind: str, x_dim: int, z_dim: int, **kwargs: Any) -> FlowGuide:
    """``FlowGuide(FlowNet.build(kind, x_dim, z_dim, **net_kwargs), beta=..., name=...)``."""
    guide_kwargs = {k: kwargs.pop(k) for k in ("beta", "name") if k in kwargs}
    return FlowGuide(FlowNet.build(kind, x_dim, z_dim, **kwargs), **guide_kwargs)


def full_covariance_guide(
    x_dim: int, z_dim: int, hidden_sizes: Sequence[int] = (400,), activation: str = "relu", **kwargs: Any
) -> FullCovarianceGuide:
    """``FullCovarianceGuide(FullCovEncoder(x_dim, z_dim, hidden_sizes, activation), **kwargs)``."""
    return FullCovarianceGuide(FullCovEncoder(x_dim, z_dim, hidden_sizes, activation), **kwargs)


# ---------------------------------------------------------------------------------------------
# Per-datapoint (non-amortized) versions: every parameter a row per data point


class PerDatapointFullCovarianceGuide(PerDatapointGuide):
    """q_i(z) = N(loc_i, L_i L_iᵀ), one full-covariance Gaussian per data point i = 0..N-1.

    The params ``"<prefix>.z_loc"`` ``(N, z_dim)`` and ``"<prefix>.z_scale_tril"``
    ``(N, z_dim, z_dim)`` (``constraints.lower_cholesky``) live inside the subsampled plate
    (``event_dim`` 1 and 2), so a batch reads and updates its own rows only, and :func:`pyrovae.fit`
    gives them lazy Adam updates. Other arguments as :class:`~pyrovae.PerDatapointGuide`.
    """

    @property
    def local_param_names(self) -> frozenset[str]:
        return frozenset({f"{self.prefix}.z_loc", f"{self.prefix}.z_scale_tril"})

    def distribution(self, device: torch.device) -> dist.TorchDistribution:
        n, d = self.num_data, self.z_dim
        z_loc = pyro.param(
            f"{self.prefix}.z_loc", lambda: torch.full((n, d), self.init_loc, device=device), event_dim=1
        )
        tril = pyro.param(
            f"{self.prefix}.z_scale_tril",
            lambda: self.init_scale * torch.eye(d, device=device).expand(n, d, d).contiguous(),
            constraint=constraints.lower_cholesky,
            event_dim=2,
        )
        fn = dist.MultivariateNormal(z_loc, scale_tril=tril)
        return fn if self.reparameterized else non_reparameterized(fn)


#: The flows :class:`PerDatapointFlowGuide` holds per-point parameters for (vectors per layer).
LOCAL_FLOW_KINDS = ("planar", "sylvester")


class PerDatapointFlowGuide(PerDatapointGuide):
    """q_i(z): a planar or Sylvester flow with its own parameters for every data point i, on a
    per-point diagonal Gaussian base: the non-amortized flow q* of Cremer, Li & Duvenaud (2018).

    Each layer's parameters are rows ``(N, ·)`` of params ``"<prefix>.flow<k>.<name>"`` inside the
    subsampled plate (lazy Adam under :func:`pyrovae.fit`), started from a seeded draw (Pyro's
    ``Planar`` initialisation U(±1/√D) for planar; ±0.01 for Sylvester, near the identity).

    :param kind: ``"planar"`` or ``"sylvester"``.
    :param num_layers: flow layers.
    :param seed: seed of the initial flow parameters.

    Other arguments as :class:`~pyrovae.PerDatapointGuide`.
    """

    def __init__(
        self, num_data: int, z_dim: int, kind: str = "planar", num_layers: int = 2, seed: int = 0, **kwargs: Any
    ) -> None:
        if kind not in LOCAL_FLOW_KINDS:
            raise ValueError(f"per-datapoint flows are {list(LOCAL_FLOW_KINDS)}; got {kind!r}")
        if int(num_layers) < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        if kwargs.get("reparameterized") is False:
            raise ValueError("a flow guide is pathwise: reparameterized=False is not available for it")
        super().__init__(num_data, z_dim, **kwargs)
        self.kind = kind
        self.num_layers = int(num_layers)
        self.seed = int(seed)
        self.count_householder = z_dim // 2 + 1

    def _layer_shapes(self) -> dict[str, int]:
        d = self.z_dim
        if self.kind == "planar":
            return {"b": 1, "u": d, "w": d}
        m = self.count_householder
        return dict(zip(("u", "r_dense", "r_diag", "s_dense", "s_diag", "b"), ConditionalSylvester.param_dims(d, m)))

    @property
    def local_param_names(self) -> frozenset[str]:
        names = {f"{self.prefix}.z_loc", f"{self.prefix}.z_scale"}
        for k in range(self.num_layers):
            names |= {f"{self.prefix}.flow{k}.{name}" for name in self._layer_shapes()}
        return frozenset(names)

    def _initial(self, k: int, name: str, size: int, device: torch.device) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1000 + k * 10 + sorted(self._layer_shapes()).index(name))
        bound = 1 / self.z_dim**0.5 if self.kind == "planar" else 0.01
        value = (torch.rand(self.num_data, size, generator=generator) * 2 - 1) * bound
        return value.to(device=device, dtype=torch.get_default_dtype())

    def distribution(self, device: torch.device) -> dist.TorchDistribution:
        z_loc, z_scale = self._params(device)
        transforms: list[T.Transform] = []
        for k in range(self.num_layers):
            rows = [
                pyro.param(
                    f"{self.prefix}.flow{k}.{name}",
                    partial(self._initial, k, name, size, device),
                    event_dim=1,
                )
                for name, size in self._layer_shapes().items()
            ]
            if self.kind == "planar":
                transforms.append(ConditionedPlanar(tuple(rows)))
            else:
                matrices = sylvester_matrices(rows, self.z_dim, self.count_householder)
                transforms.append(_ConditionedSylvester(_constant(matrices)))
        return dist.TransformedDistribution(dist.Normal(z_loc, z_scale).to_event(1), transforms)
