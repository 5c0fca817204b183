"""What a checkpoint must agree with before a run continues from it: the config, the training
data, the kind of file, the number of epochs."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, Optional

import torch

from pyrovae.runtime.checkpoint import load_checkpoint

__all__ = ["RESUMABLE_CHANGES", "config_differences", "data_fingerprint", "read_resumable"]

#: Config fields a resumed run may change: the number of epochs, evaluation settings, which do not
#: touch training, and how the steps run (``fast_path``: the same arithmetic).
RESUMABLE_CHANGES = frozenset({"epochs", "eval_samples", "eval_chunk", "eval_batch", "test_time_steps", "fast_path"})


def config_differences(
    saved: Mapping[str, Any],
    requested: Mapping[str, Any],
    ignore: frozenset[str] | set[str] = frozenset(),
    defaults: Optional[Mapping[str, Any]] = None,
) -> dict[str, tuple[Any, Any]]:
    """The fields in which two flat config dicts differ, as ``{name: (saved, requested)}``,
    skipping ``ignore``. A field that ``saved`` lacks (written before the field existed) counts as
    its value in ``defaults``; without ``defaults`` such a field is not compared."""
    differ = {}
    for name, value in requested.items():
        if name in ignore:
            continue
        if name in saved:
            old = saved[name]
        elif defaults is not None:
            old = defaults.get(name)
        else:
            continue
        if old != value:
            differ[name] = (old, value)
    return differ


def data_fingerprint(x: torch.Tensor) -> dict[str, Any]:
    """A cheap summary of a training set that changes when its points or their order change:
    the shape, the sum, and a position-weighted sum of the rows (float64)."""
    rows = x.double().reshape(len(x), -1).sum(1)
    weights = torch.arange(1, x.shape[0] + 1, dtype=torch.float64, device=x.device)
    return {"shape": list(x.shape), "sum": rows.sum().item(), "weighted_sum": (rows * weights).sum().item()}


def _same_fingerprint(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a["shape"] != b["shape"]:
        return False
    # Sums on another device or with another reduction order may differ in the last digits.
    return all(math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=1e-6) for k in ("sum", "weighted_sum"))


def read_resumable(
    path: Optional[str | os.PathLike],
    resume: bool,
    config: Optional[dict[str, Any]],
    x_train: torch.Tensor,
    epochs: int,
) -> Optional[dict[str, Any]]:
    """The checkpoint at ``path`` to continue (``None``: start afresh), after checking that it
    may be continued. An existing checkpoint without ``resume`` is refused: it is never overwritten."""
    if path is None or not os.path.exists(path):
        return None
    if not resume:
        raise ValueError(
            f"{path} already holds a checkpoint; pass resume=True to continue that run, or delete it "
            "(or choose another checkpoint_path) to start a new one"
        )
    state = load_checkpoint(path, map_location="cpu")
    saved_config = state.get("config")
    if config is not None and saved_config is not None:
        differ = config_differences(saved_config, config, RESUMABLE_CHANGES)
        if differ:
            raise ValueError(
                f"cannot resume {path}: its config differs in {differ} (saved, requested); pass the saved "
                "config, or start a new run with another checkpoint_path (resume=False)"
            )
    saved_data = (state.get("dataset") or {}).get("fingerprint")
    if saved_data is not None and not _same_fingerprint(saved_data, data_fingerprint(x_train)):
        raise ValueError(
            f"cannot resume {path}: it was trained on other training data (shape {saved_data['shape']}, "
            f"now {list(x_train.shape)}, or the same shape with other values or order), so its "
            "per-datapoint parameters and batch order would not match; use the same data, or start a "
            "new run with another checkpoint_path"
        )
    missing = sorted({"epoch", "modules", "params", "optimizer", "generator", "history"} - set(state))
    if missing:
        raise ValueError(
            f"cannot resume {path}: it is a pyrovae checkpoint but not one written by fit() (it lacks "
            f"{missing}); pass the checkpoint_path of a training run, or resume=False with another path"
        )
    if state["epoch"] > epochs:
        raise ValueError(
            f"cannot resume {path}: it has already trained {state['epoch']} epochs, more than the "
            f"{epochs} asked for; pass epochs={state['epoch']} or more"
        )
    return state
