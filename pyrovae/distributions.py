"""Distribution helpers on top of :mod:`pyro.distributions`.

Why this module exists: Pyro's ``Normal(...).has_rsample_(False).to_event(1)`` cannot be used inside
a plate that broadcasts it (Pyro 1.9's ``BroadcastMessenger`` copies ``has_rsample`` onto the
expanded ``Independent``, whose ``has_rsample`` is a read-only property, and raises
``AttributeError``), and a leaf distribution's ``has_rsample_(False)`` is dropped by ``expand``.
:func:`non_reparameterized` returns a distribution that stays non-reparameterized through
broadcasting, so vectorized particles and score-function gradients work together.
"""

from __future__ import annotations

import copy

import pyro.distributions as dist
import torch


class NonReparameterizedIndependent(dist.Independent):
    """An :class:`~pyro.distributions.Independent` that never draws reparameterized samples.

    ``has_rsample`` is a class attribute, so it survives :meth:`expand` (which keeps the subclass).
    """

    has_rsample = False


def non_reparameterized(fn: dist.TorchDistribution) -> dist.TorchDistribution:
    """A copy of ``fn`` whose samples carry no pathwise gradient (score-function estimators only).

    :param fn: a leaf distribution or an ``Independent`` of one.
    """
    if not fn.has_rsample:
        return fn
    if isinstance(fn, torch.distributions.Independent):
        return NonReparameterizedIndependent(
            non_reparameterized(fn.base_dist), fn.reinterpreted_batch_ndims
        )
    if hasattr(fn, "base_dist"):
        raise ValueError(
            f"cannot make {type(fn).__name__} non-reparameterized; build the guide's distribution "
            "from a leaf distribution (optionally .to_event(n)) instead"
        )
    new = copy.copy(fn)
    new.has_rsample_(False)
    return new


def diag_normal(
    loc: torch.Tensor, scale: torch.Tensor, reparameterized: bool = True
) -> dist.TorchDistribution:
    """N(loc, diag scale²) over the last dimension, optionally non-reparameterized."""
    fn = dist.Normal(loc, scale).to_event(1)
    return fn if reparameterized else non_reparameterized(fn)
