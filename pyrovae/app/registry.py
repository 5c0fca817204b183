"""The model and guide families the configuration, the command line and :func:`pyrovae.build` know,
one spec each (:class:`ModelSpec`, :class:`GuideSpec`), next to the code that builds it.

The config's choices (``TrainConfig(model=...)``, ``--model``), the checks of which options go
together (:func:`check_combination`, the one place they are made), building (:mod:`pyrovae.app.build`)
and the evaluation of a run (:func:`pyrovae.app.run.evaluate_run`) all read these specs; nothing
else names a family.

What a new family touches
=========================

- **A new model family**: the model itself (its module in ``pyrovae/models/``, or anywhere), and one
  module in ``pyrovae/app/families/`` with its builder and ``SPECS = (ModelSpec(...),)``, plus **one
  registration**: its module name in :data:`FAMILY_MODULES` below. Its options that other families
  do not read are listed in ``ModelSpec.options`` (their fields go in
  :class:`pyrovae.app.config.ModelConfig`, which also makes their ``--flags``).
- **A new guide family**: the guide, one module in ``pyrovae/app/families/`` with ``SPECS =
  (GuideSpec(...),)``, and its name in :data:`FAMILY_MODULES`.
- **A new objective**: its constructor in ``pyrovae/infer/objectives/`` and one entry in
  :data:`pyrovae.infer.objectives.OBJECTIVES`; the config's choices and ``--objective`` read that dict.
  An option of its own (as ``num_groups`` of ``miwae``/``piwae``, ``ciwae_beta`` of ``ciwae``) is a
  field of :class:`pyrovae.app.config.ObjectiveConfig` named as its constructor's parameter: the run
  passes it by that name (:func:`pyrovae.app.config.objective_options`), and a value away from its
  default for an objective whose constructor does not take it is refused.
- A family defined outside pyrovae (a user's own) registers at run time with :func:`register`.

No file has an ``isinstance`` switch on a family: a model family that needs its own encoder gives
``ModelSpec.amortized_guide``, one with its own metrics gives ``ModelSpec.evaluate``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

from pyrovae.app.config import GROUP_OF, ConfigError, option_fields

if TYPE_CHECKING:
    import torch

    from pyrovae.app.config import TrainConfig
    from pyrovae.data import Dataset

#: The modules that hold pyrovae's own families, each with ``SPECS``; one line per family module.
FAMILY_MODULES: tuple[str, ...] = (
    "pyrovae.app.families.vae",
    "pyrovae.app.families.hvae",
    "pyrovae.app.families.vq",
    "pyrovae.app.families.linear",
    "pyrovae.app.families.amortized",
    "pyrovae.app.families.per_datapoint",
    "pyrovae.app.families.prior",
    "pyrovae.app.families.flows",
    "pyrovae.app.families.m2",
    "pyrovae.app.families.cvae",
)


@dataclass(frozen=True)
class ModelSpec:
    """A model family.

    :param name: the name of ``TrainConfig(model=...)`` and ``--model``.
    :param build: ``build(config, dataset) -> model`` from a resolved config, networks on ``config.device``.
    :param help: one line for the command line's help.
    :param options: the options (config fields) only some families read, that this one reads; an
        option no chosen family reads must stay at its default (:func:`check_combination`).
    :param guides: the guide families it trains with (``None``: any).
    :param likelihoods: the likelihoods it has (``None``: any).
    :param needs_images: refuse data without an image shape.
    :param amortized_guide: ``(config, dataset, model) -> guide``: its own encoder guide for
        ``guide="amortized"`` (``None``: a Gaussian encoder, :func:`pyrovae.app.families.amortized.gaussian_encoder_guide`).
    :param check: further checks of a resolved config, raising :class:`ConfigError`.
    :param data_init: ``(config, dataset, model) -> None``: start the model from the data, after the
        networks' weight initialisation (``data_bias``).
    :param defaults: ``(resolved flat config) -> {option: value}``: its defaults for options left ``None``.
    :param evaluate: ``(model, guide, x_test) -> metrics``: its own test metrics (with ``test_elbo``,
        ``test_log_likelihood``, ``test_nll``, ``kl``, ``active_units``) instead of importance sampling.
    :param prepare_data: ``(config, dataset) -> dataset``: the data as this model reads them, made when
        the data are loaded (M2: the labels it may see joined to the training points).
    :param label_metrics: ``(config, model, guide, x_test, test_labels) -> metrics``: test metrics that
        need the test labels (M2's ``test_error``), added to the others when the data have labels.
    :param pretrain: ``(config, dataset, model, *, checkpoint_path, resume, progress) -> None``: a
        training of a part of the model before the main one, checkpointed at ``checkpoint_path``
        (the CVAE's baseline); skipped when a run resumes from its main checkpoint, which holds it.
    :param metrics: ``(config, model, guide, x_test, evaluation) -> metrics``: test metrics of its own
        (``evaluation``: the run's :class:`~pyrovae.infer.evaluate.DatasetEvaluation` of the pair), added to the
        importance-sampled ones (the CVAE's baseline NLL).
    :param figures: ``(out, dataset, model, guide, seed) -> None``: its figures instead of
        ``samples.png`` and ``reconstructions.png`` (the CVAE's ``completions.png``).
    :param conditional: a model of some of each point's features given the others (the CVAE): it has
        no unconditional samples, so ``pyrovae sample`` refuses it.
    """

    name: str
    build: Callable[[TrainConfig, Dataset], Any]
    help: str
    options: tuple[str, ...] = ()
    guides: Optional[tuple[str, ...]] = None
    likelihoods: Optional[tuple[str, ...]] = None
    needs_images: bool = False
    amortized_guide: Optional[Callable[[TrainConfig, Dataset, Any], Any]] = None
    check: Optional[Callable[[TrainConfig], None]] = None
    data_init: Optional[Callable[[TrainConfig, Dataset, Any], None]] = None
    defaults: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None
    evaluate: Optional[Callable[[Any, Any, torch.Tensor], dict[str, Any]]] = None
    prepare_data: Optional[Callable[[TrainConfig, Dataset], Dataset]] = None
    label_metrics: Optional[Callable[[TrainConfig, Any, Any, torch.Tensor, torch.Tensor], dict[str, Any]]] = None
    pretrain: Optional[Callable[..., None]] = None
    metrics: Optional[Callable[[TrainConfig, Any, Any, torch.Tensor, Any], dict[str, Any]]] = None
    figures: Optional[Callable[[Any, Dataset, Any, Any, int], None]] = None
    conditional: bool = False


@dataclass(frozen=True)
class GuideSpec:
    """A guide family.

    :param name: the name of ``TrainConfig(guide=...)`` and ``--guide``.
    :param build: ``build(config, dataset, model) -> guide`` from a resolved config.
    :param help: one line for the command line's help.
    :param options: as :attr:`ModelSpec.options`.
    :param amortized: whether the trained guide serves new points (the test set); if not, the test
        set gets a guide of its own fitted with the model fixed (:func:`pyrovae.app.run.test_guide`).
    :param fit_test: a non-amortized family's ``fit_test(config, model, x_test) -> guide``: a guide
        of the family for the test points, fitted with the model fixed (``config.test_time_steps``).
    :param check: further checks of a resolved config, raising :class:`ConfigError`.
    """

    name: str
    build: Callable[[TrainConfig, Dataset, Any], Any]
    help: str
    options: tuple[str, ...] = ()
    amortized: bool = True
    check: Optional[Callable[[TrainConfig], None]] = None
    fit_test: Optional[Callable[[TrainConfig, Any, torch.Tensor], Any]] = None

    def __post_init__(self) -> None:
        if not self.amortized and self.fit_test is None:
            raise ValueError(
                f"guide family {self.name!r} is not amortized: give it fit_test, the fit of its test-set guide"
            )


_MODELS: dict[str, ModelSpec] = {}
_GUIDES: dict[str, GuideSpec] = {}
_loaded = False


def register(spec: Union[ModelSpec, GuideSpec], *, replace: bool = False) -> None:
    """Add a family (e.g. a user's own model) to the registry; its name becomes a valid
    ``TrainConfig(model=...)`` (or ``guide=...``) and ``--model`` choice."""
    _load_builtin()
    table: dict[str, Any] = _MODELS if isinstance(spec, ModelSpec) else _GUIDES
    unknown = sorted(set(spec.options) - set(GROUP_OF))
    if unknown:
        raise ValueError(
            f"{spec.name!r} lists options {unknown} that are not config fields; add them to a "
            "group of pyrovae.app.config first"
        )
    if spec.name in table and not replace and table[spec.name] is not spec:
        raise ValueError(f"a family named {spec.name!r} is registered already; pass replace=True to replace it")
    table[spec.name] = spec


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in FAMILY_MODULES:
        for spec in importlib.import_module(module).SPECS:
            (_MODELS if isinstance(spec, ModelSpec) else _GUIDES)[spec.name] = spec


def model_specs() -> dict[str, ModelSpec]:
    """The model families by name (a copy)."""
    _load_builtin()
    return dict(_MODELS)


def guide_specs() -> dict[str, GuideSpec]:
    """The guide families by name (a copy)."""
    _load_builtin()
    return dict(_GUIDES)


def model_spec(name: str) -> ModelSpec:
    specs = model_specs()
    if name not in specs:
        raise ConfigError(f"model={name!r} is not one of {list(specs)}", "model")
    return specs[name]


def guide_spec(name: str) -> GuideSpec:
    specs = guide_specs()
    if name not in specs:
        raise ConfigError(f"guide={name!r} is not one of {list(specs)}", "guide")
    return specs[name]


def _either(kind: str, names: list[str]) -> str:
    return " or ".join(f"{kind}={name!r}" for name in names)


def _check_options_are_read(config: TrainConfig, resolved: TrainConfig, model: ModelSpec, guide: GuideSpec) -> None:
    """An option that only some families (or objectives) read, set while none of the chosen ones
    does, is refused: it would be ignored silently."""
    from pyrovae.app.config import objective_option_names
    from pyrovae.infer.objectives import objective_parameters, objectives_taking

    owners: dict[str, list[tuple[str, str]]] = {}
    for kind, specs in (("model", model_specs()), ("guide", guide_specs())):
        for spec in specs.values():
            for name in spec.options:
                owners.setdefault(name, []).append((kind, spec.name))
    # An objective's own options (num_groups, ciwae_beta) are read by the objectives that take them.
    for name in objective_option_names():
        owners.setdefault(name, []).extend(("objective", taker) for taker in objectives_taking(name))
    read = set(model.options) | set(guide.options) | set(objective_parameters(resolved.objective) or ())
    for _, f in option_fields():
        if f.name not in owners or f.name in read:
            continue
        value = getattr(config, f.name)
        if value == f.default:
            continue
        kinds = sorted({kind for kind, _ in owners[f.name]})
        chosen = "; ".join(f"{kind}={getattr(resolved, kind)!r}" for kind in kinds)
        options_of = " or ".join(
            f"{kind} {' or '.join(repr(n) for k, n in owners[f.name] if k == kind)}" for kind in kinds
        )
        alternatives = " or ".join(_either(kind, [n for k, n in owners[f.name] if k == kind]) for kind in kinds)
        raise ConfigError(
            f"{f.name}={value!r} is an option of {options_of}; {chosen} has none: drop it, or choose {alternatives}",
            f.name,
            *kinds,
        )


def check_combination(config: TrainConfig) -> None:
    """Refuse options that do not go together, with what to use instead. The one place such checks
    are made (no data needed, so the command line checks before it writes anything); every
    :class:`~pyrovae.app.config.TrainConfig` runs it on construction."""
    resolved = config.resolved()
    if resolved.dataset == "mnist" and resolved.likelihood == "gaussian" and resolved.binarize != "none":
        raise ConfigError(
            "a Gaussian decoder models MNIST's continuous intensities: use binarize='none' "
            f"(got binarize={resolved.binarize!r})",
            "binarize",
            "likelihood",
        )
    model = model_spec(resolved.model)
    guide = guide_spec(resolved.guide)
    _check_options_are_read(config, resolved, model, guide)
    if model.guides is not None and resolved.guide not in model.guides:
        raise ConfigError(
            f"model={model.name!r} is trained with {_either('guide', list(model.guides))} only; "
            f"guide={resolved.guide!r} does not fit it: use {_either('guide', list(model.guides))}",
            "guide",
            "model",
        )
    if model.likelihoods is not None and resolved.likelihood not in model.likelihoods:
        raise ConfigError(
            f"model={model.name!r} has a {' or '.join(model.likelihoods)} likelihood, not "
            f"likelihood={resolved.likelihood!r}: use {_either('likelihood', list(model.likelihoods))}",
            "likelihood",
            "model",
        )
    if model.check is not None:
        model.check(resolved)
    if guide.check is not None:
        guide.check(resolved)


def check_data(config: TrainConfig, dataset: Dataset) -> None:
    """The checks that need the data: the likelihood the data suit and image data where needed."""
    config = config.resolved()
    if config.likelihood != dataset.likelihood:
        raise ConfigError(
            f"the {dataset.name} data set needs likelihood={dataset.likelihood!r}, got "
            f"likelihood={config.likelihood!r}",
            "likelihood",
        )
    if dataset.image_shape is None:
        if model_spec(config.model).needs_images:
            raise ConfigError(
                f"model={config.model!r} is convolutional and needs image data; the {dataset.name} data set "
                "has no image shape",
                "model",
                "dataset",
            )
        if config.network == "conv":
            raise ConfigError(
                f"network='conv' needs image data; the {dataset.name} data set has no image shape: use network='mlp'",
                "network",
                "dataset",
            )


def image_shape(config: TrainConfig, dataset: Dataset) -> Any:
    """The image shape for convolutional networks (``None`` for MLPs)."""
    return dataset.image_shape if config.network == "conv" else None


__all__ = [
    "FAMILY_MODULES",
    "GuideSpec",
    "ModelSpec",
    "check_combination",
    "check_data",
    "guide_spec",
    "guide_specs",
    "model_spec",
    "model_specs",
    "register",
]
