r"""A Pyro objective's ``loss_and_grads``, traced once into a graph of tensor operations and replayed.

**Why.** An SVI step in Pyro spends about as much time in Python as in arithmetic at the batch
sizes VAEs train with on a CPU: every step rebuilds the traces, the plates, the distribution
objects and the messages of every ``pyro.param`` and ``pyro.sample`` site, then walks the traces to
form the surrogate loss. Once the structure of the step is fixed, all of that produces the same
sequence of tensor operations every time; only the tensors' values change.

**What.** :class:`LossAndGradsReplay` runs ``objective.loss_and_grads(model, guide, *args)`` eagerly
on the first call, as Pyro does. On the next call with the same structure it runs it once more
under :func:`torch.fx.experimental.proxy_tensor.make_fx`, which records every ATen operation of
the forward pass, of autograd's backward pass (including tensor hooks such as DReG's) and every
draw from torch's random generator, into one graph whose inputs are the step's tensors and the
Pyro params and whose outputs are the loss and the params' gradients. Pyro's own code runs during
that trace, so the graph computes exactly the objective's loss and gradients. Later calls run the
graph (under ``torch.no_grad``: its backward pass is already in it), with no Pyro code at all,
after exact simplifications (:func:`pyrovae.infer.graph_passes.simplify`: dead code, repeated
computations, constants, no-op views).

**Exact, and checked.** The replay draws from torch's generator in the same order as the eager
step, so for the same seed it gives the same draws, the same loss and the same gradients (the
graph runs the same kernels in the same order: the same bits). The first replay of every graph
is *verified*: the eager step and the replay run from the same random state, and the replay is used only if their losses, gradients
and final random states agree; otherwise the objective stays eager, and :attr:`status` says why.

**When it re-traces or stays eager.** A graph belongs to a *structure*: the shapes, dtypes and
devices of the tensor arguments, the values of the other arguments, and the names, shapes and
``requires_grad`` of the params in Pyro's param store. A new structure (e.g. a smaller last
batch, a new param, a frozen network) gets its own trace and verification. Steps that cannot be
traced stay eager: anything that reads a tensor's value into Python (a ``.item()``, a data
dependent ``if``, a moving-average baseline kept as a Python float) makes the trace fail, and
that failure is the signal. Python values that the model or guide read from elsewhere (an
attribute changed between steps, e.g. a KL weight set on the model object) are constants of the
graph: pass such a value as an argument (then it is part of the structure), or call
:meth:`LossAndGradsReplay.reset` after changing it. Pyro's argument checks
(``pyro.enable_validation``) run on the eager steps, not on replays.

**Reported loss.** The loss a Pyro ELBO returns is a Python float that it reads from the tensors
with ``pyro.infer.util.torch_item`` (and checks with ``pyro.util.warn_if_nan``). While tracing,
these two functions of Pyro's ``Trace_ELBO`` and ``TraceMeanField_ELBO`` modules keep the tensor
instead, so the loss stays in the graph; pyrovae's objectives report theirs through
:func:`reported_loss`, which does the same. ``torch_item`` accumulates in float64 and the graph in
the loss's own dtype, so the two reported losses agree to the loss's float precision.
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union, cast

import pyro
import torch
import torch.utils._pytree as pytree
from pyro import poutine
from pyro.infer import ELBO
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from pyrovae.checks import tracing, tracing_step
from pyrovae.infer.graph_passes import fast_kernels, simplify
from pyrovae.protocols import Objective

logger = logging.getLogger(__name__)

#: How :class:`LossAndGradsReplay` runs a step (see its ``backend`` parameter).
BACKENDS: tuple[str, ...] = ("eager", "replay", "inductor")

__all__ = [
    "BACKENDS",
    "LossAndGradsReplay",
    "ReplayedELBO",
    "ReplayedFunction",
    "choose_backend",
    "reported_loss",
]


def choose_backend(fast_path: Union[str, bool]) -> str:
    """The backend a ``fast_path`` setting (of :func:`pyrovae.fit`, :class:`pyrovae.train.step.GradientStep`,
    :func:`pyrovae.infer.evaluate.importance_sampling`) means: one of :data:`BACKENDS`, or ``True``
    (``"replay"``) / ``False`` (``"eager"``).

    :raises ValueError: an unknown setting, naming the choices.
    """
    if fast_path is True:
        return "replay"
    if fast_path is False:
        return "eager"
    if fast_path not in BACKENDS:
        raise ValueError(f"fast_path must be one of {BACKENDS} (or True/False), got {fast_path!r}")
    return str(fast_path)


def reported_loss(loss: Tensor) -> Union[float, Tensor]:
    """The float an objective's ``loss_and_grads`` returns: ``loss.item()``, except while
    :class:`LossAndGradsReplay` traces the step, when the tensor itself is kept in the graph."""
    return loss if tracing() else loss.item()


def _keep_tensor(value: Any, *args: Any, **kwargs: Any) -> Any:
    return value


def _float64_value(value: Any) -> Any:
    # torch_item(t) is float(t): the value in float64, summed by Python in float64. Keeping it as
    # a float64 tensor makes the graph's sums those same float64 sums, bit for bit.
    return value.detach().to(torch.float64) if isinstance(value, Tensor) else value


@contextlib.contextmanager
def _tracing_step() -> Iterator[None]:
    """Inside: :func:`reported_loss` and Pyro's ``torch_item`` / ``warn_if_nan`` in its ELBO
    modules keep tensors instead of reading them into Python."""
    import pyro.infer.trace_elbo as trace_elbo
    import pyro.infer.trace_mean_field_elbo as trace_mean_field_elbo

    modules: tuple[Any, ...] = (trace_elbo, trace_mean_field_elbo)  # Any: their functions are patched below
    saved = [(module, module.torch_item, module.warn_if_nan) for module in modules]
    try:
        for module in modules:
            module.torch_item = _float64_value
            module.warn_if_nan = _keep_tensor
        with tracing_step():
            yield
    finally:
        for module, item, warn in saved:
            module.torch_item, module.warn_if_nan = item, warn


def _rng_devices(tensors: list[Tensor]) -> list[int]:
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


def _rng_state(devices: list[int]) -> tuple[Tensor, ...]:
    return (torch.get_rng_state(), *(torch.cuda.get_rng_state(d) for d in devices))


def _set_rng_state(state: tuple[Tensor, ...], devices: list[int]) -> None:
    torch.set_rng_state(state[0])
    for device, s in zip(devices, state[1:]):
        torch.cuda.set_rng_state(s, device)


@dataclass
class _Graph:
    """A traced step: the graph and what it was traced from."""

    module: torch.fx.GraphModule
    param_names: tuple[str, ...]  # the params the eager step used, in its order
    verified: bool = False
    compiled: Optional[Callable[..., Any]] = None  # the Inductor-compiled module, if compiled
    interpreted: Optional[torch.jit.ScriptModule] = None  # the graph run by TorchScript's interpreter

    def __call__(self, *tensors: Tensor) -> Any:
        if self.compiled is not None:
            return self.compiled(*tensors)
        if self.interpreted is not None:
            # No TorchScript optimisation (fusion would change the bits): the interpreter runs the
            # graph's ATen ops one by one, as the GraphModule does, with less Python per op.
            with torch.jit.optimized_execution(False):
                return self.interpreted(*tensors)
        return self.module(*tensors)


def _interpreted(module: torch.fx.GraphModule, inputs: list[Tensor]) -> Optional[torch.jit.ScriptModule]:
    """The graph as a TorchScript module (its ops recorded by ``torch.jit.trace``), or ``None`` if
    TorchScript cannot hold it (the GraphModule then runs it)."""
    import warnings

    devices = _rng_devices(inputs)
    state = _rng_state(devices)
    try:
        with warnings.catch_warnings(), torch.no_grad(), torch.jit.optimized_execution(False):
            warnings.simplefilter("ignore")
            return torch.jit.trace(module, tuple(inputs), check_trace=False)
    except Exception as error:  # noqa: BLE001 - TorchScript is an optimisation only
        logger.debug("pyrovae: the traced step stays a GraphModule (%s)", _reason(error))
        return None
    finally:
        _set_rng_state(state, devices)


@dataclass
class ReplayStats:
    """How the calls of a :class:`LossAndGradsReplay` were served."""

    eager: int = 0
    traced: int = 0
    verified: int = 0
    replayed: int = 0
    failures: list[str] = field(default_factory=list)


def _structure(leaves: list[Any], spec: Any, store: Any) -> Any:
    """The structure a graph belongs to (module docstring): the arguments' pytree, the tensors'
    shapes, dtypes, devices and ``requires_grad``, the other leaves' values, the grad mode and the
    param store's names, shapes, dtypes and ``requires_grad``."""
    parts: list[Any] = [spec, torch.is_grad_enabled()]
    for leaf in leaves:
        if isinstance(leaf, Tensor):
            parts.append((leaf.shape, leaf.dtype, leaf.device, leaf.requires_grad))
        elif leaf is None or isinstance(leaf, (bool, int, float, str)):
            parts.append((type(leaf), leaf))
        else:
            parts.append((type(leaf), id(leaf)))
    for name, value in store._params.items():
        parts.append((name, value.shape, value.dtype, value.requires_grad))
    return tuple(parts)


class _Graphs:
    """What :class:`LossAndGradsReplay` and :class:`ReplayedFunction` share: the graphs by
    structure (``None``: the structure stays eager), the structures seen once, the counts."""

    def __init__(self, backend: str, verify: bool, max_graphs: int, rtol: float) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        self.backend, self.verify, self.max_graphs, self.rtol = backend, verify, max_graphs, rtol
        self.stats = ReplayStats()
        self._graphs: dict[Any, Optional[_Graph]] = {}  # structure -> graph, or None: stays eager
        self._seen: dict[Any, Any] = {}  # structures run eagerly once (-> what that run found)

    @property
    def status(self) -> str:
        """One line: how the last structures were served (for logs and tests)."""
        s = self.stats
        line = f"eager {s.eager}, traced {s.traced}, verified {s.verified}, replayed {s.replayed}"
        if s.failures:
            line += f"; last problem: {s.failures[-1]}"
        return line

    def reset(self) -> None:
        """Forget every graph (call after changing a Python value the model or guide reads)."""
        self._graphs.clear()
        self._seen.clear()

    def _what(self) -> str:
        raise NotImplementedError

    def _keep(self, key: Any, graph: Optional[_Graph]) -> None:
        self._graphs[key] = graph
        while len(self._graphs) > self.max_graphs:
            self._graphs.pop(next(iter(self._graphs)))

    def _new_graph(
        self, module: torch.fx.GraphModule, names: tuple[str, ...], inputs: list[Tensor], optimize: bool = False
    ) -> _Graph:
        """A recorded graph made ready to run: simplified (exactly), kernels swapped if asked,
        and the backend's executor: TorchScript's interpreter (``"replay"``) or Inductor."""
        self.stats.traced += 1
        graph = _Graph(module, names)
        simplify(module)
        if optimize:
            fast_kernels(module)
        if self.backend == "replay":
            graph.interpreted = _interpreted(module, inputs)
        elif self.backend == "inductor":
            graph.compiled, reason = _compiled(module, inputs)
            if reason is not None:
                self.stats.failures.append(reason)
        return graph

    def _give_up(self, key: Any, reason: str, disagreed: bool = False) -> None:
        self._keep(key, None)
        self.stats.failures.append(reason)
        if disagreed:
            logger.warning(
                "pyrovae: the traced %s disagreed with the eager one (%s); it stays eager", self._what(), reason
            )
        else:
            logger.info("pyrovae: %s stays eager (%s)", self._what(), reason)


class LossAndGradsReplay(_Graphs):
    """``objective.loss_and_grads(model, guide, *args, **kwargs)``, traced once per structure and
    replayed (see the module docstring for what is traced, when, and how it is checked).

    :param objective: any ``pyro.infer.ELBO`` (pyrovae's objectives or Pyro's).
    :param backend: how a traced graph runs (:data:`BACKENDS`): ``"replay"`` runs it op by op, as
        recorded; ``"inductor"`` compiles it with ``torch.compile``'s Inductor backend first (fused
        kernels; a C++ compiler on the CPU, Triton on a GPU; about ten seconds per structure,
        cached on disk; falls back to ``"replay"`` if compiling fails); ``"eager"`` traces nothing
        and runs every call as ``objective.loss_and_grads``.
    :param verify: check the first replay of every graph against the eager step (recommended;
        ``False`` trusts the trace).
    :param optimize: rewrite the graph with :func:`pyrovae.infer.graph_passes.fast_kernels` (faster
        softplus on the CPU). The exact :func:`~pyrovae.infer.graph_passes.simplify` always runs.
        Off by default: the rewrite changes results in the last bits, and then a resumed run is no
        longer bit for bit an uninterrupted one (whose steps were replays where the resumed run's
        first steps are eager). Without it, a replay runs the eager step's kernels in the eager
        step's order and gives the same bits.
    :param max_graphs: structures kept at once (the oldest is dropped beyond it).
    :param rtol: relative tolerance of the verification, on each gradient's norm and the loss.
    """

    def __init__(
        self,
        objective: Objective,
        *,
        backend: str = "replay",
        verify: bool = True,
        optimize: bool = False,
        max_graphs: int = 8,
        rtol: float = 1e-4,
    ) -> None:
        super().__init__(backend, verify, max_graphs, rtol)
        self.objective = objective
        self.optimize = optimize
        # self._seen: structure -> the params its eager step used

    def _what(self) -> str:
        return f"step of {type(self.objective).__name__}"

    def __call__(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> tuple[float, dict[str, Tensor]]:
        """Run one ``loss_and_grads``.

        :return: the loss (a float, as ``loss_and_grads`` returns it) and the params of the step by
            name (Pyro's unconstrained tensors), their ``.grad`` holding the step's gradients.
        """
        if self.backend == "eager":
            return self._eager(model, guide, args, kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        store = pyro.get_param_store()
        key = _structure(leaves, spec, store)
        if key not in self._graphs:
            names = self._seen.get(key)
            if names is None:
                loss, params = self._eager(model, guide, args, kwargs)
                # The structure after the step: a first step creates its params in the store.
                self._seen[_structure(leaves, spec, store)] = tuple(params)
                return loss, params
            return self._trace(key, names, model, guide, leaves, spec)
        graph = self._graphs[key]
        if graph is None:
            return self._eager(model, guide, args, kwargs)
        if not graph.verified:
            if self.verify:
                return self._verify(key, graph, model, guide, args, kwargs, leaves, store)
            graph.verified = True  # trusted unchecked (verify=False)
        return self._replay(graph, leaves, store)

    # ----------------------------------------------------------------------------------------------
    def _eager(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> tuple[float, dict[str, Tensor]]:
        self.stats.eager += 1
        with poutine.trace(param_only=True) as capture:
            loss = self.objective.loss_and_grads(model, guide, *args, **kwargs)
        # a param site's value is the constrained tensor, which carries .unconstrained
        params = {name: cast(Any, site["value"]).unconstrained() for name, site in capture.trace.nodes.items()}
        return float(loss), params

    def _store_tensors(self, store: Any, names: tuple[str, ...]) -> list[Tensor]:
        return [store._params[name] for name in names]

    def _trace(
        self, key: Any, names: tuple[str, ...], model: Callable, guide: Callable, leaves: list[Any], spec: Any
    ) -> tuple[float, dict[str, Tensor]]:
        store = pyro.get_param_store()
        params = self._store_tensors(store, names)
        tensor_slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
        for p in params:
            p.grad = None

        outputs: list[Any] = []

        def step(*tensors: Tensor) -> tuple[Tensor, list[Optional[Tensor]]]:
            values = list(leaves)
            for slot, tensor in zip(tensor_slots, tensors):
                values[slot] = tensor
            args, kwargs = pytree.tree_unflatten(values, spec)
            with _tracing_step():
                loss = self.objective.loss_and_grads(model, guide, *args, **kwargs)
            grads = [p.grad for p in tensors[len(tensor_slots) :]]
            for p in tensors[len(tensor_slots) :]:
                p.grad = None
            if not isinstance(loss, Tensor):
                raise _Untraceable(f"loss_and_grads returned {type(loss).__name__}, not the loss tensor")
            outputs[:] = [loss.detach(), grads]
            return loss.detach(), grads

        inputs = [leaves[i] for i in tensor_slots] + params
        try:
            module = _record(step, inputs)
        except Exception as error:  # noqa: BLE001 - any failure to trace means: stay eager
            for p in params:
                p.grad = None
            self._give_up(key, _reason(error))
            return self._eager(model, guide, *pytree.tree_unflatten(leaves, spec))
        refusal = _unreplayable(module)
        if refusal is not None:
            self._give_up(key, refusal)
            loss, grads = outputs
            for param, grad in zip(params, grads):
                param.grad = grad
            return float(loss), dict(zip(names, params))
        self._keep(key, self._new_graph(module, names, inputs, self.optimize))
        # The trace ran Pyro's step for real: its outputs are this call's result.
        loss, grads = outputs
        for param, grad in zip(params, grads):
            param.grad = grad
        return float(loss), dict(zip(names, params))

    def _run(self, graph: _Graph, leaves: list[Any], store: Any) -> tuple[Tensor, dict[str, Tensor], list[Tensor]]:
        params = self._store_tensors(store, graph.param_names)
        tensors = [leaf for leaf in leaves if isinstance(leaf, Tensor)]
        with torch.no_grad():
            loss, grads = graph(*tensors, *params)
        return loss, dict(zip(graph.param_names, params)), grads

    def _replay(self, graph: _Graph, leaves: list[Any], store: Any) -> tuple[float, dict[str, Tensor]]:
        loss, params, grads = self._run(graph, leaves, store)
        for param, grad in zip(params.values(), grads):
            if grad is not None:
                param.grad = grad if param.grad is None else param.grad + grad
        self.stats.replayed += 1
        return loss.item(), params

    def _verify(
        self,
        key: Any,
        graph: _Graph,
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
        leaves: list[Any],
        store: Any,
    ) -> tuple[float, dict[str, Tensor]]:
        devices = _rng_devices([leaf for leaf in leaves if isinstance(leaf, Tensor)])
        before = _rng_state(devices)
        loss, params = self._eager(model, guide, args, kwargs)
        self.stats.eager -= 1
        after = _rng_state(devices)
        grads = {name: p.grad for name, p in params.items()}
        for p in params.values():
            p.grad = None
        _set_rng_state(before, devices)
        try:
            replay_loss, replay_params, replay_grads = self._run(graph, leaves, store)
        except Exception as error:  # noqa: BLE001 - a graph that fails to run is not the step
            problem: Optional[str] = f"the replay failed ({_reason(error)})"
        else:
            replayed = {name: g for name, g in zip(replay_params, replay_grads) if g is not None}
            problem = _disagreement(loss, grads, replay_loss.item(), replayed, after, _rng_state(devices), self.rtol)
        _set_rng_state(after, devices)
        for name, p in params.items():
            p.grad = grads[name]
        if problem is None:
            graph.verified = True
            self.stats.verified += 1
        else:
            self._give_up(key, problem, disagreed=True)
        return loss, params


def _record(fn: Callable[..., Any], inputs: list[Tensor]) -> torch.fx.GraphModule:
    """``fn(*inputs)`` run for real under ``make_fx``: the graph of its ATen ops. Pyro's argument
    checks are off and :class:`_WriteGuard` stops a write into an outside tensor before it
    happens. On failure the random state is put back and the error raised."""
    from torch.fx.experimental.proxy_tensor import make_fx

    devices = _rng_devices(inputs)
    before = _rng_state(devices)

    def guarded(*tensors: Tensor) -> Any:
        with pyro.validation_enabled(False), _WriteGuard():
            return fn(*tensors)

    try:
        return make_fx(guarded, tracing_mode="real")(*inputs)
    except Exception:
        _set_rng_state(before, devices)
        raise


def _compiled(module: torch.fx.GraphModule, inputs: list[Tensor]) -> tuple[Optional[Callable[..., Any]], Optional[str]]:
    """The graph compiled by Inductor, with torch's own random kernels (``fallback_random``: the
    same draws as the eager step), or ``None`` and why if compiling fails (then it is replayed op
    by op)."""
    import torch._inductor.config as inductor_config

    compiled = torch.compile(module, backend="inductor", dynamic=False, fullgraph=True)
    devices = _rng_devices(inputs)
    state = _rng_state(devices)
    try:
        with inductor_config.patch(fallback_random=True), torch.no_grad():
            compiled(*inputs)
    except Exception as error:  # noqa: BLE001 - no compiler, an unsupported op, ...: replay instead
        logger.warning("pyrovae: compiling the step failed (%s); it is replayed op by op", _reason(error))
        return None, f"not compiled ({_reason(error)}); replaying op by op"
    finally:
        _set_rng_state(state, devices)
    return compiled, None


class ReplayedFunction(_Graphs):
    """``fn(*args, **kwargs)``, a function of tensors that returns a tensor (or a tuple, list or
    dict of them), called under ``torch.no_grad`` (with gradients enabled it just runs ``fn``),
    traced once per structure and replayed, as
    :class:`LossAndGradsReplay` does for a training step (the same structures, verification and
    refusals). :func:`pyrovae.infer.evaluate.importance_sampling` runs its chunks of importance
    draws through one.

    :param fn: e.g. the log-weights of a chunk of draws; it may call Pyro models and guides (Pyro's
        params are inputs of the graph, read from the param store at every call).
    :param backend: as for :class:`LossAndGradsReplay`.
    :param rtol: tolerance of the verification, relative to each output's largest magnitude.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        backend: str = "replay",
        verify: bool = True,
        max_graphs: int = 8,
        rtol: float = 1e-5,
    ) -> None:
        super().__init__(backend, verify, max_graphs, rtol)
        self.fn = fn

    def _what(self) -> str:
        return getattr(self.fn, "__name__", "the function")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.backend == "eager" or torch.is_grad_enabled():
            # A replay runs without autograd: a call that may need gradients runs fn itself.
            return self._eager(args, kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        store = pyro.get_param_store()
        key = _structure(leaves, spec, store)
        if key not in self._graphs:
            if key not in self._seen:
                out = self._eager(args, kwargs)
                self._seen[_structure(leaves, spec, store)] = True
                return out
            return self._trace(key, leaves, spec, store)
        graph = self._graphs[key]
        if graph is None:
            return self._eager(args, kwargs)
        tensors = self._inputs(graph, leaves, store)
        if not graph.verified:
            if self.verify:
                return self._verify(key, graph, args, kwargs, tensors)
            graph.verified = True  # trusted unchecked (verify=False)
        self.stats.replayed += 1
        with torch.no_grad():
            return graph(*tensors)

    def _eager(self, args: tuple, kwargs: dict) -> Any:
        self.stats.eager += 1
        return self.fn(*args, **kwargs)

    @staticmethod
    def _inputs(graph: _Graph, leaves: list[Any], store: Any) -> list[Tensor]:
        return [leaf for leaf in leaves if isinstance(leaf, Tensor)] + [store._params[n] for n in graph.param_names]

    def _trace(self, key: Any, leaves: list[Any], spec: Any, store: Any) -> Any:
        names = tuple(store._params)
        slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
        outputs: list[Any] = []

        def call(*tensors: Tensor) -> Any:
            values = list(leaves)
            for slot, tensor in zip(slots, tensors):
                values[slot] = tensor
            args, kwargs = pytree.tree_unflatten(values, spec)
            with _tracing_step():
                out = self.fn(*args, **kwargs)
            outputs[:] = [out]
            return out

        inputs = [leaves[i] for i in slots] + [store._params[n] for n in names]
        try:
            with torch.no_grad():
                module = _record(call, inputs)
        except Exception as error:  # noqa: BLE001 - stays eager
            self._give_up(key, _reason(error))
            return self._eager(*pytree.tree_unflatten(leaves, spec))
        refusal = _unreplayable(module)
        if refusal is not None:
            self._give_up(key, refusal)
            return outputs[0]
        self._keep(key, self._new_graph(module, names, inputs))
        return outputs[0]

    def _verify(self, key: Any, graph: _Graph, args: tuple, kwargs: dict, tensors: list[Tensor]) -> Any:
        devices = _rng_devices(tensors)
        before = _rng_state(devices)
        expected = self._eager(args, kwargs)
        self.stats.eager -= 1
        after = _rng_state(devices)
        _set_rng_state(before, devices)
        try:
            with torch.no_grad():
                got = graph(*tensors)
            problem = _outputs_disagree(expected, got, after, _rng_state(devices), self.rtol)
        except Exception as error:  # noqa: BLE001 - a graph that fails to run is not the function
            problem = f"the replay failed ({_reason(error)})"
        _set_rng_state(after, devices)
        if problem is None:
            graph.verified = True
            self.stats.verified += 1
        else:
            self._give_up(key, problem, disagreed=True)
        return expected


def _outputs_disagree(
    expected: Any, got: Any, rng: tuple[Tensor, ...], replay_rng: tuple[Tensor, ...], rtol: float
) -> Optional[str]:
    if not all(torch.equal(a, b) for a, b in zip(rng, replay_rng)):
        return "it drew a different number of random values"
    e_leaves, e_spec = pytree.tree_flatten(expected)
    g_leaves, g_spec = pytree.tree_flatten(got)
    if e_spec != g_spec:
        return "its outputs have another structure"
    for e, g in zip(e_leaves, g_leaves):
        if not isinstance(e, Tensor):
            if e != g:
                return f"an output is {g!r} instead of {e!r}"
            continue
        if e.shape != g.shape:
            return f"an output has shape {tuple(g.shape)} instead of {tuple(e.shape)}"
        scale = float(e.abs().nan_to_num(0.0).max()) if e.numel() else 0.0
        if not torch.allclose(g, e, rtol=0.0, atol=rtol * scale + 1e-12, equal_nan=True):
            return f"an output is off by {float((g - e).abs().max()):.3g} (largest value {scale:.3g})"
    return None


class _Untraceable(RuntimeError):
    pass


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "_local_scalar_dense" in text or "data-dependent" in text:
        text = "it reads a tensor's value into Python (.item(), bool() or a data-dependent branch)"
    return f"{type(error).__name__}: {text}"[:300]


def _disagreement(
    loss: float,
    grads: dict[str, Optional[Tensor]],
    replay_loss: float,
    replay_grads: dict[str, Tensor],
    rng: tuple[Tensor, ...],
    replay_rng: tuple[Tensor, ...],
    rtol: float,
) -> Optional[str]:
    """Why the replay is not the eager step, or ``None`` if it is (within ``rtol``)."""
    if not all(torch.equal(a, b) for a, b in zip(rng, replay_rng)):
        return "it drew a different number of random values"
    if not math.isclose(loss, replay_loss, rel_tol=rtol, abs_tol=1e-6) and not (
        math.isnan(loss) and math.isnan(replay_loss)
    ):
        return f"loss {replay_loss!r} instead of {loss!r}"
    eager = {name: g for name, g in grads.items() if g is not None}
    if set(eager) != set(replay_grads):
        return f"gradients for {sorted(replay_grads)} instead of {sorted(eager)}"
    for name, g in eager.items():
        r = replay_grads[name]
        if r.shape != g.shape:
            return f"the gradient of {name} has shape {tuple(r.shape)} instead of {tuple(g.shape)}"
        scale = float(torch.linalg.vector_norm(g.double()))
        err = float(torch.linalg.vector_norm((r - g).double()))
        if not err <= rtol * scale + 1e-12:
            return f"the gradient of {name} is off by {err:.3g} (norm {scale:.3g})"
    return None


class _WriteGuard(TorchDispatchMode):
    """Stop a trace *before* the step writes into a tensor it did not create (an input, a buffer
    such as BatchNorm's running mean or a VQ codebook's EMA, a param): such state must see each
    step exactly once, which a verified replay (the step run twice) and a replayed graph cannot
    promise, so the step stays eager. Raising before the write leaves that state untouched, so the
    eager step that follows makes the one and only update."""

    def __init__(self) -> None:
        super().__init__()
        self.created: dict[int, weakref.ref[Tensor]] = {}  # by id: tensors compare elementwise

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema
        if schema.is_mutable:
            for argument, value in zip(schema.arguments, args):
                if (
                    argument.alias_info is not None
                    and argument.alias_info.is_write
                    and isinstance(value, Tensor)
                    and not self._made_here(value)
                ):
                    raise _Untraceable(f"it writes into a tensor it did not create ({func.name()})")
        out = func(*args, **kwargs)
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, Tensor):
                self.created[id(tensor)] = weakref.ref(tensor)
        return out

    def _made_here(self, tensor: Tensor) -> bool:
        ref = self.created.get(id(tensor))
        return ref is not None and ref() is tensor


def _unreplayable(module: torch.fx.GraphModule) -> Optional[str]:
    """Why a traced graph cannot stand in for the step, or ``None``: an op whose output shape
    depends on values (``nonzero``, boolean-mask indexing, ...), whose replay would keep the shapes
    of the traced step. (Writes into outside tensors stop the trace itself: :class:`_WriteGuard`.)"""
    for node in module.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        tags = node.target.tags
        if (torch.Tag.dynamic_output_shape in tags and not _integer_indexing(node)) or (
            torch.Tag.data_dependent_output in tags
        ):
            return f"it uses {node.target.name()}, whose output shape depends on the values"
    return None


def _integer_indexing(node: torch.fx.Node) -> bool:
    """An ``index``/``index_put`` whose indices are all integer tensors: its output shape is that
    of the indices, not of their values (boolean masks would be the values)."""
    if node.target not in (
        torch.ops.aten.index.Tensor,
        torch.ops.aten.index_put.default,
        torch.ops.aten.index_put_.default,
        torch.ops.aten._unsafe_index.Tensor,
    ):
        return False
    indices = cast(  # the op's list of index tensors (None: a dimension taken whole)
        Sequence[Optional[torch.fx.Node]], node.args[1] if len(node.args) > 1 else node.kwargs.get("indices", ())
    )
    for index in indices:
        if index is None:
            continue
        value = index.meta.get("val") if isinstance(index, torch.fx.Node) else None
        if not isinstance(value, Tensor) or value.dtype in (torch.bool, torch.uint8):
            return False
    return True


class ReplayedELBO(ELBO):
    """A ``pyro.infer.ELBO`` whose ``loss_and_grads`` is :class:`LossAndGradsReplay` of another:
    ``SVI(model, guide, optim, loss=ReplayedELBO(Trace_ELBO()))``.

    ``loss`` and ``differentiable_loss`` are the wrapped objective's. After a replayed
    ``loss_and_grads`` the step's params are announced to Pyro (one ``pyro.param`` call each), so
    that ``SVI.step`` finds and steps them as usual.

    :param objective: the objective to replay (a subclass of ``pyro.infer.ELBO``).
    :param kwargs: passed to :class:`LossAndGradsReplay`.
    """

    def __init__(self, objective: ELBO, **kwargs: Any) -> None:
        super().__init__(
            num_particles=objective.num_particles,
            max_plate_nesting=objective.max_plate_nesting,
            vectorize_particles=objective.vectorize_particles,
        )
        self.objective = objective
        # The base class ELBO has no loss methods: every subclass defines its own (protocols.Objective).
        self.replay = LossAndGradsReplay(cast(Objective, objective), **kwargs)

    def _get_trace(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> Any:
        return self.objective._get_trace(model, guide, args, kwargs)

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        return cast(Objective, self.objective).loss(model, guide, *args, **kwargs)

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> Tensor:
        # a subclass method, on neither the base class ELBO nor protocols.Objective
        return cast(Any, self.objective).differentiable_loss(model, guide, *args, **kwargs)

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        loss, params = self.replay(model, guide, *args, **kwargs)
        for name in params:
            pyro.param(name)
        return loss
