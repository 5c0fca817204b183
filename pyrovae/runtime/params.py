"""TEMPORARY STUB of the lead's pyrovae.runtime.params (lands on main ~09:20); replaced at the merge.

Only what the trainer needs, written against the announced API.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger


_DIVIDER = "$$$"
_loaded: set[str] = set()
_pending_buffers: dict[str, dict[str, torch.Tensor]] = {}
_modules: "weakref.WeakValueDictionary[str, torch.nn.Module]" = weakref.WeakValueDictionary()


@dataclass(frozen=True)
class ParamSites:
    names: tuple[str, ...]
    local: dict[str, int] = field(default_factory=dict)
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)


class _Bind(Messenger):
    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, Any] = {}

    def _pyro_param(self, msg: Any) -> None:
        name = msg["name"]
        store = pyro.get_param_store()
        args = msg["args"]
        if _DIVIDER in name and len(args) > 1 and isinstance(args[1], torch.nn.Parameter):
            own = args[1]
            if name in store._params:
                held = store._params[name]
                if held is not own:
                    if name in _loaded:
                        with torch.no_grad():
                            own.copy_(held.to(own.device))
                        del store._params[name]
                        store._param_to_name.pop(held, None)
                        store._params[name] = own
                        store._param_to_name[own] = name
                        _loaded.discard(name)
                    else:
                        raise ValueError(
                            f"the param store holds {name!r} from another network than the one registered "
                            "now; call pyro.clear_param_store() before building new networks, or give them "
                            "another pyro.module name"
                        )
            self.seen[name] = own


def _find_modules(names: set[str], called: list[torch.nn.Module]) -> dict[str, torch.nn.Module]:
    store = pyro.get_param_store()
    found: dict[str, torch.nn.Module] = {}
    prefixes = {n.split(_DIVIDER)[0] for n in names if _DIVIDER in n}
    for prefix in prefixes:
        wanted = {n.split(_DIVIDER)[1]: store._params[n] for n in names if n.startswith(prefix + _DIVIDER)}
        for module in called:
            own = dict(module.named_parameters())
            if set(wanted) <= set(own) and all(own[k] is v for k, v in wanted.items()):
                if prefix not in found or len(own) < len(dict(found[prefix].named_parameters())):
                    found[prefix] = module
    return found


def inspect(model: Callable, guide: Callable, args: tuple, kwargs: Optional[dict] = None) -> ParamSites:
    kwargs = kwargs or {}
    called: list[torch.nn.Module] = []

    def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        called.append(module)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, i: hook(m, i, None))
    try:
        with torch.random.fork_rng(), torch.no_grad(), poutine.block(), _Bind():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    finally:
        handle.remove()
    store = pyro.get_param_store()
    names: list[str] = []
    local: dict[str, int] = {}
    for trace in (guide_trace, model_trace):
        for name, site in trace.nodes.items():
            if site["type"] != "param" or name in names:
                continue
            names.append(name)
            subsampled = [f for f in site["cond_indep_stack"] if f.vectorized and f.full_size is not None]
            if subsampled and site["kwargs"].get("event_dim") is not None:
                local[name] = store._params[name].shape[0]
    modules = _find_modules(set(names), called)
    for prefix, module in modules.items():
        _modules[prefix] = module
        if prefix in _pending_buffers:
            buffers = _pending_buffers.pop(prefix)
            with torch.no_grad():
                for key, value in module.named_buffers():
                    if key in buffers:
                        value.copy_(buffers[key])
    return ParamSites(tuple(names), local, modules)


def register(name: str, module: torch.nn.Module) -> torch.nn.Module:
    with _Bind():
        pyro.module(name, module)
    _modules[name] = module
    return module


def state(names: Any) -> dict[str, Any]:
    store = pyro.get_param_store()
    names = list(names)
    prefixes = {n.split(_DIVIDER)[0] for n in names if _DIVIDER in n}
    return {
        "params": {n: store._params[n].detach().clone() for n in names},
        "constraints": {n: store._constraints[n] for n in names},
        "buffers": {
            p: {k: b.detach().clone() for k, b in _modules[p].named_buffers()} for p in sorted(prefixes) if p in _modules
        },
    }


def load_state(saved: dict[str, Any], device: Any = None) -> None:
    store = pyro.get_param_store()
    for name, value in saved["params"].items():
        value = value.to(device) if device is not None else value
        if name in store._params:
            old = store._params.pop(name)
            store._param_to_name.pop(old, None)
        value = value.detach().clone().requires_grad_()
        store._params[name] = value
        store._param_to_name[value] = name
        store._constraints[name] = saved["constraints"][name]
        if _DIVIDER in name:
            _loaded.add(name)
    for prefix, buffers in saved.get("buffers", {}).items():
        _pending_buffers[prefix] = {k: (v.to(device) if device is not None else v) for k, v in buffers.items()}
