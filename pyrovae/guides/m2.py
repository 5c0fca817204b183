"""The guide of M2 (Kingma et al. 2014): q_φ(y|x) q_φ(z|x, y), with three ways to treat the label
of an unlabelled point (:data:`pyrovae.models.m2.Y_MODES`)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

import pyro
import torch
from torch import nn

from pyrovae.distributions import diag_normal
from pyrovae.handlers import data_plate
from pyrovae.models.m2 import (
    Y_MODES,
    concat_broadcast,
    label_where_known,
    labelled_scale,
    prior_logits,
    split_labels,
    y_distribution,
)
from pyrovae.params import register

if TYPE_CHECKING:
    from pyro.poutine.runtime import InferDict

    from pyrovae.models.m2 import M2


@dataclasses.dataclass
class M2Guide:
    r"""q_φ(y|x) = Cat(classifier(x)) for unlabelled points, q_φ(z|x, y) = N(encoder([x, y])).

    Site ``"y"`` (one-hot) for every point: drawn from q_φ(y|x) where the label is unknown, and from
    the prior p(y) where it is known (a stand-in the model ignores, which adds exactly 0 to the
    ELBO; see :mod:`pyrovae.models.m2`); site ``"z"`` from q_φ(z|x, y) with y the label where there
    is one.

    ``y_mode`` says how an unknown label is treated:

    - ``"enum"``: the site is marked ``infer={"enumerate": "parallel"}``, so Pyro's
      ``TraceEnum_ELBO(max_plate_nesting=1)`` sums it out exactly, U(x) = Σ_y q(y|x) L(x, y) + H[q(y|x)]
      with one draw of z per class. pyrovae's per-data-point objectives (IWAE, ...) refuse the mark
      (they would sample the site); :func:`pyrovae.importance_sampling` samples it (a valid proposal).
    - ``"score"``: y is sampled, with no pathwise gradient; ``Trace_ELBO`` then gives q(y|x) the
      log-derivative gradient with each point's own ELBO as its learning signal (no baseline);
      pyrovae's ``iwae`` with K >= 2 gives it VIMCO's leave-one-out signal instead.
    - ``"gumbel"``: y is sampled by straight-through Gumbel-softmax at ``temperature``
      (:class:`pyrovae.models.m2.StraightThroughCategorical`): an exact categorical draw, the gradient
      of its relaxation (biased); train with ``Trace_ELBO`` (or ``iwae``).

    :param classifier: ``nn.Module`` ``(..., x_dim) -> (..., C)``, the logits of q_φ(y|x); the model
        holds the same module (under ``classifier_name``) for the α term.
    :param encoder: ``nn.Module`` ``(..., x_dim + C) -> (z_loc, z_scale)``, e.g.
        :class:`pyrovae.nets.GaussianEncoder` on x and one-hot y.
    :param x_dim: pixels per point.
    :param num_classes: C.
    :param y_mode: one of :data:`~pyrovae.models.m2.Y_MODES`.
    :param temperature: τ of ``y_mode="gumbel"``.
    :param labelled_weight: the scale of a labelled point's sites; the model's
        (:class:`pyrovae.models.m2.M2` ``labelled_weight``).
    """

    classifier: nn.Module
    encoder: nn.Module
    x_dim: int
    num_classes: int = 10
    y_mode: str = "enum"
    temperature: float = 0.5
    name: str = "encoder"
    classifier_name: str = "classifier"
    labelled_weight: float = 1.0
    amortized = True

    def __post_init__(self) -> None:
        if self.y_mode not in Y_MODES:
            raise ValueError(f"unknown y_mode {self.y_mode!r}; choose one of {Y_MODES}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0 < self.labelled_weight <= 1:
            raise ValueError(f"labelled_weight must be in (0, 1], the model's, got {self.labelled_weight}")

    def with_mode(self, y_mode: str) -> M2Guide:
        """The same guide (the same networks, under the same names) treating y as ``y_mode`` says,
        e.g. ``guide.with_mode("enum")`` to evaluate the exact ELBO of a guide trained otherwise."""
        return dataclasses.replace(self, y_mode=y_mode)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of q_φ(y|x) for points with or without their label columns, ``(B, C)``."""
        pixels = x if x.shape[-1] == self.x_dim else split_labels(x, self.x_dim, self.num_classes)[0]
        return self.classifier(pixels)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The most probable class under q_φ(y|x), ``(B,)``."""
        return self.logits(x).argmax(-1)

    def __call__(
        self,
        x: Optional[torch.Tensor],
        index: Optional[torch.Tensor] = None,
        num_data: Optional[int] = None,
    ) -> torch.Tensor:
        if x is None:
            raise ValueError("the M2 guide needs the data x: q(y|x) and q(z|x, y) are functions of x")
        register(self.classifier_name, self.classifier)
        register(self.name, self.encoder)
        pixels, y_observed, labelled = split_labels(x, self.x_dim, self.num_classes)
        logits = self.classifier(pixels)
        prior = prior_logits(self.num_classes, x.device, logits.dtype).expand_as(logits)
        logits = torch.where(labelled.unsqueeze(-1), prior, logits)
        infer: InferDict = {"enumerate": "parallel"} if self.y_mode == "enum" else {}
        with data_plate(x, index, num_data), labelled_scale(labelled, self.labelled_weight):
            y_latent = pyro.sample("y", y_distribution(logits, self.y_mode, self.temperature), infer=infer)
            y = label_where_known(y_latent, y_observed, labelled)
            z_loc, z_scale = self.encoder(concat_broadcast(pixels, y))
            return pyro.sample("z", diag_normal(z_loc, z_scale))


def m2_pair(
    x_dim: int,
    z_dim: int,
    num_classes: int = 10,
    hidden_sizes: tuple[int, ...] = (500,),
    activation: str = "softplus",
    alpha: float = 0.0,
    y_mode: str = "enum",
    temperature: float = 0.5,
    labelled_weight: float = 1.0,
) -> tuple[M2, M2Guide]:
    """An M2 model and guide with MLP networks (Kingma et al.: one hidden layer of 500 softplus
    units in each): decoder (z, y) -> x, classifier x -> y, encoder (x, y) -> z.

    :return: ``(model, guide)``, sharing the classifier.
    """
    from pyrovae.models.m2 import M2
    from pyrovae.nets import MLP, GaussianEncoder

    classifier = MLP(x_dim, hidden_sizes, num_classes, activation)
    decoder = MLP(z_dim + num_classes, hidden_sizes, x_dim, activation)
    encoder = GaussianEncoder(x_dim + num_classes, z_dim, hidden_sizes, activation)
    model = M2(decoder, classifier, x_dim, z_dim, num_classes, alpha=alpha, labelled_weight=labelled_weight)
    guide = M2Guide(
        classifier, encoder, x_dim, num_classes, y_mode=y_mode, temperature=temperature, labelled_weight=labelled_weight
    )
    return model, guide


__all__ = ["M2Guide", "m2_pair"]
