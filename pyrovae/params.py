"""Pyro's param store as the source of truth for what a run trains, saves and restores.

Pyro keeps every parameter a model or guide registers (``pyro.param``, ``pyro.module``,
:class:`pyro.nn.PyroModule`, the autoguides) in one param store, by name. Two of its behaviours
make user code fail silently, and this module closes both:

- **A stale name.** ``pyro.module("encoder", new_net)`` when the store already holds
  ``"encoder$$$..."`` tensors of an *earlier* network returns those tensors: the new network is
  never trained (its own weights get no gradient) and nothing says so. Under :func:`register`
  (what pyrovae's models and guides call instead of ``pyro.module``) and :func:`inspect` (what
  :func:`pyrovae.fit` and the evaluation functions run first) the network being registered wins:
  the store hands out *its* tensors, so building a new guide and training it trains it.
- **Loaded values that never reach the network.** After ``pyro.get_param_store().load(path)``
  (or ``set_state``), ``pyro.module(name, net)`` keeps running ``net`` with its fresh weights
  unless ``update_module_params=True``. Here a stored tensor that does not belong to a live
  network is *adopted*: its values are copied into the network's own parameter and the store
  then holds that parameter, so the network computes with the loaded values and the optimizer
  steps the tensor the network uses.

What tells the two apart is whether the stored tensor is a parameter of a network that pyrovae has
seen registered (a weak set of such parameters, so networks that are garbage-collected drop out).

:func:`inspect` runs the guide and the replayed model once (no gradients, random state restored)
and reports what the pair touches: every param name, which params are per-datapoint rows
(``pyro.param(..., event_dim=...)`` inside a subsampled plate: lazy Adam and data-parallel row
reduction need them), and the networks behind the ``pyro.module`` names (found with a forward
hook, for their buffers); it refuses a pair that holds one tensor under two names (a network the
model and guide share, registered under two ``pyro.module`` names: the optimizer would step it
twice). :func:`state` / :func:`load_state` move that into and out of a
checkpoint; :func:`pyrovae.save_params` / :func:`pyrovae.load_params`
(:mod:`pyrovae.runtime.checkpoint`) are the public file versions.

This is the bottom layer: pyrovae's models and guides call :func:`register`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import pyro
import torch
from pyro import poutine
from pyro.params.param_store import _MODULE_NAMESPACE_DIVIDER as DIVIDER
from pyro.poutine.messenger import Messenger
from torch.distributions import transform_to

__all__ = ["ParamSites", "inspect", "load_state", "param_entry", "register", "state"]

#: Parameters of networks registered through :func:`register` or seen by :func:`inspect`, by id
#: (a WeakSet would compare tensors with ``==``); an entry leaves when its tensor is collected.
_LIVE: dict[int, weakref.ref[torch.Tensor]] = {}
#: The network last registered under each ``pyro.module`` name (for its buffers).
_MODULES: weakref.WeakValueDictionary[str, torch.nn.Module] = weakref.WeakValueDictionary()
#: Buffers read from a checkpoint, waiting for their network to be registered.
_PENDING_BUFFERS: dict[str, dict[str, torch.Tensor]] = {}


def _is_live(tensor: torch.Tensor) -> bool:
    ref = _LIVE.get(id(tensor))
    return ref is not None and ref() is tensor


def _mark_live(tensor: torch.Tensor) -> None:
    if not _is_live(tensor):
        key = id(tensor)

        def forget(_: weakref.ref[torch.Tensor], key: int = key) -> None:
            _LIVE.pop(key, None)

        _LIVE[key] = weakref.ref(tensor, forget)


def _stored(name: str) -> Optional[torch.Tensor]:
    # The store's unconstrained tensor, without the constrained view ParamStoreDict.__getitem__
    # builds (and tags with a weakref) on every access: this runs once per parameter per step.
    return pyro.get_param_store()._params.get(name)


def _adopt(name: str, stored: torch.Tensor, param: torch.Tensor) -> None:
    """Copy the store's (loaded) value of ``name`` into the network's ``param`` and make the store
    hold ``param`` itself."""
    store = pyro.get_param_store()
    constraint = store._constraints.get(name)
    with torch.no_grad():
        value = stored if constraint is None else transform_to(constraint)(stored)
        if value.shape != param.shape:
            raise ValueError(
                f"the param store's {name!r} has shape {tuple(value.shape)} but the network registered "
                f"under that name has {tuple(param.shape)}: the values were saved for another "
                "architecture; build the network the checkpoint was written for"
            )
        param.copy_(value)
    del store[name]
    store[name] = param  # an unconstrained module weight: the store now holds the tensor itself


def _bind(name: str, param: torch.Tensor) -> None:
    """Before ``pyro.param(name, param)`` for a network weight: make the store hold ``param``
    (adopting the store's value first if it was loaded rather than another live network's), and
    remember ``param`` as a live network weight."""
    stored = _stored(name)
    if stored is not None and stored is not param:
        if _is_live(stored):  # an earlier network under the same name: this one takes the name over
            store = pyro.get_param_store()
            del store[name]
            store[name] = param
        else:
            _adopt(name, stored, param)
    _mark_live(param)


def _load_pending_buffers(name: str, module: torch.nn.Module) -> None:
    buffers = _PENDING_BUFFERS.pop(name, None)
    if not buffers:
        return
    own = dict(module.named_buffers())
    missing = sorted(set(buffers) - set(own))
    if missing:
        raise ValueError(
            f"the checkpoint holds buffers {missing} for the network {name!r}, which has none of that "
            "name; it was saved for another architecture"
        )
    with torch.no_grad():
        for key, value in buffers.items():
            own[key].copy_(value)


def register(name: str, module: torch.nn.Module) -> torch.nn.Module:
    """``pyro.module(name, module)`` with the param store as the truth (see the module docstring):
    values loaded into the store are adopted by ``module``; if another live network was registered
    under ``name`` before, ``module`` takes the name over, so it is the one that trains."""
    for param_name, param in module.named_parameters():
        if param.requires_grad:
            _bind(f"{name}{DIVIDER}{param_name}", param)
    _MODULES[name] = module
    _load_pending_buffers(name, module)
    return pyro.module(name, module)


@dataclass(frozen=True)
class ParamSites:
    """What a model/guide pair touches in the param store.

    :ivar names: every param name the pair reads, sorted.
    :ivar local: per-datapoint params (``event_dim`` set, inside a plate that subsamples the data)
        and their number of rows, the plate's full size. Rows are the leading dimension.
    :ivar modules: the networks behind ``pyro.module`` names, for their buffers.
    """

    names: tuple[str, ...]
    local: Mapping[str, int] = field(default_factory=dict)
    modules: Mapping[str, torch.nn.Module] = field(default_factory=dict)

    @property
    def amortized(self) -> bool:
        """No per-datapoint rows: the guide gives q for points it was not trained on."""
        return not self.local


class _BindMessenger(Messenger):
    """Apply :func:`_bind` to every network weight a ``pyro.param`` call registers (a tensor that
    requires grad passed as the initial value, as ``pyro.module`` does), before the store lookup."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: dict[str, torch.Tensor] = {}

    def _pyro_param(self, msg: Any) -> None:
        args = msg["args"]
        if len(args) > 1 and isinstance(args[1], torch.Tensor) and args[1].requires_grad:
            _bind(msg["name"], args[1])
            self.weights[msg["name"]] = args[1]


@contextlib.contextmanager
def called_modules() -> Iterator[list[torch.nn.Module]]:
    """The ``torch.nn.Module``s run inside the block, in call order (a global forward pre-hook):
    how pyrovae finds the networks behind a function without reading attribute names."""
    called: list[torch.nn.Module] = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, _: called.append(module))
    try:
        yield called
    finally:
        handle.remove()


def _match_modules(weights: dict[str, torch.Tensor], called: list[torch.nn.Module]) -> dict[str, torch.nn.Module]:
    # The network behind pyro.module("N", net) is the called module whose trainable parameters
    # are exactly the initial values of the sites "N$$$<param name>".
    owner = {id(t): tuple(name.split(DIVIDER, 1)) for name, t in weights.items() if DIVIDER in name}
    found: dict[str, torch.nn.Module] = {}
    for module in called:
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named or id(named[0][1]) not in owner:
            continue
        prefix = owner[id(named[0][1])][0]
        if all(owner.get(id(p)) == (prefix, n) for n, p in named) and len(named) == sum(
            1 for key in weights if key.startswith(prefix + DIVIDER)
        ):
            found[prefix] = module
    return found


def inspect(model: Callable, guide: Callable, args: tuple = (), kwargs: Optional[dict] = None) -> ParamSites:
    """Run ``guide`` and ``model`` (replayed on the guide's draws) once on ``args`` and report the
    params they use; on the way, loaded values are bound into the networks and a network registered
    under an earlier network's name takes it over (as :func:`register` does).

    No gradients are taken and torch's random state is restored, so a training run that inspects
    its pair first draws the same numbers as one that does not. Params the pair creates on first
    use are created here (that is what a first training step would do).
    """
    kwargs = kwargs or {}
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    binder = _BindMessenger()
    with torch.no_grad(), torch.random.fork_rng(devices=devices), called_modules() as called, binder:
        with poutine.block(hide_types=["sample"]):
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    names: set[str] = set()
    local: dict[str, int] = {}
    holders: dict[int, set[str]] = {}
    for trace in (guide_trace, model_trace):
        for name, site in trace.nodes.items():
            if site["type"] != "param":
                continue
            names.add(name)
            value = site["value"]
            assert value is not None  # a param site always holds its tensor
            holders.setdefault(id(value.unconstrained()), set()).add(name)
            rows = _local_rows(name, site)
            if rows is not None:
                local[name] = rows
    shared = sorted(sorted(held) for held in holders.values() if len(held) > 1)
    if shared:
        raise ValueError(
            f"the model and guide hold one tensor under several param names ({', '.join(map(repr, shared[0]))}"
            f"{f' and {len(shared) - 1} more' if len(shared) > 1 else ''}): the optimizer steps every name, so "
            "that tensor would be stepped more than once per step; register a network that the model and the "
            "guide share (e.g. a VampPrior's encoder) under one pyro.module name, the guide's"
        )
    modules = _match_modules(binder.weights, called)
    for prefix, module in modules.items():
        _MODULES[prefix] = module
        _load_pending_buffers(prefix, module)
    return ParamSites(names=tuple(sorted(names)), local=local, modules=modules)


def _local_rows(name: str, site: Mapping[str, Any]) -> Optional[int]:
    event_dim = site["kwargs"].get("event_dim")
    if event_dim is None:
        return None
    stored = _stored(name)
    for frame in site["cond_indep_stack"]:
        if frame.dim is None or frame.full_size is None:
            continue
        dim = frame.dim - event_dim
        if stored is None or stored.dim() < -dim or stored.shape[dim] == 1:
            continue
        if stored.dim() + dim != 0:
            raise ValueError(
                f"the per-datapoint param {name!r} has its data rows at dim {dim} of shape "
                f"{tuple(stored.shape)}; pyrovae's lazy updates need them first: put the data plate "
                "at the leftmost batch dim the param has, or give it fewer event dims"
            )
        return int(frame.full_size)
    return None


def state(names: Optional[Any] = None, modules: Optional[Mapping[str, torch.nn.Module]] = None) -> dict[str, Any]:
    """The param store's ``names`` (all by default) as a checkpoint entry:
    ``{"params": {name: unconstrained tensor}, "constraints": {...}, "buffers": {network: {...}}}``.

    Buffers (non-trainable state such as an EMA codebook's counts) come from ``modules`` (as
    :func:`inspect` found them) or from the networks pyrovae has registered under those names.
    Tensors are detached copies, so the entry does not change as training goes on.
    """
    store = pyro.get_param_store()
    names = sorted(store.keys()) if names is None else sorted(names)
    missing = [n for n in names if n not in store]
    if missing:
        raise KeyError(f"the param store holds no {missing}; run the model and guide once first")
    raw = store.get_state()
    networks = dict(_MODULES)
    networks.update(modules or {})
    prefixes = {n.split(DIVIDER, 1)[0] for n in names if DIVIDER in n}
    buffers = {
        prefix: {
            key: value.detach().clone()
            for key, value in networks[prefix].state_dict().items()
            if key in dict(networks[prefix].named_buffers())
        }
        for prefix in sorted(prefixes)
        if prefix in networks
    }
    return {
        "params": {n: raw["params"][n].detach().clone() for n in names},
        "constraints": {n: raw["constraints"][n] for n in names},
        "buffers": {prefix: b for prefix, b in buffers.items() if b},
    }


def load_state(entry: Mapping[str, Any], device: Optional[Union[str, torch.device]] = None) -> None:
    """Put a :func:`state` entry (or a ``ParamStoreDict.get_state()`` dict) into the param store,
    replacing values of the same names. Network weights among them are adopted by their networks at
    the next :func:`register` or :func:`inspect`; buffers are loaded into their networks then."""
    entry = param_entry(entry)
    store = pyro.get_param_store()
    params = {n: (t if device is None else t.to(device)).detach() for n, t in entry["params"].items()}
    for name in params:
        if name in store:
            del store[name]
    for tensor in params.values():
        tensor.requires_grad_(True)
    store.set_state({"params": params, "constraints": dict(entry["constraints"])})
    # Adopted (weights) and loaded (buffers) when their network is next registered or inspected:
    # the network registered last under a name may be an older one than the caller's.
    for prefix, buffers in (entry.get("buffers") or {}).items():
        _PENDING_BUFFERS[prefix] = {k: (v if device is None else v.to(device)) for k, v in buffers.items()}


def param_entry(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    # Accepts a state() entry at the top level (pyrovae checkpoints, Pyro's param_store.save
    # files) or nested under "params" (checkpoints of earlier pyrovae versions).
    params = payload.get("params")
    if isinstance(params, Mapping) and "params" in params and "constraints" in params:
        # fit's checkpoints keep the buffers beside the nested store state
        return {**params, "buffers": params.get("buffers") or payload.get("buffers") or {}}
    if isinstance(params, Mapping) and "constraints" in payload:
        return payload
    raise ValueError(
        "no Pyro param-store state in this file (expected 'params' and 'constraints' entries, as written "
        "by pyrovae.save, pyrovae.fit or pyro.get_param_store().save)"
    )
