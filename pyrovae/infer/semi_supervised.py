"""Evaluation of a semi-supervised model such as M2 (:mod:`pyrovae.models.m2`): the test error of
its classifier q(y|x), and the ELBO of unlabelled points with the label summed out exactly."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from pyro import poutine
from torch.nn import functional as F

from pyrovae.infer.weights import per_datapoint_log_weights, vectorized_traces


@torch.no_grad()
def classification_error(guide: Any, x: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """The fraction of points whose most probable class under q(y|x) (``guide.predict``) is not
    their label.

    :param guide: anything with ``predict(x) -> (B,)`` classes, e.g. :class:`pyrovae.guides.m2.M2Guide`.
    :param labels: ``(N,)`` true classes.
    """
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},), one per point, got {tuple(labels.shape)}")
    wrong = 0
    for index in torch.arange(x.shape[0], device=x.device).split(batch_size):
        wrong += int((guide.predict(x[index]) != labels[index].to(x.device)).sum())
    return wrong / x.shape[0]


@torch.no_grad()
def unlabelled_elbo(
    model: Callable, guide: Any, x: torch.Tensor, num_particles: int = 1, batch_size: int = 500
) -> torch.Tensor:
    r"""The ELBO of each point as an unlabelled one, its label summed over the C classes exactly,

    .. math:: U(x) = \sum_y q(y|x) \big( \mathbb E_{q(z|x,y)}[\log p(x, y, z) - \log q(z|x,y)] - \log q(y|x) \big),

    the inner expectation estimated with ``num_particles`` draws of z per class (one pass per class,
    y fixed to it in model and guide by ``poutine.condition``; the log-weights are pyrovae's per-data-point
    ones, :func:`pyrovae.infer.weights.per_datapoint_log_weights`, without the data plate's scale).

    :param guide: an :class:`pyrovae.guides.m2.M2Guide` (its ``logits``, ``num_classes``, ``with_mode``).
    :param x: ``(N, x_dim)`` points (label columns, if any, are dropped: every point is unlabelled).
    :return: ``(N,)`` nats per point.
    """
    pixels = x[..., : guide.x_dim]
    sampling = guide.with_mode("score")
    num_classes = guide.num_classes
    values = []
    for index in torch.arange(x.shape[0], device=x.device).split(batch_size):
        batch = pixels[index]
        local = torch.arange(len(index), device=x.device)
        log_q = F.log_softmax(guide.logits(batch), dim=-1)
        per_class = []
        for c in range(num_classes):
            y = F.one_hot(torch.full_like(local, c), num_classes).to(batch.dtype)
            fixed = {"y": y}
            with warnings.catch_warnings():
                # y is observed in both now; Pyro's model/guide check still lists it as a guide-only var
                warnings.filterwarnings("ignore", message="Found non-auxiliary vars in guide but not model")
                traces = vectorized_traces(
                    poutine.condition(model, data=fixed),
                    poutine.condition(sampling, data=fixed),
                    (batch, local, len(index)),
                    {},
                    num_particles,
                    1,
                )
            log_w = per_datapoint_log_weights(*traces, num_particles, 1).log_w
            assert log_w.shape == (num_particles, len(index))
            per_class.append(log_w.mean(0))
        log_w = torch.stack(per_class, dim=-1)
        assert log_w.shape == log_q.shape
        values.append((log_q.exp() * (log_w - log_q)).sum(-1))
    return torch.cat(values)


__all__ = ["classification_error", "unlabelled_elbo"]
