"""What training, evaluation and the command line may rely on, written down.

A model or a guide is any Pyro callable with the signature ``fn(x, index=None, num_data=None)``
whose sample sites for data point ``b`` sit inside ``pyro.plate(plate_name, num_data,
subsample=index)``; its parameters are whatever it registers in Pyro's param store
(``pyro.module``, ``pyro.param``, :class:`pyro.nn.PyroModule`, Pyro's autoguides). That is all
:func:`pyrovae.fit`, the checkpoints and the evaluation functions need: they learn everything
else (which parameters exist, which are per-datapoint rows, which networks sit behind them) from
a trace of the functions and from the param store, not from attribute names.

The protocols below are the optional extras a model, guide or objective may offer, each used by
one named feature. ``isinstance(obj, Protocol)`` checks them (they are
``typing.runtime_checkable``); nothing else in pyrovae looks for attributes.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, runtime_checkable

import torch

__all__ = [
    "Decodes",
    "ExactLikelihood",
    "Guide",
    "LocalGuide",
    "Model",
    "Objective",
    "RefinableGuide",
    "Reconstructs",
    "SamplesData",
    "StatefulObjective",
]


@runtime_checkable
class Model(Protocol):
    """A generative model p(x, z) as a Pyro function.

    ``x`` is a batch ``(B, ...)`` of data points (``None`` to sample), ``index`` their positions
    in the data set of size ``num_data`` (the data plate's subsample). Observed sites take
    ``obs=x``; latent sites are named alike in the model and every guide for it.
    """

    def __call__(
        self, x: Optional[torch.Tensor], index: Optional[torch.Tensor] = None, num_data: Optional[int] = None
    ) -> Any: ...


@runtime_checkable
class Guide(Protocol):
    """A variational distribution q(z | x) as a Pyro function with the model's signature, sampling
    every latent site of the model (auxiliary sites, e.g. an autoguide's ``*_unconstrained``, are
    allowed)."""

    def __call__(
        self, x: Optional[torch.Tensor], index: Optional[torch.Tensor] = None, num_data: Optional[int] = None
    ) -> Any: ...


@runtime_checkable
class LocalGuide(Protocol):
    """A guide built for a data set of ``num_data`` points (per-datapoint parameters), so that
    :func:`pyrovae.fit` can refuse other data before any call. Guides that do not say so (the
    user's functions, Pyro's autoguides) are checked by the rows of their params instead."""

    num_data: int

    def __call__(
        self, x: Optional[torch.Tensor], index: Optional[torch.Tensor] = None, num_data: Optional[int] = None
    ) -> Any: ...


@runtime_checkable
class RefinableGuide(Protocol):
    """A per-datapoint guide whose batch rows can take local optimisation steps before each model
    step (``fit(..., local_steps=T)``; :class:`pyrovae.PerDatapointGuide`)."""

    def refine_rows(self, model: Any, x: torch.Tensor, index: torch.Tensor, steps: int, lr: float) -> Any: ...


@runtime_checkable
class SamplesData(Protocol):
    """A model that draws ``(z, x_mean, x)`` from p(z) p(x|z) without data (``pyrovae sample``,
    the training figures)."""

    def sample(self, num_samples: int, device: Any = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class Reconstructs(Protocol):
    """A model that maps data to reconstructions through a guide (figures); models without it are
    reconstructed by decoding the guide's posterior mean."""

    def reconstruct(self, guide: Any, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Decodes(Protocol):
    """A model that maps latents ``z`` ``(B, z_dim)`` to the means of p(x|z) ``(B, x_dim)`` (the
    tracking loggers' reconstructions of models without :class:`Reconstructs`)."""

    def decode(self, z: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class ExactLikelihood(Protocol):
    """A model whose log p(x) is known in closed form (checked against the estimates)."""

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Objective(Protocol):
    """What training and evaluation call on an objective: any ``pyro.infer.ELBO`` subclass
    (Pyro's ``Trace_ELBO``, ``TraceEnum_ELBO``, ... and pyrovae's objectives) has it. (Pyro's base
    class ``ELBO`` itself does not: each subclass defines its own loss.)"""

    num_particles: int
    max_plate_nesting: float
    vectorize_particles: bool

    def loss(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> float: ...

    def loss_and_grads(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> float: ...


@runtime_checkable
class StatefulObjective(Protocol):
    """An objective with state of its own that a checkpoint must carry (the moving-average baseline
    of :class:`pyrovae.ScoreFunctionELBO`)."""

    def get_state(self) -> dict[str, Any]: ...

    def set_state(self, state: dict[str, Any]) -> None: ...
