"""The training configuration: one typed stdlib dataclass per concern, composed by :class:`TrainConfig`.

=======================  ============================================================================
``config.data``          :class:`DataConfig`: which data set, its binarization, how many points
``config.generative``    :class:`ModelConfig`: the model family (:data:`pyrovae.app.registry` names it)
                         and its networks and likelihood
``config.variational``   :class:`GuideConfig`: the guide family and its options
``config.loss``          :class:`ObjectiveConfig`: the objective (:data:`pyrovae.infer.objectives.OBJECTIVES`),
                         its particles and the KL weight β
``config.optim``         :class:`OptimConfig`: epochs, minibatches, Adam's step size and its schedule
``config.evaluation``    :class:`EvalConfig`: the test-set estimates
``config.runtime``       :class:`RuntimeConfig`: seed and device
=======================  ============================================================================

Every option lives in exactly one group under a name unique across groups, so the flat view still
works: ``TrainConfig(z_dim=5, lr=1e-2)``, ``config.z_dim``, ``dataclasses.replace(config, seed=1)``
and :meth:`TrainConfig.to_dict` (the flat dict that checkpoints and ``metrics.json`` hold) mean what
they always did. :meth:`TrainConfig.to_nested_dict` / :meth:`~TrainConfig.to_json` write the nested
form; :meth:`TrainConfig.from_dict` reads either.

Each check is made once: a field's own check (type, choices, range) in its group's
``__post_init__``, from the field's metadata (:func:`option`); checks across fields, which depend on
the model and guide families, in :func:`pyrovae.app.registry.check_combination`, which
:class:`TrainConfig` runs on construction. The command line (:mod:`pyrovae.app.cli`) generates its
flags from these fields (their docstrings are the flags' help) and its choices from the registries.

:class:`TrackingConfig` (``--log``, ``--log-dir``, ...) is checked and made into flags the same way
but is not a group of :class:`TrainConfig`: it says how a run is watched, not what it is.

Errors are :class:`ConfigError` (a ``ValueError``) and name Python parameters (``batch_size=0``);
only the command line speaks of flags.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Optional, Union, get_args, get_origin, get_type_hints

from pyrovae.data.dataset import DatasetName

LikelihoodName = Literal["bernoulli", "gaussian"]
BinarizeName = Literal["dynamic", "static", "none"]
ActivationName = Literal["relu", "tanh", "softplus", "elu", "gelu"]
NetworkName = Literal["mlp", "conv"]
XScaleShape = Literal["shared", "pixel"]
WeightInit = Literal["torch", "glorot"]
PriorName = Literal["normal", "vamp", "mog", "flow"]
PseudoInputInit = Literal["random", "data"]
FlowPriorName = Literal["affine", "spline"]
FastPathName = Literal["replay", "inductor", "eager"]
YModeName = Literal["enum", "score", "gumbel"]

#: Per-data-set defaults for the fields left as ``None``.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "mnist": dict(model="vae", likelihood="bernoulli", z_dim=50, hidden_sizes=(400,), binarize="dynamic"),
    "gmm": dict(
        model="vae", likelihood="gaussian", z_dim=2, hidden_sizes=(64, 64), binarize="none", learn_x_scale=True
    ),
    "linear": dict(
        model="linear", likelihood="gaussian", z_dim=2, hidden_sizes=(64,), binarize="none", learn_x_scale=True
    ),
}


class ConfigError(ValueError):
    """A wrong argument: a config field or a parameter of a library function.

    The message names Python parameters, written ``name=value`` (``batch_size=0``) or, when no value
    is meant, ```name``` in backticks; :attr:`params` lists the parameters at fault, the first the
    main one. The command line reports it with its flags instead (:func:`pyrovae.app.cli.flag_message`).
    """

    def __init__(self, message: str, *params: str) -> None:
        super().__init__(message)
        self.params: tuple[str, ...] = params


# --------------------------------------------------------------------------------------------
# fields: one check each, from metadata


@dataclass(frozen=True)
class Check:
    """A range check of one field: ``test(value)`` must hold; the error says ``{name} must be {wants}``."""

    test: Callable[[Any], bool]
    wants: str


def at_least(n: int) -> Check:
    return Check(lambda v: v >= n, f"an integer >= {n}")


POSITIVE = Check(lambda v: v > 0, "positive")
NON_NEGATIVE = Check(lambda v: v >= 0, ">= 0")
OPEN_UNIT = Check(lambda v: 0 < v < 1, "in (0, 1)")
HALF_OPEN_UNIT = Check(lambda v: 0 < v <= 1, "in (0, 1]")
UNIT_INTERVAL = Check(lambda v: 0 <= v <= 1, "in [0, 1]")
POSITIVE_ENTRIES = Check(lambda v: all(h >= 1 for h in v), "positive integers")
QUADRANTS = Check(lambda v: v in (1, 2, 3), "1, 2 or 3")
DEVICE = Check(lambda v: re.fullmatch(r"(cpu|cuda)(:\d+)?", v) is not None, "'cpu', 'cuda' or 'cuda:N'")


def option(
    default: Any = dataclasses.MISSING,
    *,
    check: Optional[Check] = None,
    hint: str = "",
    choices: Optional[Callable[[], dict[str, str]]] = None,
    flag: Optional[str] = None,
) -> Any:
    """A config field with what its check and its flag need.

    :param check: the range check (types and ``Literal`` choices are checked from the annotation).
    :param hint: what the field means, added to its error, e.g. ``"the Adam step size, e.g. 1e-3"``.
    :param choices: ``() -> {name: one line}``: the allowed names and what each is, read from a
        registry when checked (never a copied list).
    :param flag: the command-line name when it is not the field's (``reparameterize`` for
        ``reparameterized``); the CLI is the only reader.
    """
    metadata = {"check": check, "hint": hint, "choices": choices, "flag": flag}
    return field(default=default, metadata=metadata)


def _model_choices() -> dict[str, str]:
    from pyrovae.app.registry import model_specs

    return {name: spec.help for name, spec in model_specs().items()}


def _guide_choices() -> dict[str, str]:
    from pyrovae.app.registry import guide_specs

    return {name: spec.help for name, spec in guide_specs().items()}


def _objective_choices() -> dict[str, str]:
    from pyrovae.infer.objectives import OBJECTIVES

    return {name: description for name, (_, description) in OBJECTIVES.items()}


def field_choices(group: type, f: dataclasses.Field) -> tuple[Any, ...]:
    """The values ``f`` may take: its registry's names, or its ``Literal``'s (empty: not a choice)."""
    if f.metadata.get("choices") is not None:
        return tuple(f.metadata["choices"]())
    hint = field_types(group)[f.name]
    for candidate in (hint, *get_args(hint)):
        if get_origin(candidate) is Literal:
            return get_args(candidate)
    return ()


@functools.cache
def field_types(group: type) -> dict[str, Any]:
    return get_type_hints(group)


def base_type(hint: Any) -> Any:
    """``int`` for ``Optional[int]``, ``tuple`` for ``tuple[int, ...]``, ``str`` for a ``Literal`` of names."""
    if get_origin(hint) is Union:
        hint = next(arg for arg in get_args(hint) if arg is not type(None))
    if get_origin(hint) is Literal:
        return type(get_args(hint)[0])
    return get_origin(hint) or hint


def is_optional(hint: Any) -> bool:
    return get_origin(hint) is Union and type(None) in get_args(hint)


def _check_field(group: Any, f: dataclasses.Field) -> None:
    group_type: type = type(group)  # as a plain type: mypy takes type[X] for unhashable
    hint = field_types(group_type)[f.name]
    value = getattr(group, f.name)
    if value is None:
        if is_optional(hint):
            return
        raise ConfigError(f"{f.name} must be set, got None", f.name)
    kind = base_type(hint)
    hint_text = f" (`{f.name}`: {f.metadata['hint']})" if f.metadata.get("hint") else ""
    if kind is tuple:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise ConfigError(f"{f.name} must be a sequence of integers, got {value!r}", f.name)
        value = tuple(value)
        if not all(isinstance(h, int) and not isinstance(h, bool) for h in value):
            raise ConfigError(f"{f.name} must hold integers, got {value!r}", f.name)
        object.__setattr__(group, f.name, value)
    elif kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{f.name} must be True or False, got {value!r}", f.name)
    elif kind is int:
        if not isinstance(value, int) or isinstance(value, bool):
            wants = f.metadata["check"].wants if f.metadata.get("check") else "an integer"
            raise ConfigError(f"{f.name} must be {wants}, got {value!r}{hint_text}", f.name)
    elif kind is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{f.name} must be a number, got {value!r}{hint_text}", f.name)
    elif kind is str and not isinstance(value, str):
        raise ConfigError(f"{f.name} must be a string, got {value!r}", f.name)
    choices = field_choices(type(group), f)
    if choices and value not in choices:
        raise ConfigError(f"{f.name}={value!r} is not one of {list(choices)}", f.name)
    check: Optional[Check] = f.metadata.get("check")
    if check is not None and not check.test(value):
        if kind is tuple:
            raise ConfigError(f"{f.name} must hold {check.wants}, got {value!r}{hint_text}", f.name)
        raise ConfigError(f"{f.name} must be {check.wants}, got {value!r}{hint_text}", f.name)


class _Group:
    """A group of options: each field checked on construction (groups are frozen, so they stay valid)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            _check_field(self, f)


# --------------------------------------------------------------------------------------------
# the groups


@dataclass(frozen=True)
class DataConfig(_Group):
    """The data.

    :param dataset: ``mnist``, ``gmm`` (3-component Gaussian mixture in R²) or ``linear``
        (linear-Gaussian latent model with exact log p(x)).
    :param binarize: MNIST's binarization: ``dynamic`` (a fresh draw each epoch), ``static`` (once)
        or ``none`` (grey levels, for a Gaussian likelihood); default by data set.
    :param num_train: use only the first N training points (default: all).
    :param num_test: use only the first N test points (default: all).
    """

    dataset: DatasetName = option("mnist")
    binarize: Optional[BinarizeName] = option(None)
    num_train: Optional[int] = option(None, check=at_least(1))
    num_test: Optional[int] = option(None, check=at_least(1))


@dataclass(frozen=True)
class ModelConfig(_Group):
    """The generative model p(x, z): its family and its networks.

    :param model: the model family, one of :func:`pyrovae.app.registry.model_specs` (``vae``,
        ``hvae``, ``vqvae``, ``vqvae2``, ``linear``); default by data set.
    :param z_dim: latent dimension (default: 50 mnist, 2 gmm/linear; the code dimension D of a VQ-VAE).
    :param hidden_sizes: hidden layer widths, e.g. 400 or 200 200 (default by data set); none (the flag
        alone, or ()) makes the MLP encoder and decoder linear maps.
    :param upper_z_dims: hvae: sizes of the latent layers above z_dim, e.g. 50 (default z_dim/2).
    :param upper_hidden_sizes: hvae: hidden widths between latent layers, e.g. 100 100 (default half
        of hidden_sizes). Burda et al.'s two-layer model is z_dim 100, upper_z_dims 50, hidden_sizes
        200 200, upper_hidden_sizes 100 100, tanh.
    :param activation: hidden activation.
    :param network: mlp, or conv (for image data: two stride-2 convolutions and a dense layer of width
        hidden_sizes[0] in the encoder, the mirror image in the decoder; for hvae the networks next to x).
    :param weight_init: torch (torch's default initialisation) or glorot (Glorot-uniform weights and
        zero biases in every network; Burda et al.).
    :param data_bias: start the decoder at the mean training image (its output bias is the logit of the
        mean); vae/hvae with MLP networks.
    :param likelihood: the family of p(x|z) (default by data set).
    :param x_scale: σ of the Gaussian likelihood (its initial value if learned).
    :param learn_x_scale: learn σ of the Gaussian likelihood (default: on for gmm/linear).
    :param x_scale_shape: shared (one σ of the Gaussian likelihood) or pixel (one learned σ per pixel;
        needs learn_x_scale).
    :param num_codes: vqvae/vqvae2: codebook size K (of the bottom level for vqvae2; z_dim is the code
        dimension D).
    :param num_codes_top: vqvae2: the top level's codebook size (default num_codes).
    :param codebook_ema: vqvae/vqvae2: update the codebook by moving averages with this decay γ (e.g.
        0.99) instead of the codebook loss.
    :param prior: vae: the prior p(z): normal (N(0, I)), vamp (VampPrior, Tomczak & Welling 2018: a
        mixture of the amortized encoder's posteriors at learned pseudo-inputs; guide amortized), mog (a
        learned mixture of diagonal Gaussians) or flow (N(0, I) through a learned autoregressive flow).
    :param num_pseudo_inputs: prior vamp: the number K of pseudo-inputs (500 in the paper).
    :param pseudo_input_init: prior vamp: random (every pixel N(0.05, 0.01²), the paper code's default)
        or data (random training points plus N(0, 0.01²) noise, the paper code's use_training_data_init).
    :param prior_components: prior mog: the number of mixture components.
    :param prior_flow: prior flow: affine (masked autoregressive flow, Pyro's affine_autoregressive) or
        spline (Pyro's spline_autoregressive) layers.
    :param prior_flow_layers: prior flow: the number of flow layers.
    :param labels: m2: the number of labelled training points, the same number per class, chosen with
        the run's seed (Kingma et al. 2014: 100, 600, 1000 or 3000); the others are unlabelled
        (default 100).
    :param m2_alpha: m2: the weight of each labelled point's -log q(y|x) in the loss (default
        0.1 N / labels: Kingma et al.'s α = 0.1 N on the mean over the labelled points).
    :param labelled_copies: m2: hold each labelled training point this many times, its terms weighted
        by 1/copies: the same objective, with the labelled points in that many times more minibatches
        (the ELBO objectives only).
    :param quadrants: cvae: how many of each image's four quadrants are observed, 1, 2 or 3 (Pyro's
        order: bottom-left, then top-left, then top-right); the model predicts the others (default 1).
    :param cvae_baseline_epochs: cvae: epochs of the deterministic baseline, trained by maximum
        likelihood before the CVAE (whose prior network reads its prediction).
    """

    model: Optional[str] = option(None, choices=_model_choices)
    z_dim: Optional[int] = option(None, check=at_least(1))
    hidden_sizes: Optional[tuple[int, ...]] = option(None, check=POSITIVE_ENTRIES)
    upper_z_dims: tuple[int, ...] = option((), check=POSITIVE_ENTRIES)
    upper_hidden_sizes: Optional[tuple[int, ...]] = option(None, check=POSITIVE_ENTRIES)
    activation: ActivationName = option("relu")
    network: NetworkName = option("mlp")
    weight_init: WeightInit = option("torch")
    data_bias: bool = option(False)
    likelihood: Optional[LikelihoodName] = option(None)
    x_scale: float = option(1.0, check=POSITIVE, hint="the standard deviation σ of the Gaussian likelihood, e.g. 1.0")
    learn_x_scale: Optional[bool] = option(None)
    x_scale_shape: XScaleShape = option("shared")
    num_codes: int = option(64, check=at_least(2))
    num_codes_top: Optional[int] = option(None, check=at_least(2), hint="or None: as num_codes")
    codebook_ema: Optional[float] = option(None, check=OPEN_UNIT, hint="e.g. 0.99")
    prior: PriorName = option("normal")
    num_pseudo_inputs: int = option(500, check=at_least(1))
    pseudo_input_init: PseudoInputInit = option("random")
    prior_components: int = option(10, check=at_least(1))
    prior_flow: FlowPriorName = option("affine")
    prior_flow_layers: int = option(2, check=at_least(1))
    labels: Optional[int] = option(None, check=at_least(1), hint="a multiple of the number of classes, e.g. 100")
    m2_alpha: Optional[float] = option(None, check=NON_NEGATIVE, hint="or None: 0.1 N / labels")
    labelled_copies: int = option(1, check=at_least(1))
    quadrants: Optional[int] = option(None, check=QUADRANTS, hint="how many of the four quadrants are observed")
    cvae_baseline_epochs: int = option(10, check=at_least(1))


@dataclass(frozen=True)
class GuideConfig(_Group):
    """The guide q(z|x): its family and its options.

    :param guide: the guide family q(z|x), one of :func:`pyrovae.app.registry.guide_specs`
        (``amortized``, ``per-datapoint``, ``per-datapoint-full-cov``, ``per-datapoint-planar``,
        ``per-datapoint-sylvester``, ``prior``, ``full-cov``, ``iaf``, ``planar``, ``sylvester``,
        ``spline``).
    :param reparameterized: sample the guide with pathwise gradients; off: score-function gradients only.
    :param commitment: vqvae/vqvae2: β of the commitment loss.
    :param local_steps: per-datapoint guide: Adam steps of each batch's rows on their own ELBO before
        every decoder step (10 trains MNIST well; 0, one joint step, leaves q near the prior).
    :param local_lr: per-datapoint guide: the step size of those local steps.
    :param flow_layers: flow guides (iaf, planar, sylvester, spline): the number of flow layers.
    :param flow_hidden_sizes: flow guides: the hidden widths of each flow layer's network (its
        autoregressive net, or the hypernetwork that gives a planar or Sylvester layer its
        parameters from the encoder's context), e.g. 100 (default max(10 z_dim, 32)). A Sylvester
        layer's hypernetwork outputs two D × D matrices, so its last layer dominates the step: a
        narrow one (e.g. 100 for z_dim 50) makes it several times cheaper.
    :param y_mode: m2: how the guide treats an unlabelled point's class y: enum (summed out exactly;
        objective elbo-enum), score (sampled, log-derivative gradient; objective elbo, or iwae with
        VIMCO's baseline) or gumbel (sampled by straight-through Gumbel-softmax; objective elbo or iwae).
    :param gumbel_temperature: m2 with y_mode gumbel: the temperature τ of the relaxation.
    """

    guide: str = option("amortized", choices=_guide_choices)
    reparameterized: bool = option(True, flag="reparameterize")
    commitment: float = option(0.25, check=NON_NEGATIVE)
    local_steps: int = option(0, check=at_least(0))
    local_lr: float = option(3e-2, check=POSITIVE, hint="e.g. 3e-2")
    flow_layers: int = option(2, check=at_least(1))
    flow_hidden_sizes: Optional[tuple[int, ...]] = option(None, check=POSITIVE_ENTRIES)
    y_mode: YModeName = option("enum")
    gumbel_temperature: float = option(0.5, check=POSITIVE, hint="e.g. 0.5")


@dataclass(frozen=True)
class ObjectiveConfig(_Group):
    """The training objective.

    :param objective: the training objective, one of :data:`pyrovae.infer.objectives.OBJECTIVES`
        (``elbo``, ``elbo-enum``, ``elbo-analytic``, ``elbo-stl``, ``iwae``, ``iwae-stl``, ``iwae-dreg``, ``score``,
        ``miwae``, ``piwae``, ``ciwae``).
    :param num_particles: K samples per data point in the objective (per group for miwae and piwae,
        which draw num_groups × K).
    :param beta: the KL weight of the β-VAE; 1 is the plain VAE.
    :param num_groups: miwae/piwae: M, the number of independent IWAE estimates of K samples each
        (miwae averages them; piwae's encoder does, its decoder uses IWAE with all M × K samples).
    :param ciwae_beta: ciwae: the ELBO's weight β in β ELBO + (1 - β) IWAE (1: the ELBO, 0: IWAE);
        not the KL weight beta.
    """

    objective: str = option("elbo", choices=_objective_choices)
    num_particles: int = option(1, check=at_least(1))
    beta: float = option(1.0, check=POSITIVE, hint="the KL weight of the β-VAE; 1 is the plain VAE")
    num_groups: int = option(1, check=at_least(1))
    ciwae_beta: float = option(0.5, check=UNIT_INTERVAL, hint="the ELBO's weight in CIWAE, e.g. 0.5")


def objective_options(config: Any) -> dict[str, Any]:
    """The options of ``config`` (a :class:`TrainConfig` or an :class:`ObjectiveConfig`) that its
    objective's constructor takes (``num_groups`` for miwae, ...), by name, for
    :func:`pyrovae.infer.objectives.make_objective`."""
    from pyrovae.infer.objectives import objective_parameters

    accepted = objective_parameters(config.objective) or frozenset()
    return {name: getattr(config, name) for name in objective_option_names() if name in accepted}


def objective_option_names() -> tuple[str, ...]:
    """The fields of :class:`ObjectiveConfig` that are parameters of some objective's constructor."""
    from pyrovae.infer.objectives import OBJECTIVES, objective_parameters

    taken = set().union(*(objective_parameters(name) or () for name in OBJECTIVES))
    return tuple(
        f.name
        for f in dataclasses.fields(ObjectiveConfig)
        if f.name not in ("objective", "num_particles") and f.name in taken
    )


@dataclass(frozen=True)
class OptimConfig(_Group):
    """The optimisation.

    :param epochs: passes over the training set.
    :param batch_size: minibatch size.
    :param lr: Adam's step size.
    :param lr_decay: learning-rate factor per epoch (1 = constant).
    :param clip_norm: clip the gradient's global L2 norm to this value (default: no clipping).
    """

    epochs: int = option(20, check=at_least(1))
    batch_size: int = option(100, check=at_least(1))
    lr: float = option(1e-3, check=POSITIVE, hint="the Adam step size, e.g. 1e-3")
    lr_decay: float = option(1.0, check=HALF_OPEN_UNIT, hint="1 means no decay")
    clip_norm: Optional[float] = option(None, check=POSITIVE, hint="leave it unset for no clipping")


@dataclass(frozen=True)
class EvalConfig(_Group):
    """The test-set evaluation.

    :param eval_samples: K of the importance-sampled test log-likelihood.
    :param eval_chunk: importance samples per vectorized pass.
    :param eval_batch: test points per vectorized pass.
    :param test_time_steps: Adam steps fitting a guide of the trained per-datapoint family to the test
        set (non-amortized guides only).
    """

    eval_samples: int = option(5000, check=at_least(1))
    eval_chunk: int = option(100, check=at_least(1))
    eval_batch: int = option(100, check=at_least(1))
    test_time_steps: int = option(300, check=at_least(0))


@dataclass(frozen=True)
class RuntimeConfig(_Group):
    """Where and how reproducibly the run executes.

    :param seed: random seed (data order, initialisation, sampling).
    :param device: cpu or cuda[:N].
    :param fast_path: how training steps and the evaluation's importance draws run: replay (Pyro's
        step traced once per batch shape, then its recorded tensor ops replayed: the same bits as
        Pyro, checked against it on the first replay), inductor (the same graphs compiled: faster,
        equal to rounding), or eager (Pyro's code every time).
    """

    seed: int = option(0)
    device: str = option("cpu")
    fast_path: FastPathName = option("replay")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_device_name(self.device)


def _logger_choices() -> dict[str, str]:
    from pyrovae.train.tracking import LOGGERS

    return {"none": "no experiment tracking", **{name: line for name, (line, _) in LOGGERS.items()}}


@dataclass(frozen=True)
class TrackingConfig(_Group):
    """Experiment tracking: TensorBoard or MLflow (pyrovae.train.tracking).

    How a run is watched, not what it is: not a group of :class:`TrainConfig` (not saved with the
    run, free to change on resume).

    :param log: log the run to a tracker, one of :data:`pyrovae.train.tracking.LOGGERS` (``none``,
        ``tensorboard``, ``mlflow``); needs the extra of that name, e.g. pip install "pyrovae[tensorboard]".
    :param log_dir: the tracker's folder (default: the run folder's tb/ for tensorboard, mlruns/ for mlflow).
    :param tracking_uri: mlflow: the tracking server or store URI (default: a local store in log_dir).
    :param log_every: log the step's loss and gradient norm every this many steps.
    """

    log: str = option("none", choices=_logger_choices)
    log_dir: Optional[str] = option(None)
    tracking_uri: Optional[str] = option(None)
    log_every: int = option(10, check=at_least(1))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tracking_uri is not None and self.log != "mlflow":
            raise ConfigError(
                f"tracking_uri={self.tracking_uri!r} is MLflow's; set log='mlflow' or leave `tracking_uri` unset",
                "tracking_uri",
                "log",
            )
        if self.log_dir is not None and self.log == "none":
            raise ConfigError(
                f"log_dir={self.log_dir!r} needs a tracker: set log='tensorboard' or log='mlflow'", "log_dir", "log"
            )


#: The groups of :class:`TrainConfig`: attribute name -> class.
GROUPS: dict[str, type] = {
    "data": DataConfig,
    "generative": ModelConfig,
    "variational": GuideConfig,
    "loss": ObjectiveConfig,
    "optim": OptimConfig,
    "evaluation": EvalConfig,
    "runtime": RuntimeConfig,
}

#: Every option's group: field name -> group attribute.
GROUP_OF: dict[str, str] = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}


def option_fields() -> list[tuple[type, dataclasses.Field]]:
    """Every option as ``(group class, field)``, in the groups' order."""
    return [(cls, f) for cls in GROUPS.values() for f in dataclasses.fields(cls)]


def check_device_name(device: str, param: str = "device") -> None:
    """Refuse a device pyrovae does not run on (no torch needed)."""
    if not isinstance(device, str) or not DEVICE.test(device):
        raise ConfigError(
            f"{param}={device!r} is not a device pyrovae runs on; use {param}='cpu' or {param}='cuda' (or 'cuda:N')",
            param,
        )


@dataclass(init=False)
class TrainConfig:
    """Everything that defines a training run, as seven groups (see :mod:`pyrovae.app.config`).

    Build it flat, ``TrainConfig(dataset="gmm", z_dim=3, lr=1e-2)``, or from groups,
    ``TrainConfig(optim=OptimConfig(lr=1e-2))`` (flat keywords win over a group's value); read it
    flat (``config.lr``) or by group (``config.optim.lr``). ``None`` options take the data set's or
    the model family's defaults in :meth:`resolved`. A config that exists is valid: every field and
    every combination is checked on construction (:func:`pyrovae.app.registry.check_combination`).

    :param extra: free-form notes kept with the run (not read by pyrovae).
    """

    data: DataConfig
    generative: ModelConfig
    variational: GuideConfig
    loss: ObjectiveConfig
    optim: OptimConfig
    evaluation: EvalConfig
    runtime: RuntimeConfig
    extra: dict[str, Any]

    def __init__(
        self,
        data: Optional[DataConfig] = None,
        generative: Optional[ModelConfig] = None,
        variational: Optional[GuideConfig] = None,
        loss: Optional[ObjectiveConfig] = None,
        optim: Optional[OptimConfig] = None,
        evaluation: Optional[EvalConfig] = None,
        runtime: Optional[RuntimeConfig] = None,
        extra: Optional[dict[str, Any]] = None,
        **options: Any,
    ) -> None:
        unknown = sorted(set(options) - set(GROUP_OF))
        if unknown:
            raise TypeError(f"TrainConfig() got unknown options {unknown}; valid options are {sorted(GROUP_OF)}")
        given = dict(
            data=data,
            generative=generative,
            variational=variational,
            loss=loss,
            optim=optim,
            evaluation=evaluation,
            runtime=runtime,
        )
        for name, cls in GROUPS.items():
            part = given[name]
            if part is not None and not isinstance(part, cls):
                raise TypeError(f"TrainConfig({name}=...) takes a {cls.__name__}, got {type(part).__name__}")
            updates = {k: v for k, v in options.items() if GROUP_OF[k] == name}
            if part is None:
                part = cls(**updates)
            elif updates:
                part = dataclasses.replace(part, **updates)
            setattr(self, name, part)
        self.extra = dict(extra or {})
        from pyrovae.app.registry import check_combination

        check_combination(self)

    @classmethod
    def _assemble(cls, groups: dict[str, Any], extra: dict[str, Any]) -> TrainConfig:
        """A config from checked groups, without the combination check (for :meth:`resolved`)."""
        config = cls.__new__(cls)
        for name in GROUPS:
            setattr(config, name, groups[name])
        config.extra = dict(extra)
        return config

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` option set to the data set's, then the model family's, default."""
        from pyrovae.app.registry import model_specs

        flat = self.to_dict()
        for name, value in DATASET_DEFAULTS[self.dataset].items():
            if flat[name] is None:
                flat[name] = value
        if flat["learn_x_scale"] is None:
            flat["learn_x_scale"] = False
        spec = model_specs().get(flat["model"])
        if spec is not None and spec.defaults is not None:
            flat.update(spec.defaults(flat))
        return self._assemble(_groups_of(flat), self.extra)

    if TYPE_CHECKING:
        # the flat view (``config.lr``): properties set on the class below, one per option of GROUP_OF;
        # a type checker reads them through this declaration (as Any: the groups hold their types)
        def __getattr__(self, name: str) -> Any: ...

    def replace(self, **changes: Any) -> TrainConfig:
        """A new (checked) config with ``changes``, flat options or groups:
        ``config.replace(lr=1e-3)``; the same as ``dataclasses.replace(config, lr=1e-3)``."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The flat dict ``{option: value}`` (tuples as lists), as checkpoints and ``metrics.json`` hold it."""
        return {**{name: _jsonable(getattr(self, name)) for name in GROUP_OF}, "extra": dict(self.extra)}

    def to_nested_dict(self) -> dict[str, Any]:
        """``{group: {option: value}}`` (and ``extra``)."""
        nested: dict[str, Any] = {
            group: {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(cls)}
            for group, cls in GROUPS.items()
        }
        nested["extra"] = dict(self.extra)
        return nested

    def to_json(self) -> str:
        """The nested form as JSON (:meth:`from_json` reads it back)."""
        return json.dumps(self.to_nested_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Read :meth:`to_dict`'s flat form (also as older pyrovae versions wrote it, without the
        options added since: they take their defaults) or :meth:`to_nested_dict`'s nested form."""
        flat = flatten_config_dict(data)
        extra = flat.pop("extra", None) or {}
        return cls(extra=extra, **flat)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls.from_dict(json.loads(text))


def _flat_property(name: str) -> property:
    group = GROUP_OF[name]
    return property(
        lambda self: getattr(getattr(self, group), name),
        doc=f"``config.{group}.{name}`` (read-only; make a new config with dataclasses.replace)",
    )


for _name in GROUP_OF:
    setattr(TrainConfig, _name, _flat_property(_name))
del _name


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _groups_of(flat: dict[str, Any]) -> dict[str, Any]:
    return {
        group: cls(**{f.name: flat[f.name] for f in dataclasses.fields(cls) if f.name in flat})
        for group, cls in GROUPS.items()
    }


def flatten_config_dict(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict in flat form: nested groups are opened, flat dicts pass as they are.

    :raises ConfigError: for keys that are neither options nor groups.
    """
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in GROUPS and isinstance(value, dict):
            stray = sorted(set(value) - {f.name for f in dataclasses.fields(GROUPS[key])})
            if stray:
                raise ConfigError(
                    f"unknown config keys {stray} in group {key!r}; valid keys are "
                    f"{sorted(f.name for f in dataclasses.fields(GROUPS[key]))}"
                )
            flat.update(value)
        else:
            flat[key] = value
    unknown = sorted(set(flat) - set(GROUP_OF) - {"extra"})
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; valid keys are {sorted([*GROUP_OF, 'extra'])}")
    return flat


def _open_groups(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with nested groups opened; any other key kept (``fit`` accepts any config dict)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in GROUPS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def config_differences(
    saved: dict[str, Any], requested: dict[str, Any], ignore: frozenset[str] | set[str] = frozenset()
) -> dict[str, tuple[Any, Any]]:
    """The options in which two config dicts (flat or nested) differ, as ``{name: (saved, requested)}``,
    skipping ``ignore``. An option that ``saved`` lacks (it was written by an older pyrovae, before the
    option existed) counts as that option's default."""
    defaults = {**{f.name: _jsonable(f.default) for _, f in option_fields()}, "extra": {}}
    saved, requested = _open_groups(saved), _open_groups(requested)
    differ = {}
    for name, value in requested.items():
        if name in ignore:
            continue
        old = saved.get(name, defaults.get(name))
        if _jsonable(old) != _jsonable(value):
            differ[name] = (old, value)
    return differ
