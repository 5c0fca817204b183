r"""Kingma et al. (2014)'s semi-supervised model M2: a class label y beside a continuous z.

.. math:: y \sim \mathrm{Cat}(1/C), \qquad z \sim \mathcal N(0, I), \qquad
   x \mid y, z \sim \mathrm{Bernoulli}(\sigma(f_θ(z, y))).

**How labels reach the model.** Every pyrovae model is called as ``model(x, index, num_data)``, and
``fit`` passes nothing else; so the labels travel inside the data, as C one-hot columns appended to
each point (:func:`join_labels`): a row of zeros there means "unlabelled". One-hot columns hold only
0s and 1s, so dynamic binarization (``torch.bernoulli``) leaves them as they are, and minibatches,
checkpoints, resume and data-parallel training carry the labels with no code of their own. Points of
width ``x_dim`` alone (no label columns, e.g. a test set) are all unlabelled.

**Sites**, all in the ``data`` plate:

- ``"y"``: the latent label, one-hot, for every point. For an unlabelled point the guide draws it
  from q(y|x) (or enumerates it). For a labelled point it is a stand-in that the model ignores and
  that the guide draws from the prior itself, so it adds log p(y) - log q(y) = 0 exactly in every
  mode, and under enumeration its C values each get weight 1/C: the point's loss is its supervised
  ELBO averaged over C draws of z. (Masking the site out in both model and guide for labelled points
  would do in expectation too: Pyro's ``TraceEnum_ELBO`` then weights the C draws by q(y|x) instead
  of 1/C. Masking it in the guide alone would leave an extra log p(y) in the model.)
- ``"y_label"``: the observed label, log p(y) (masked to the labelled points).
- ``"z"``, ``"x"``: as in the VAE; x is decoded from (z, y) with y the label where there is one.
- ``"y_classifier"``: the auxiliary classification term, log q_φ(y|x) of the labelled points scaled
  by α (:class:`M2` ``alpha``). It is an observed site of the *model* (as in Pyro's
  ``ss_vae_M2.py``, whose ``model_classify`` scores the labels under the guide's classifier), so
  every objective counts it (Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO and pyrovae's per-data-point
  objectives all sum the model's observed sites; a guide factor would be dropped by the latter). The
  model therefore holds the classifier network, shared with the guide under one ``pyro.module`` name.

The loss of a labelled point is then -L(x, y) + α (-log q_φ(y|x)), of an unlabelled point
-U(x) = -(E_{q(y|x)}[L(x, y)] + H[q(y|x)]): Kingma et al.'s J^α. They write the α term as
α' E_{labelled}[-log q] with α' = 0.1 N, a mean over the N_l labelled points; here it is a sum, so
their choice is ``alpha = 0.1 N / N_l`` (:func:`paper_alpha`).

**References**

- [1] D. P. Kingma, D. J. Rezende, S. Mohamed, M. Welling, "Semi-Supervised Learning with Deep
  Generative Models", NeurIPS 2014.
- [2] Pyro example ``examples/vae/ss_vae_M2.py``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional, cast

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.relaxed_straight_through import QuantizeCategorical
from pyro.infer.util import is_validation_enabled
from torch import nn
from torch.distributions import constraints

from pyrovae.checks import check_data
from pyrovae.distributions import BernoulliEvent
from pyrovae.handlers import batch_device, data_plate
from pyrovae.params import register

#: How a guide treats the label of an unlabelled point: summed exactly (``TraceEnum_ELBO``), sampled
#: with the log-derivative trick, or sampled by straight-through Gumbel-softmax.
Y_MODES: tuple[str, ...] = ("enum", "score", "gumbel")


def paper_alpha(num_data: int, num_labelled: int) -> float:
    """Kingma et al.'s weight of the classification term, α' = 0.1 N on the *mean* over the
    labelled points, as the weight per labelled point that :class:`M2` takes: 0.1 N / N_l. Their code
    does the same (``dpkingma/nips14-ssl``, ``learn_yz_x_ss.py``: each labelled point's log q(y|x) is
    scaled by ``alpha * n_tot / n_labeled`` with ``alpha = 0.1``)."""
    if num_labelled < 1:
        raise ValueError(f"need at least one labelled point, got num_labelled={num_labelled}")
    return 0.1 * num_data / num_labelled


def join_labels(x: torch.Tensor, labels: Optional[torch.Tensor], num_classes: int) -> torch.Tensor:
    """Append the labels to the points as ``num_classes`` one-hot columns, ``(N, x_dim + C)``;
    a label of -1 (or ``labels=None``: all) gives a row of zeros, "unlabelled".

    :param x: ``(N, x_dim)`` points.
    :param labels: ``(N,)`` integer labels in 0..C-1, or -1 for unlabelled points.
    """
    block = torch.zeros(x.shape[0], num_classes, dtype=x.dtype, device=x.device)
    if labels is not None:
        if labels.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},), one per point, got {tuple(labels.shape)}")
        labels = labels.to(x.device).long()
        if ((labels < -1) | (labels >= num_classes)).any():
            raise ValueError(f"labels must be in 0..{num_classes - 1}, or -1 for an unlabelled point")
        known = labels >= 0
        block[known] = nn.functional.one_hot(labels[known], num_classes).to(x.dtype)
    return torch.cat([x, block], dim=-1)


def split_labels(x: torch.Tensor, x_dim: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of :func:`join_labels` on a batch: ``(pixels (B, x_dim), y (B, C), labelled (B,))``.
    For unlabelled rows ``y`` is the one-hot of class 0, a valid value the model masks out. Points
    of width ``x_dim`` (no label columns) are all unlabelled."""
    if x.shape[-1] == x_dim:
        pixels = x
        labelled = torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
        block = torch.zeros(*x.shape[:-1], num_classes, dtype=x.dtype, device=x.device)
    elif x.shape[-1] == x_dim + num_classes:
        pixels, block = x[..., :x_dim], x[..., x_dim:]
        counts = block.sum(-1)
        # A data-dependent check reads values into Python, which keeps fit's step from being
        # replayed; it runs under Pyro's validation, as the other input checks do.
        if is_validation_enabled() and not (
            ((counts == 0) | (counts == 1)).all() and ((block == 0) | (block == 1)).all()
        ):
            raise ValueError("the label columns must be one-hot (a labelled point) or all zero (unlabelled)")
        labelled = counts == 1
    else:
        raise ValueError(
            f"x has {x.shape[-1]} features; M2 takes x_dim={x_dim} (unlabelled points) or x_dim + "
            f"num_classes={x_dim + num_classes} (pyrovae.models.m2.join_labels: the labels as one-hot columns)"
        )
    first = torch.zeros_like(block)
    first[..., 0] = 1
    y = torch.where(labelled.unsqueeze(-1), block, first)
    return pixels, y, labelled


def prior_logits(num_classes: int, device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The logits of the uniform p(y): zeros, so the model and a guide that draws from the prior
    compute log p(y) = log q(y) = -log C with the same operations (their difference is exactly 0)."""
    return torch.zeros(num_classes, device=device, dtype=dtype)


def label_where_known(y_latent: torch.Tensor, y_observed: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """y as the networks read it: the observed label of a labelled point, the latent y otherwise
    (broadcast: an enumerated ``y_latent`` of shape ``(C, 1, C)`` gives ``(C, B, C)``)."""
    return torch.where(labelled.unsqueeze(-1), y_observed, y_latent)


def labelled_scale(labelled: torch.Tensor, labelled_weight: float) -> Any:
    """``poutine.scale`` by ``labelled_weight`` on the labelled points (1 elsewhere), for data sets
    that hold each labelled point several times (:class:`M2` ``labelled_weight``); a no-op at 1."""
    if labelled_weight == 1.0:
        return contextlib.nullcontext()
    ones = torch.ones(labelled.shape, device=labelled.device)
    return poutine.scale(scale=torch.where(labelled, labelled_weight * ones, ones))


def concat_broadcast(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``cat([a, b], -1)`` after broadcasting their batch dimensions (enumerated or particle dims)."""
    shape = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(*shape, a.shape[-1]), b.expand(*shape, b.shape[-1])], dim=-1)


class StraightThroughCategorical(dist.TorchDistribution):
    r"""A one-hot categorical q(y) sampled by the straight-through Gumbel-softmax estimator: a
    sample is an exact draw from Categorical(logits) (the argmax of logits + Gumbel noise), its
    gradient that of the relaxed sample softmax((logits + g)/τ) (Jang et al. 2017; Pyro's
    ``RelaxedOneHotCategoricalStraightThrough``); ``log_prob`` is the categorical's log-mass of the
    hard sample. So the ELBO's *value* stays that of the discrete model (unbiased), and only its
    gradient is biased, by the relaxation; Pyro's straight-through class reports the relaxed density
    of the soft sample instead, which does not pair with the discrete p(y) of the model.

    :param temperature: τ > 0.
    :param logits: ``(..., C)``.
    """

    arg_constraints = {"logits": constraints.real_vector}
    support = constraints.one_hot
    has_rsample = True

    def __init__(
        self, temperature: torch.Tensor | float, logits: torch.Tensor, validate_args: Optional[bool] = None
    ) -> None:
        self.temperature = torch.as_tensor(temperature, dtype=logits.dtype, device=logits.device)
        self.logits = logits - logits.logsumexp(-1, keepdim=True)
        super().__init__(logits.shape[:-1], logits.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return StraightThroughCategorical(self.temperature, self.logits.expand(batch_shape + self.event_shape))

    def rsample(self, sample_shape: torch.Size | list[int] | tuple[int, ...] = torch.Size()) -> torch.Tensor:
        relaxed = dist.RelaxedOneHotCategorical(self.temperature, logits=self.logits)
        return QuantizeCategorical.apply(relaxed.rsample(sample_shape).clamp_min(torch.finfo(self.logits.dtype).tiny))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return (value * self.logits).sum(-1)


def y_distribution(logits: torch.Tensor, y_mode: str, temperature: float = 0.5) -> dist.TorchDistribution:
    """q(y|x) as the guide samples it: a one-hot categorical (``enum``: enumerated under
    ``TraceEnum_ELBO``; ``score``: sampled, no pathwise gradient) or straight-through Gumbel-softmax
    (``gumbel``)."""
    if y_mode == "gumbel":
        return StraightThroughCategorical(temperature, logits)
    if y_mode in ("enum", "score"):
        return dist.OneHotCategorical(logits=logits)
    raise ValueError(f"unknown y_mode {y_mode!r}; choose one of {Y_MODES}")


class M2:
    r"""The generative model of M2 (Kingma et al. 2014) as a Pyro function, ``model(x, index, num_data)``;
    see :mod:`pyrovae.models.m2` for its sites and how labels are passed.

    :param decoder: ``nn.Module`` mapping ``(..., z_dim + C)`` (z and one-hot y) to ``(..., x_dim)``
        Bernoulli logits.
    :param classifier: the guide's ``nn.Module`` ``(..., x_dim) -> (..., C)`` logits of q_φ(y|x),
        read here only for the α term (registered under ``classifier_name``, the guide's name for it).
    :param x_dim: pixels per point (without the label columns).
    :param z_dim: latent dimension.
    :param num_classes: C.
    :param alpha: weight of each labelled point's -log q_φ(y|x) in the loss (0: no classification
        term; Kingma et al.: :func:`paper_alpha`).
    :param labelled_weight: every term of a labelled point is scaled by this (the guide's too: build
        it with the same value). A training set that holds each labelled point r times with
        ``labelled_weight = 1/r`` has the same objective, with labelled points in r times more
        minibatches (with 100 labels among 60,000 points a batch of 100 holds 0.17 on average).
        Meant for the ELBO objectives: inside IWAE's log-mean-exp it would temper the weights.

    **References**

    - [1] D. P. Kingma, D. J. Rezende, S. Mohamed, M. Welling, "Semi-Supervised Learning with Deep
      Generative Models", NeurIPS 2014.
    """

    def __init__(
        self,
        decoder: nn.Module,
        classifier: nn.Module,
        x_dim: int,
        z_dim: int,
        num_classes: int = 10,
        alpha: float = 0.0,
        name: str = "decoder",
        classifier_name: str = "classifier",
        labelled_weight: float = 1.0,
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0 (0: no classification term), got {alpha}")
        if not 0 < labelled_weight <= 1:
            raise ValueError(
                f"labelled_weight must be in (0, 1] (1/r for r copies of each labelled point), got {labelled_weight}"
            )
        self.decoder, self.classifier = decoder, classifier
        self.x_dim, self.z_dim, self.num_classes = int(x_dim), int(z_dim), int(num_classes)
        self.alpha = float(alpha)
        self.labelled_weight = float(labelled_weight)
        self.name, self.classifier_name = name, classifier_name

    def __call__(
        self,
        x: Optional[torch.Tensor] = None,
        index: Optional[torch.Tensor] = None,
        num_data: Optional[int] = None,
    ) -> torch.Tensor:
        register(self.name, self.decoder)
        device = batch_device(x, index)
        if x is None:  # ancestral sampling: every label latent
            batch = index.shape[0]  # type: ignore[union-attr]
            pixels = None
            y_observed = torch.zeros(batch, self.num_classes, device=device)
            labelled = torch.zeros(batch, dtype=torch.bool, device=device)
        else:
            pixels, y_observed, labelled = split_labels(x, self.x_dim, self.num_classes)
            if is_validation_enabled():
                check_data(pixels, "bernoulli")
            batch = x.shape[0]
        logits_y = prior_logits(self.num_classes, device, y_observed.dtype).expand(batch, self.num_classes)
        with data_plate(x, index, num_data), labelled_scale(labelled, self.labelled_weight):
            y_latent = pyro.sample("y", dist.OneHotCategorical(logits=logits_y))
            with poutine.mask(mask=labelled):  # type: ignore[call-overload]  # Pyro's stub wants torch.BoolTensor, not a bool-dtype Tensor
                pyro.sample("y_label", dist.OneHotCategorical(logits=logits_y), obs=y_observed)
            y = label_where_known(y_latent, y_observed, labelled)
            zeros = torch.zeros(batch, self.z_dim, device=device, dtype=y_observed.dtype)
            z = pyro.sample("z", dist.Normal(zeros, torch.ones_like(zeros)).to_event(1))
            out = self.decoder(concat_broadcast(z, y))
            pyro.sample("x", BernoulliEvent(out), obs=pixels)
            if pixels is not None and self.alpha > 0:
                register(self.classifier_name, self.classifier)
                with poutine.mask(mask=labelled), poutine.scale(scale=self.alpha):  # type: ignore[call-overload]  # Pyro's stub wants torch.BoolTensor, not a bool-dtype Tensor
                    pyro.sample("y_classifier", dist.OneHotCategorical(logits=self.classifier(pixels)), obs=y_observed)
        return out

    def decode(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean of p_θ(x|z, y) (pixel probabilities) for z ``(..., z_dim)`` and one-hot y ``(..., C)``."""
        return torch.sigmoid(self.decoder(concat_broadcast(z, y)))

    @torch.no_grad()
    def reconstruct(self, guide: Any, x: torch.Tensor) -> torch.Tensor:
        """Decode each point's guide mean of z at its most probable class: ``guide.predict`` (q(y|x)'s
        argmax) and ``guide.encoder`` (``(z_loc, z_scale)`` from ``[x, y]``), e.g. an
        :class:`pyrovae.guides.m2.M2Guide`."""
        pixels = x[..., : self.x_dim]
        y = nn.functional.one_hot(guide.predict(pixels), self.num_classes).to(pixels.dtype)
        z_loc, _ = guide.encoder(torch.cat([pixels, y], dim=-1))
        return self.decode(z_loc, y)

    @torch.no_grad()
    def sample(
        self, num_samples: int, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ancestral sampling y ~ p(y), z ~ p(z), x ~ p_θ(x|y, z): ``(z, x_mean, x)``."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        trace = poutine.trace(self).get_trace(
            None, index=torch.arange(num_samples, device=device), num_data=num_samples
        )
        z, y = cast(torch.Tensor, trace.nodes["z"]["value"]), cast(torch.Tensor, trace.nodes["y"]["value"])
        return z, self.decode(z, y), cast(torch.Tensor, trace.nodes["x"]["value"])
