"""Build a (model, guide) pair from a :class:`~pyrovae.app.config.TrainConfig`, through the family
specs of :mod:`pyrovae.app.registry` (no switch on a family here)."""

from __future__ import annotations

from typing import Any

import torch

from pyrovae.app.config import TrainConfig
from pyrovae.app.registry import check_combination, check_data, guide_spec, model_spec
from pyrovae.data import Dataset
from pyrovae.nets import glorot_init_

__all__ = ["build", "build_model", "check_combination", "modules_of"]


def build_model(config: TrainConfig, dataset: Dataset) -> Any:
    """The model alone (e.g. to sample from a checkpoint without building a guide)."""
    config = config.resolved()
    return model_spec(config.model).build(config, dataset)


def build(config: TrainConfig, dataset: Dataset) -> tuple[Any, Any]:
    """The model and guide that ``config`` names, with networks on ``config.device``.

    Network initialisation draws from torch's global RNG: seed it (``pyro.set_rng_seed``) first.

    :raises pyrovae.app.config.ConfigError: when the data do not suit the config (likelihood, image data).
    """
    config = config.resolved()
    check_data(config, dataset)
    family = model_spec(config.model)
    model = family.build(config, dataset)
    guide = guide_spec(config.guide).build(config, dataset, model)
    if config.weight_init == "glorot":
        for module in modules_of(model, guide).values():
            glorot_init_(module)
    if family.data_init is not None:
        family.data_init(config, dataset, model)
    return model, guide


def modules_of(*fns: Any) -> dict[str, torch.nn.Module]:
    """The ``torch.nn.Module``s of pyrovae models/guides, by their ``pyro.module`` names."""
    found: dict[str, torch.nn.Module] = {}
    for fn in fns:
        for attr in ("decoder", "encoder"):
            module = getattr(fn, attr, None)
            if isinstance(module, torch.nn.Module):
                found[fn.name] = module
        classifier = getattr(fn, "classifier", None)  # M2's q(y|x), shared by its model and guide
        if isinstance(classifier, torch.nn.Module):
            found[fn.classifier_name] = classifier
    return found
