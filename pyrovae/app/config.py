"""Typed training configuration (stdlib dataclasses) that round-trips through JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, get_args, get_origin, get_type_hints

DatasetName = Literal["mnist", "gmm", "linear"]
ModelName = Literal["vae", "hvae", "vqvae", "vqvae2", "linear"]
GuideName = Literal["amortized", "per-datapoint", "prior"]
ObjectiveName = Literal["elbo", "elbo-analytic", "elbo-stl", "iwae", "iwae-stl", "iwae-dreg", "score"]
LikelihoodName = Literal["bernoulli", "gaussian"]
BinarizeName = Literal["dynamic", "static", "none"]
ActivationName = Literal["relu", "tanh", "softplus", "elu", "gelu"]
NetworkName = Literal["mlp", "conv"]
XScaleShape = Literal["shared", "pixel"]
WeightInit = Literal["torch", "glorot"]

#: Per-data-set defaults for the fields left as ``None``.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "mnist": dict(model="vae", likelihood="bernoulli", z_dim=50, hidden_sizes=(400,), binarize="dynamic"),
    "gmm": dict(model="vae", likelihood="gaussian", z_dim=2, hidden_sizes=(64, 64), binarize="none",
                learn_x_scale=True),
    "linear": dict(model="linear", likelihood="gaussian", z_dim=2, hidden_sizes=(64,), binarize="none",
                   learn_x_scale=True),
}


@dataclass
class TrainConfig:
    """Everything that defines a training run; ``None`` fields take the data set's defaults
    (:data:`DATASET_DEFAULTS`) in :meth:`resolved`.

    :param dataset: ``mnist``, ``gmm`` (3-component Gaussian mixture in R²) or ``linear``
        (linear-Gaussian latent model with exact log p(x)).
    :param model: ``vae`` (MLP decoder), ``hvae`` (several stochastic layers,
        :class:`~pyrovae.models.HierarchicalVAE`) or ``linear`` (linear decoder, Gaussian noise).
    :param guide: ``amortized`` (encoder), ``per-datapoint`` (one Gaussian per training point) or
        ``prior`` (q = p(z)).
    :param objective: ``elbo``, ``elbo-analytic``, ``elbo-stl``, ``iwae``, ``iwae-stl``,
        ``iwae-dreg`` or ``score`` (:data:`pyrovae.infer.objectives.OBJECTIVES`).
    :param num_particles: K samples per data point in the objective.
    :param reparameterized: ``False`` samples the guide without pathwise gradients.
    :param upper_z_dims: ``hvae``: sizes of the latent layers above z (``z_dim`` is the bottom
        one); default one layer of ``z_dim // 2``.
    :param upper_hidden_sizes: ``hvae``: hidden widths of the networks between latent layers;
        default half of ``hidden_sizes``. Burda et al.'s two-layer model is ``z_dim=100,
        upper_z_dims=(50,), hidden_sizes=(200, 200)``, ``upper_hidden_sizes=(100, 100)``, tanh.
    :param x_scale_shape: ``shared`` (one σ of the Gaussian likelihood) or ``pixel`` (one learned
        σ per pixel; needs ``learn_x_scale``).
    :param num_codes: ``vqvae``/``vqvae2``: codebook size K (of the bottom level for ``vqvae2``;
        ``z_dim`` is the code dimension D).
    :param num_codes_top: ``vqvae2``: the top level's codebook size (default ``num_codes``).
    :param commitment: ``vqvae``: β of the commitment loss.
    :param codebook_ema: ``vqvae``/``vqvae2``: γ of EMA codebook updates (e.g. 0.99) instead of the
        codebook loss (``None``).
    :param network: ``mlp`` or ``conv`` (for image data: two stride-2 convolutions and a dense
        layer of width ``hidden_sizes[0]`` in the encoder, the mirror image in the decoder; for
        ``hvae`` the networks next to x).
    :param weight_init: ``torch`` (torch's default initialisation) or ``glorot`` (Glorot-uniform
        weights and zero biases in every network, :func:`pyrovae.nets.glorot_init_`).
    :param data_bias: start the decoder at the mean training image (its output bias is the logit
        of the mean, :func:`pyrovae.nets.init_output_bias_`); ``vae``/``hvae`` with MLP decoders.
    :param lr_decay: learning-rate factor per epoch (1 = constant).
    :param num_train: use only the first ``num_train`` training points (``None``: all).
    :param num_test: use only the first ``num_test`` test points (``None``: all).
    :param eval_samples: K of the importance-sampled test log-likelihood.
    :param test_time_steps: Adam steps of the test-set per-datapoint guide (per-datapoint only).
    :param clip_norm: clip the gradient's global L2 norm to this value (``None``: no clipping).
    :param local_steps: per-datapoint guide only: Adam steps of each batch's rows on their own
        ELBO before every decoder step (0: one joint step; see :func:`pyrovae.fit`).
    :param local_lr: the step size of those local steps.
    """

    dataset: DatasetName = "mnist"
    model: Optional[ModelName] = None
    guide: GuideName = "amortized"
    objective: ObjectiveName = "elbo"
    num_particles: int = 1
    reparameterized: bool = True
    z_dim: Optional[int] = None
    hidden_sizes: Optional[tuple[int, ...]] = None
    upper_z_dims: tuple[int, ...] = ()
    upper_hidden_sizes: Optional[tuple[int, ...]] = None
    activation: ActivationName = "relu"
    network: NetworkName = "mlp"
    weight_init: WeightInit = "torch"
    data_bias: bool = False
    num_codes: int = 64
    num_codes_top: Optional[int] = None
    commitment: float = 0.25
    codebook_ema: Optional[float] = None
    likelihood: Optional[LikelihoodName] = None
    x_scale: float = 1.0
    learn_x_scale: Optional[bool] = None
    x_scale_shape: XScaleShape = "shared"
    beta: float = 1.0
    epochs: int = 20
    batch_size: int = 100
    lr: float = 1e-3
    lr_decay: float = 1.0
    seed: int = 0
    device: str = "cpu"
    binarize: Optional[BinarizeName] = None
    num_train: Optional[int] = None
    num_test: Optional[int] = None
    eval_samples: int = 5000
    eval_chunk: int = 100
    eval_batch: int = 100
    test_time_steps: int = 300
    clip_norm: Optional[float] = None
    local_steps: int = 0
    local_lr: float = 3e-2
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("hidden_sizes", "upper_hidden_sizes", "upper_z_dims"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, tuple(int(h) for h in value))
                if any(h < 1 for h in getattr(self, name)):
                    raise ValueError(f"{name} must hold positive integers, got {value!r}")
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices = _literal_choices(hints[f.name])
            if choices and value is not None and value not in choices:
                raise ValueError(f"{f.name}={value!r} is not one of {list(choices)}")
        positive_ints = ("num_particles", "epochs", "batch_size", "eval_samples", "eval_chunk", "eval_batch")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("z_dim", "num_train", "num_test"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 (or None), got {value!r}")
        if self.test_time_steps < 0:
            raise ValueError(f"test_time_steps must be >= 0, got {self.test_time_steps}")
        if not isinstance(self.local_steps, int) or isinstance(self.local_steps, bool) or self.local_steps < 0:
            raise ValueError(f"local_steps must be an integer >= 0, got {self.local_steps!r}")
        if self.local_steps and self.guide != "per-datapoint":
            raise ValueError(
                f"local_steps={self.local_steps} refines the rows of a per-datapoint guide; with --guide "
                f"{self.guide} leave --local-steps at 0 (or use --guide per-datapoint)"
            )
        if not self.local_lr > 0:
            raise ValueError(f"local_lr must be positive, got {self.local_lr} (--local-lr, e.g. 3e-2)")
        hints = {
            "lr": "the Adam step size, e.g. 1e-3",
            "beta": "the KL weight of the β-VAE; 1 is the plain VAE",
            "x_scale": "the standard deviation σ of the Gaussian likelihood, e.g. 1.0",
        }
        for name, hint in hints.items():
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"{name} must be positive, got {getattr(self, name)} (--{name.replace('_', '-')}: {hint})"
                )
        if not isinstance(self.num_codes, int) or self.num_codes < 2:
            raise ValueError(f"num_codes must be an integer >= 2, got {self.num_codes!r}")
        if self.num_codes_top is not None and (not isinstance(self.num_codes_top, int) or self.num_codes_top < 2):
            raise ValueError(f"num_codes_top must be an integer >= 2 (or None: as num_codes), got {self.num_codes_top!r}")
        if not self.commitment >= 0:
            raise ValueError(f"commitment must be >= 0, got {self.commitment}")
        if self.codebook_ema is not None and not 0 < self.codebook_ema < 1:
            raise ValueError(f"codebook_ema must be in (0, 1), got {self.codebook_ema} (--codebook-ema, e.g. 0.99)")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be positive, got {self.clip_norm}; leave it unset for no clipping")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay}; 1 means no decay")

    def resolved(self) -> "TrainConfig":
        """A copy with every ``None`` field set to the data set's default."""
        defaults = DATASET_DEFAULTS[self.dataset]
        updates = {
            name: value for name, value in defaults.items() if getattr(self, name, None) is None
        }
        if self.learn_x_scale is None and "learn_x_scale" not in updates:
            updates["learn_x_scale"] = False
        resolved = dataclasses.replace(self, **updates)
        if resolved.model == "hvae":
            more: dict[str, Any] = {}
            if not resolved.upper_z_dims:
                more["upper_z_dims"] = (max(1, resolved.z_dim // 2),)
            if resolved.upper_hidden_sizes is None:
                more["upper_hidden_sizes"] = tuple(max(1, h // 2) for h in resolved.hidden_sizes)
            resolved = dataclasses.replace(resolved, **more)
        elif resolved.upper_z_dims or resolved.upper_hidden_sizes is not None:
            raise ValueError(
                f"upper_z_dims and upper_hidden_sizes are for model='hvae' (several latent layers), not "
                f"{resolved.model!r}; add --model hvae or drop them"
            )
        return resolved

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("hidden_sizes", "upper_hidden_sizes", "upper_z_dims"):
            if out[name] is not None:
                out[name] = list(out[name])
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        return cls.from_dict(json.loads(text))


def config_differences(
    saved: dict[str, Any], requested: dict[str, Any], ignore: frozenset[str] | set[str] = frozenset()
) -> dict[str, tuple[Any, Any]]:
    """The fields in which two config dicts (``TrainConfig.to_dict()``) differ, as
    ``{name: (saved, requested)}``, skipping ``ignore``. A field that ``saved`` lacks (it was
    written by an older pyrovae, before the field existed) counts as that field's default."""
    defaults = TrainConfig().to_dict()
    differ = {}
    for name, value in requested.items():
        if name in ignore:
            continue
        old = saved.get(name, defaults.get(name))
        if old != value:
            differ[name] = (old, value)
    return differ


def _literal_choices(hint: Any) -> tuple[Any, ...]:
    if get_origin(hint) is Literal:
        return get_args(hint)
    for arg in get_args(hint):
        if get_origin(arg) is Literal:
            return get_args(arg)
    return ()
