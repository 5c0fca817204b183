"""Type aliases shared across pyrovae (NumPyro keeps these in one place too)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch

#: A Pyro model or guide. Every pyrovae model/guide has the signature
#: ``fn(x, index=None, num_data=None)``: ``x`` is a ``(batch, features)`` tensor or ``None``
#: (ancestral sampling), ``index`` the positions of the batch in the full data set and
#: ``num_data`` the full data-set size, so the ``data`` plate can scale minibatch terms by N/B.
PyroFn = Callable[..., Any]
OptionalTensor = Optional[torch.Tensor]
