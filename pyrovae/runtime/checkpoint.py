"""Checkpoints: atomic saving, safe loading, and the random-number-generator state.

A checkpoint is a plain ``dict`` (network and optimizer state dicts, the Pyro param store's
:meth:`~pyro.params.param_store.ParamStoreDict.get_state`, :func:`rng_state`, counters, history)
written with :func:`torch.save`. Loading uses ``torch.load(weights_only=True)``, which rebuilds only
tensors, containers, numbers and strings (plus the distribution-constraint objects of the param
store), so opening a checkpoint never runs code from the file. :func:`save_checkpoint` checks the
same rule before it replaces anything, so a checkpoint that was saved can always be loaded.

A torch file does not notice damage inside a tensor's bytes (a flipped bit in the weights loads
as a different number), so every checkpoint also carries a SHA-256 digest of its contents, which
:func:`load_checkpoint` recomputes and requires. The digest detects *corruption*: a truncated
file, flipped bits on disk or in transfer, a copy that stopped half way. It is not a signature and
does not detect *tampering*: anyone who can rewrite the file can recompute the digest (a file
edited and re-saved with :func:`save_checkpoint` loads). Trust a checkpoint as much as you trust
whoever could write it; ``weights_only`` loading means that even an untrusted one runs no code.

Format versions: version 1 (pyrovae before the checksum was required) wrote the digest but did
not insist on it; version 2 refuses a file without one. A file without a checksum (an old one, or
one whose entry was removed) is refused with the fix: :func:`upgrade_checkpoint` re-saves a file
you trust with a checksum.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import random
import tempfile
from collections.abc import Callable, Mapping
from typing import Any, Optional, Union

import numpy as np
import pyro.distributions.constraints as pyro_constraints
import torch
from torch.distributions import constraints as torch_constraints

from pyrovae import params

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "load_checkpoint",
    "load_params",
    "remove_stale_temporaries",
    "rng_state",
    "save_checkpoint",
    "save_params",
    "set_rng_state",
    "upgrade_checkpoint",
]

CHECKPOINT_FORMAT = "pyrovae-checkpoint"
#: 2: the SHA-256 checksum is required (version 1 files that carry one still load).
CHECKPOINT_VERSION = 2

PathLike = Union[str, os.PathLike]
MapLocation = Union[str, torch.device, None]


@functools.cache
def _safe_constraint_classes() -> tuple[type, ...]:
    # The param store's state holds one constraint object per parameter; these classes only hold
    # data (bounds, event dims), so allowing them keeps weights_only loading safe.
    classes = set()
    for module in (torch_constraints, pyro_constraints):
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, torch_constraints.Constraint):
                classes.add(value)
    return tuple(sorted(classes, key=lambda cls: f"{cls.__module__}.{cls.__qualname__}"))


def _fsync_directory(directory: pathlib.Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory, hence best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: the file is either the old checkpoint or the new one.

    The state is written with :func:`torch.save` to a temporary file in the same folder, flushed
    and ``fsync``-ed, checked to be loadable with ``weights_only=True``, then moved over ``path``
    with :func:`os.replace`. On any failure the temporary file is removed and an existing
    checkpoint at ``path`` is left untouched. Missing folders are created.

    The saved dict gets three extra keys, ``"format": "pyrovae-checkpoint"``, ``"version"`` and
    ``"checksum"`` (SHA-256 of the contents), which :func:`load_checkpoint` checks. The checksum
    detects corruption (truncation, flipped bits), not deliberate edits: whoever can rewrite the
    file can recompute it.

    :param path: where to write the checkpoint.
    :param state: tensors, numbers, strings, ``None`` and lists/tuples/dicts of them (e.g.
        ``module.state_dict()``, ``optimizer.state_dict()``, ``pyro.get_param_store().get_state()``,
        :func:`rng_state`). Numpy arrays and arbitrary objects are refused; convert them first.
    :raises ValueError: when ``state`` is not a dict, uses a reserved key, or holds objects that
        ``torch.load(weights_only=True)`` could not read back.
    """
    if not isinstance(state, dict):
        raise ValueError(f"state must be a dict, got {type(state).__name__}; wrap it, e.g. {{'model': state}}.")
    reserved = {"format", "version", "checksum"} & set(state)
    if reserved:
        raise ValueError(
            f"state uses the reserved key(s) {sorted(reserved)}, which save_checkpoint fills in; rename them."
        )
    payload = {**state, "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION}
    payload["checksum"] = _digest(payload)

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        with torch.serialization.safe_globals(list(_safe_constraint_classes())):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(tmp_name)
        if unsafe:
            raise ValueError(
                f"Cannot checkpoint objects of type(s) {sorted(unsafe)}: torch.load(weights_only=True) "
                f"would refuse to read them back. Convert numpy arrays with torch.as_tensor(...), "
                f"numpy scalars with float(...) or int(...), and dataclasses with dataclasses.asdict(...)."
            )
        # mkstemp creates the file readable by its owner only; give it the usual permissions.
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(path.parent)


def remove_stale_temporaries(path: PathLike) -> list[pathlib.Path]:
    """Delete the temporary files that a :func:`save_checkpoint` to ``path`` left behind when its
    process was killed mid-write (``.<name>.*.tmp`` next to ``path``); the checkpoint itself is
    never touched. Call it only while no other process writes to ``path``.

    :returns: the files removed.
    """
    path = pathlib.Path(path)
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


def load_checkpoint(path: PathLike, map_location: MapLocation = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Loads with ``torch.load(weights_only=True)``, so a file that holds anything but tensors,
    containers, numbers, strings and distribution constraints is refused rather than executed.
    Then recomputes the SHA-256 of the contents and refuses the file unless it matches the
    ``"checksum"`` entry; a file without that entry is refused too (see
    :func:`upgrade_checkpoint`). The checksum catches corruption (truncation, flipped bits), not a
    file that someone rewrote on purpose and re-checksummed.

    :param path: the checkpoint file.
    :param map_location: where to put the tensors, as in :func:`torch.load`; ``"cpu"`` by default
        so a checkpoint written on a GPU opens anywhere.
    :returns: the saved state, including the ``"format"`` and ``"version"`` keys (the
        ``"checksum"`` entry is checked and removed).
    :raises FileNotFoundError: when there is no file at ``path``.
    :raises ValueError: when the file is truncated or corrupt, is not a pyrovae checkpoint, has no
        checksum, or was written by a newer version of pyrovae.
    """
    path = pathlib.Path(path)
    payload = _read(path, map_location)
    checksum = payload.pop("checksum", None)
    if checksum is None:
        raise ValueError(
            f"{path} has no SHA-256 checksum, which pyrovae checkpoints need since format version "
            f"{CHECKPOINT_VERSION} (a version-{payload['version']} file, written by an older pyrovae "
            f"or with its 'checksum' entry removed), so damage to it could not be detected. "
            f'If you trust the file, re-save it with a checksum: python -c "from '
            f'pyrovae.runtime.checkpoint import upgrade_checkpoint; upgrade_checkpoint({str(path)!r})".'
        )
    if checksum != _digest(payload):
        raise ValueError(
            f"{path} is corrupt: its contents do not match the SHA-256 checksum written with them "
            f"(damaged on disk or in transfer); point to another checkpoint or train again."
        )
    return payload


def upgrade_checkpoint(path: PathLike, out: Optional[PathLike] = None) -> pathlib.Path:
    """Re-save a pyrovae checkpoint in the current format, with a SHA-256 checksum.

    For a file that :func:`load_checkpoint` refuses for lack of a checksum (written by an older
    pyrovae) and that you trust: nothing can tell whether it was damaged before this call, so the
    new checksum only protects it from now on. Reading uses ``torch.load(weights_only=True)`` as
    :func:`load_checkpoint` does, so upgrading an untrusted file runs no code either; a file that
    has a checksum that does not match is refused, not upgraded.

    :param path: the checkpoint to upgrade.
    :param out: where to write the upgraded checkpoint; ``None`` (default) replaces ``path``
        atomically.
    :returns: the path written.
    :raises ValueError: as :func:`load_checkpoint`, except for a missing checksum.
    """
    path = pathlib.Path(path)
    payload = _read(path, "cpu")
    checksum = payload.pop("checksum", None)
    if checksum is not None and checksum != _digest(payload):
        raise ValueError(
            f"{path} is corrupt: its contents do not match the SHA-256 checksum written with them; "
            f"it was not upgraded. Point to another checkpoint or train again."
        )
    target = pathlib.Path(out) if out is not None else path
    save_checkpoint(target, {k: v for k, v in payload.items() if k not in ("format", "version")})
    return target


def _read(path: pathlib.Path, map_location: MapLocation) -> dict[str, Any]:
    """A pyrovae checkpoint's payload, read weights-only, with its format and version checked."""
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path.absolute()}; check the path, or train first to write one.")
    try:
        with torch.serialization.safe_globals(list(_safe_constraint_classes())):
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        # Chained, not suppressed: the cause says whether the file is truncated or holds code.
        summary = " ".join(str(error).split())[:300]
        raise ValueError(
            f"{path} is not a readable pyrovae checkpoint ({type(error).__name__}: {summary}). It may "
            f"be truncated or corrupt, or written by something other than save_checkpoint; point to "
            f"another checkpoint or train again."
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is a torch file but not a pyrovae checkpoint (no 'format': "
            f"{CHECKPOINT_FORMAT!r} entry); write checkpoints with pyrovae.runtime.checkpoint.save_checkpoint."
        )
    version = payload.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"{path} has no integer 'version' entry; it is not a valid pyrovae checkpoint.")
    if version > CHECKPOINT_VERSION:
        raise ValueError(
            f"{path} is a version-{version} checkpoint but this pyrovae reads up to version "
            f"{CHECKPOINT_VERSION}; upgrade pyrovae."
        )
    return payload


def _digest(state: Any) -> str:
    """SHA-256 of a checkpoint's contents: every tensor's dtype, shape and bytes, and every other
    value, in the order a (weights-only) round trip preserves."""
    digest = hashlib.sha256()

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            data = value.detach().cpu().contiguous()
            digest.update(f"T{data.dtype}{tuple(data.shape)}".encode())
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            digest.update(f"D{len(value)}".encode())
            for key, item in value.items():
                visit(key)
                visit(item)
        elif isinstance(value, (list, tuple)):
            digest.update(f"{type(value).__name__[0]}{len(value)}".encode())
            for item in value:
                visit(item)
        elif value is None or isinstance(value, (bool, int, float, str, bytes)):
            digest.update(f"{type(value).__name__}:{value!r};".encode())
        else:  # a distribution constraint: its class and its data
            digest.update(f"O{type(value).__module__}.{type(value).__qualname__}".encode())
            visit(dict(sorted(vars(value).items())) if hasattr(value, "__dict__") else repr(value))

    visit(state)
    return digest.hexdigest()


def rng_state() -> dict[str, Any]:
    """Capture the state of every global random-number generator a run draws from.

    Python's :mod:`random`, torch's CPU generator, torch's CUDA generators (every device, when CUDA
    is available) and numpy's global generator. Every value is a tensor, number, string or
    container of them, so the result can go into :func:`save_checkpoint`.

    :returns: a dict for :func:`set_rng_state`.
    """
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        # weights_only loading refuses numpy arrays; the 624-word Mersenne Twister key fits a list.
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": [int(word) for word in numpy_state["state"]["key"]],
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators captured by :func:`rng_state`.

    CUDA states are restored for as many devices as both the state and this machine have; a state
    saved on a machine with CUDA restores its CPU generators on a machine without.

    :param state: the dict returned by :func:`rng_state` (possibly after a checkpoint round trip).
    """
    missing = {"python", "torch", "numpy"} - set(state)
    if missing:
        raise ValueError(
            f"RNG state lacks {sorted(missing)}; pass the dict returned by pyrovae.runtime.checkpoint.rng_state()."
        )
    version, internal_state, gauss_next = state["python"]
    random.setstate((version, tuple(internal_state), gauss_next))
    # torch refuses a generator state that a map_location moved to another device.
    torch.set_rng_state(state["torch"].cpu())
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy_state["bit_generator"],
            "state": {"key": np.asarray(numpy_state["key"], dtype=np.uint32), "pos": numpy_state["pos"]},
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    if state.get("cuda") is not None and torch.cuda.is_available():
        for device, cuda_state in zip(range(torch.cuda.device_count()), state["cuda"]):
            torch.cuda.set_rng_state(cuda_state.cpu(), device)


def save_params(path: PathLike, extra: Optional[Mapping[str, Any]] = None) -> None:
    """Save the whole param store (and the buffers of the networks behind it) atomically, with a
    SHA-256 of the contents (which detects corruption, not deliberate edits), readable with
    ``weights_only=True`` by :func:`load_params`.

    :param extra: more entries to keep beside the params (numbers, strings, tensors, containers).
    """
    payload = dict(extra or {})
    clash = {"params", "constraints", "buffers"} & set(payload)
    if clash:
        raise ValueError(f"extra uses the reserved key(s) {sorted(clash)}; rename them")
    save_checkpoint(path, {**payload, **params.state()})


def load_params(
    path: PathLike,
    model: Optional[Callable] = None,
    guide: Optional[Callable] = None,
    args: tuple = (),
    kwargs: Optional[dict] = None,
    map_location: Optional[Union[str, torch.device]] = "cpu",
) -> dict[str, Any]:
    """Load params saved by :func:`save_params`, by :func:`pyrovae.fit` (a checkpoint) or by Pyro's
    ``pyro.get_param_store().save(path)`` into the param store.

    With ``model`` and ``guide`` (and ``args``, e.g. ``(x[:1],)``) the pair is inspected at once,
    so its networks hold the loaded weights before anything else runs; without them the networks
    adopt the values the first time they are registered (pyrovae's models and guides do that on
    every call; a user's own ``pyro.module`` network through :func:`pyrovae.params.inspect`, :func:`pyrovae.fit` or
    the evaluation functions).

    :return: the file's other entries (for a :func:`pyrovae.fit` checkpoint: config, epoch, history).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path.absolute()}; check the path")
    try:
        payload = load_checkpoint(path, map_location=map_location)
    except ValueError as error:
        if "not a pyrovae checkpoint" not in str(error):
            raise
        # A file of Pyro's ParamStoreDict.save: a plain torch file of {"params", "constraints"}.
        with torch.serialization.safe_globals(_param_store_globals()):
            payload = torch.load(path, map_location=map_location, weights_only=True)
    params.load_state(payload, device=None)
    if model is not None or guide is not None:
        if model is None or guide is None:
            raise ValueError("pass both model and guide (and args) to bind the loaded values now, or neither")
        params.inspect(model, guide, args, kwargs)
    return {
        k: v
        for k, v in payload.items()
        if k not in ("params", "constraints", "buffers", "format", "version")
        and payload.get("format") == CHECKPOINT_FORMAT
    }


def _param_store_globals() -> list[Any]:
    return [*_safe_constraint_classes(), torch.nn.Parameter]
