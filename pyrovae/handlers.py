"""Pyro effect handlers shared by models, guides and objectives."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Optional

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger

from pyrovae.distributions import non_reparameterized

#: The name of the plate over data points in every pyrovae model and guide.
DATA_PLATE = "data"


def data_plate(
    x: Optional[torch.Tensor],
    index: Optional[torch.Tensor] = None,
    num_data: Optional[int] = None,
) -> pyro.plate:
    """The plate ``data`` over data points, at the rightmost batch dimension.

    With ``index`` the plate is subsampled: it has the full size ``num_data`` and the batch holds
    the points ``index``, so every site inside is scaled by ``num_data / len(index)`` and a
    minibatch loss is an unbiased estimate of the full-data objective.

    :param x: the batch ``(B, features)``, or ``None`` for ancestral sampling (then pass ``index``).
    :param index: long tensor ``(B,)`` of the batch's positions in the full data set.
    :param num_data: the full data-set size N; required with ``index``.
    """
    if index is None:
        if x is None:
            raise ValueError(NO_DATA_MESSAGE)
        if num_data is not None and num_data != x.shape[0]:
            raise ValueError(
                f"num_data={num_data} but x holds {x.shape[0]} points and no index was given; "
                "pass index= (the batch's positions in the full data set) to subsample"
            )
        return pyro.plate(DATA_PLATE, x.shape[0], dim=-1)
    if index.dim() != 1 or index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"index must be a 1-D long tensor of data positions, got {index.dtype} {tuple(index.shape)}")
    if x is not None and x.shape[0] != index.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but index has {index.shape[0]}; they must match")
    if num_data is None:
        num_data = index.shape[0]
    return pyro.plate(DATA_PLATE, num_data, subsample=index, dim=-1)


#: What a model or guide called without data says (both the data plate and the batch's device
#: need x or index).
NO_DATA_MESSAGE = (
    "called with x=None and no index: pass the data x, or index=torch.arange(n) to draw n samples "
    "(e.g. model(None, index=torch.arange(n)) or "
    "pyro.infer.Predictive(model, num_samples=s)(None, index=torch.arange(n)))"
)


def batch_device(x: Optional[torch.Tensor], index: Optional[torch.Tensor]) -> torch.device:
    """The device of the batch: of ``x`` if given, else of ``index``.

    :raises ValueError: both are ``None`` (there is no batch), saying what to pass.
    """
    if x is not None:
        return x.device
    if index is None:
        raise ValueError(NO_DATA_MESSAGE)
    return index.device


@contextlib.contextmanager
def latent_scale(beta: float) -> Iterator[None]:
    """Scale the log-densities of the latent sites inside by ``beta`` (β-VAE).

    Used in both the model (on log p(z)) and the guide (on log q(z|x)) so that the ELBO becomes
    E_q[log p(x|z)] - β KL(q(z|x) ‖ p(z)), as in Pyro's KL-annealing examples.
    """
    if beta == 1.0:
        yield
    else:
        with poutine.scale(scale=beta):
            yield


class ScoreFunctionMessenger(Messenger):
    """Make every latent sample non-reparameterized, so that only the log-derivative
    (score-function) trick carries gradients to the parameters of its distribution.

    Sites are also marked ``infer["pyrovae_score"] = True``.
    """

    def _pyro_sample(self, msg) -> None:
        if not msg["is_observed"]:
            msg["fn"] = non_reparameterized(msg["fn"])
            msg["infer"] = dict(msg["infer"] or {}, pyrovae_score=True)


def score_function(fn):
    """Wrap a guide so that its latent sites use the score-function gradient estimator."""
    return ScoreFunctionMessenger()(fn)
