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
graph (under ``torch.no_grad``: its backward pass is already in it), with no Pyro code at all.

**Exact, and checked.** The replay draws from torch's generator in the same order as the eager
step, so for the same seed it gives the same draws, the same loss and the same gradients (the
graph runs the same kernels; :func:`optimize_graph` changes only how a few are computed, to
within float rounding). The first replay of every graph is *verified*: the eager step and the
replay run from the same random state, and the replay is used only if their losses, gradients
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
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

import pyro
import torch
import torch.utils._pytree as pytree
from pyro import poutine
from pyro.infer import ELBO
from torch import Tensor

logger = logging.getLogger(__name__)

#: How :class:`LossAndGradsReplay` runs a step (see its ``backend`` parameter).
BACKENDS: tuple[str, ...] = ("eager", "replay", "inductor")

#: What ``fast_path`` of :func:`pyrovae.fit` and :class:`pyrovae.train.step.GradientStep` takes:
#: a backend, ``"auto"`` (:func:`choose_backend`), or ``True`` (``"replay"``) / ``False`` (``"eager"``).
FAST_PATHS: tuple[str, ...] = ("auto", *BACKENDS)

#: Under ``fast_path="auto"``, runs of at least this many steps are compiled (``"inductor"``):
#: compiling costs ~10 s per structure on a CPU and saves ~1 ms per step there.
AUTO_COMPILE_STEPS = 5000

__all__ = ["AUTO_COMPILE_STEPS", "BACKENDS", "FAST_PATHS", "LossAndGradsReplay", "choose_backend", "ReplayedELBO", "optimize_graph", "reported_loss"]

_state = threading.local()


def choose_backend(fast_path: Union[str, bool], steps: Optional[int] = None, device: Any = "cpu") -> str:
    """The backend a ``fast_path`` setting means.

    ``True`` is ``"replay"`` and ``False`` ``"eager"``; ``"auto"`` is ``"inductor"`` for a run of at
    least :data:`AUTO_COMPILE_STEPS` steps where Inductor can compile (a C++ compiler on the CPU,
    Triton on a GPU), else ``"replay"``.

    :raises ValueError: an unknown setting, naming the choices.
    """
    if fast_path is True:
        return "replay"
    if fast_path is False:
        return "eager"
    if fast_path not in FAST_PATHS:
        raise ValueError(f"fast_path must be one of {FAST_PATHS} (or True/False), got {fast_path!r}")
    if fast_path != "auto":
        return str(fast_path)
    if steps is None or steps < AUTO_COMPILE_STEPS:
        return "replay"
    return "inductor" if _can_compile(torch.device(device)) else "replay"


def _can_compile(device: torch.device) -> bool:
    import importlib.util
    import shutil

    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return device.type == "cpu" and any(shutil.which(cc) for cc in ("g++", "clang++", "c++"))


def _tracing() -> bool:
    return getattr(_state, "tracing", False)


def reported_loss(loss: Tensor) -> Union[float, Tensor]:
    """The float an objective's ``loss_and_grads`` returns: ``loss.item()``, except while
    :class:`LossAndGradsReplay` traces the step, when the tensor itself is kept in the graph."""
    return loss if _tracing() else loss.item()


def _keep_tensor(value: Any, *args: Any, **kwargs: Any) -> Any:
    return value


@contextlib.contextmanager
def _tracing_step() -> Iterator[None]:
    """Inside: :func:`reported_loss` and Pyro's ``torch_item`` / ``warn_if_nan`` in its ELBO
    modules keep tensors instead of reading them into Python."""
    import pyro.infer.trace_elbo as trace_elbo
    import pyro.infer.trace_mean_field_elbo as trace_mean_field_elbo

    modules = (trace_elbo, trace_mean_field_elbo)
    saved = [(module, module.torch_item, module.warn_if_nan) for module in modules]
    _state.tracing = True
    try:
        for module in modules:
            module.torch_item = _keep_tensor
            module.warn_if_nan = _keep_tensor
        yield
    finally:
        for module, item, warn in saved:
            module.torch_item, module.warn_if_nan = item, warn
        _state.tracing = False


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

    def __call__(self, *tensors: Tensor) -> Any:
        # not `compiled or module`: a compiled module has no truth value (its __len__ raises)
        return (self.compiled if self.compiled is not None else self.module)(*tensors)


@dataclass
class ReplayStats:
    """How the calls of a :class:`LossAndGradsReplay` were served."""

    eager: int = 0
    traced: int = 0
    verified: int = 0
    replayed: int = 0
    failures: list[str] = field(default_factory=list)


class LossAndGradsReplay:
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
    :param optimize: rewrite the graph with :func:`optimize_graph`.
    :param max_graphs: structures kept at once (the oldest is dropped beyond it).
    :param rtol: relative tolerance of the verification, on each gradient's norm and the loss.
    """

    def __init__(
        self,
        objective: ELBO,
        *,
        backend: str = "replay",
        verify: bool = True,
        optimize: bool = True,
        max_graphs: int = 8,
        rtol: float = 1e-4,
    ) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        self.objective = objective
        self.backend = backend
        self.verify = verify
        self.optimize = optimize
        self.max_graphs = max_graphs
        self.rtol = rtol
        self.stats = ReplayStats()
        self._graphs: dict[Any, Optional[_Graph]] = {}  # structure -> graph, or None: stays eager
        self._seen: dict[Any, tuple[str, ...]] = {}  # structure -> the params its eager step used

    # ----------------------------------------------------------------------------------------------
    @property
    def status(self) -> str:
        """One line: how the last structures were served (for logs and tests)."""
        s = self.stats
        line = f"eager {s.eager}, traced {s.traced}, verified {s.verified}, replayed {s.replayed}"
        if s.failures:
            line += f"; stayed eager: {s.failures[-1]}"
        return line

    def reset(self) -> None:
        """Forget every graph (call after changing a Python value the model or guide reads)."""
        self._graphs.clear()
        self._seen.clear()

    def __call__(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> tuple[float, dict[str, Tensor]]:
        """Run one ``loss_and_grads``.

        :return: the loss (a float, as ``loss_and_grads`` returns it) and the params of the step by
            name (Pyro's unconstrained tensors), their ``.grad`` holding the step's gradients.
        """
        if self.backend == "eager":
            return self._eager(model, guide, args, kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        store = pyro.get_param_store()
        key = self._structure(leaves, spec, store)
        graph = self._graphs.get(key, False)
        if graph is False:
            names = self._seen.get(key)
            if names is None:
                loss, params = self._eager(model, guide, args, kwargs)
                self._seen[key] = tuple(params)
                return loss, params
            return self._trace(key, names, model, guide, leaves, spec)
        if graph is None:
            return self._eager(model, guide, args, kwargs)
        if not graph.verified:
            return self._verify(key, graph, model, guide, args, kwargs, leaves, store)
        return self._replay(graph, leaves, store)

    # ----------------------------------------------------------------------------------------------
    @staticmethod
    def _structure(leaves: list[Any], spec: Any, store: Any) -> Any:
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

    def _eager(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> tuple[float, dict[str, Tensor]]:
        self.stats.eager += 1
        with poutine.trace(param_only=True) as capture:
            loss = self.objective.loss_and_grads(model, guide, *args, **kwargs)
        params = {name: site["value"].unconstrained() for name, site in capture.trace.nodes.items()}
        return float(loss), params

    def _store_tensors(self, store: Any, names: tuple[str, ...]) -> list[Tensor]:
        return [store._params[name] for name in names]

    def _trace(self, key: Any, names: tuple[str, ...], model: Callable, guide: Callable, leaves: list[Any],
               spec: Any) -> tuple[float, dict[str, Tensor]]:
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
            with _tracing_step(), pyro.validation_enabled(False):
                loss = self.objective.loss_and_grads(model, guide, *args, **kwargs)
            grads = [p.grad for p in tensors[len(tensor_slots):]]
            for p in tensors[len(tensor_slots):]:
                p.grad = None
            if not isinstance(loss, Tensor):
                raise _Untraceable(f"loss_and_grads returned {type(loss).__name__}, not the loss tensor")
            outputs[:] = [loss.detach(), grads]
            return loss.detach(), grads

        from torch.fx.experimental.proxy_tensor import make_fx

        inputs = [leaves[i] for i in tensor_slots] + params
        devices = _rng_devices(inputs)
        before = _rng_state(devices)
        try:
            module = make_fx(step, tracing_mode="real")(*inputs)
        except Exception as error:  # noqa: BLE001 - any failure to trace means: stay eager
            _set_rng_state(before, devices)
            for p in params:
                p.grad = None
            self._give_up(key, _reason(error))
            return self._eager(model, guide, *pytree.tree_unflatten(leaves, spec))
        self.stats.traced += 1
        if self.optimize:
            optimize_graph(module)
        graph = _Graph(module, names)
        self._drop(key, graph)
        # The trace ran Pyro's step for real: its outputs are this call's result.
        loss, grads = outputs
        for param, grad in zip(params, grads):
            param.grad = grad
        return float(loss), dict(zip(names, params))

    def _compile(self, graph: _Graph, leaves: list[Any], store: Any) -> Optional[Callable[..., Any]]:
        """The graph compiled by Inductor, with torch's own random kernels (``fallback_random``:
        the same draws as the eager step), or ``None`` if compiling fails or the graph writes
        into a tensor it did not create (left to the op-by-op replay)."""
        if _mutates_inputs(graph.module):
            self.stats.failures.append("not compiled: the step writes into tensors it did not create")
            return None
        import torch._inductor.config as inductor_config

        compiled = torch.compile(graph.module, backend="inductor", dynamic=False, fullgraph=True)
        tensors = [leaf for leaf in leaves if isinstance(leaf, Tensor)]
        devices = _rng_devices(tensors)
        state = _rng_state(devices)
        try:
            with inductor_config.patch(fallback_random=True), torch.no_grad():
                compiled(*tensors, *self._store_tensors(store, graph.param_names))
        except Exception as error:  # noqa: BLE001 - no compiler, an unsupported op, ...: replay instead
            self.stats.failures.append(f"not compiled ({_reason(error)}); replaying op by op")
            logger.warning("pyrovae: compiling the step failed (%s); it is replayed op by op", _reason(error))
            return None
        finally:
            _set_rng_state(state, devices)
        return compiled

    def _give_up(self, key: Any, reason: str) -> None:
        self._drop(key, None)
        self.stats.failures.append(reason)
        logger.info("pyrovae: the step of %s stays eager (%s)", type(self.objective).__name__, reason)

    def _drop(self, key: Any, graph: Optional[_Graph]) -> None:
        self._graphs[key] = graph
        while len(self._graphs) > self.max_graphs:
            self._graphs.pop(next(iter(self._graphs)))

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

    def _verify(self, key: Any, graph: _Graph, model: Callable, guide: Callable, args: tuple, kwargs: dict,
                leaves: list[Any], store: Any) -> tuple[float, dict[str, Tensor]]:
        if self.backend == "inductor" and graph.compiled is None:
            graph.compiled = self._compile(graph, leaves, store)
        devices = _rng_devices([leaf for leaf in leaves if isinstance(leaf, Tensor)])
        before = _rng_state(devices)
        loss, params = self._eager(model, guide, args, kwargs)
        self.stats.eager -= 1
        after = _rng_state(devices)
        grads = {name: p.grad for name, p in params.items()}
        for p in params.values():
            p.grad = None
        _set_rng_state(before, devices)
        replay_loss, replay_params, replay_grads = self._run(graph, leaves, store)
        replayed = {name: g for name, g in zip(replay_params, replay_grads) if g is not None}
        problem = _disagreement(loss, grads, replay_loss.item(), replayed,
                                after, _rng_state(devices), self.rtol)
        _set_rng_state(after, devices)
        for name, p in params.items():
            p.grad = grads[name]
        if problem is None:
            graph.verified = True
            self.stats.verified += 1
        else:
            self._graphs[key] = None
            self.stats.failures.append(problem)
            logger.warning("pyrovae: the traced step of %s disagreed with the eager step (%s); it stays eager",
                           type(self.objective).__name__, problem)
        return loss, params


class _Untraceable(RuntimeError):
    pass


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "_local_scalar_dense" in text or "data-dependent" in text:
        text = "it reads a tensor's value into Python (.item(), bool() or a data-dependent branch)"
    return f"{type(error).__name__}: {text}"[:300]


def _disagreement(loss: float, grads: dict[str, Optional[Tensor]], replay_loss: float,
                  replay_grads: dict[str, Tensor], rng: tuple[Tensor, ...], replay_rng: tuple[Tensor, ...],
                  rtol: float) -> Optional[str]:
    """Why the replay is not the eager step, or ``None`` if it is (within ``rtol``)."""
    if not all(torch.equal(a, b) for a, b in zip(rng, replay_rng)):
        return "it drew a different number of random values"
    if not math.isclose(loss, replay_loss, rel_tol=rtol, abs_tol=1e-6) and not (math.isnan(loss) and math.isnan(replay_loss)):
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


# ------------------------------------------------------------------------------------------------
# Graph rewrites
def optimize_graph(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite a traced step for speed, leaving its results equal to within float rounding.

    - ``softplus`` and its backward by ``exp``/``log`` formulas that torch vectorizes on the CPU
      (its own softplus kernel is several times slower per element there), with softplus's
      threshold kept: ``x`` where ``βx > threshold``.
    - Dead code removed.
    """
    graph = module.graph
    aten = torch.ops.aten
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.softplus.default and _on_cpu(node):
            with graph.inserting_before(node):
                new = graph.call_function(_fast_softplus, node.args, node.kwargs)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
        elif node.target is aten.softplus_backward.default and _on_cpu(node):
            with graph.inserting_before(node):
                new = graph.call_function(_fast_softplus_backward, node.args, node.kwargs)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
    graph.eliminate_dead_code()
    module.recompile()
    return module


def _mutates_inputs(module: torch.fx.GraphModule) -> bool:
    """Whether an op of the graph writes into a placeholder or a captured constant."""
    for node in module.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None or not schema.is_mutable:
            continue
        for argument, value in zip(schema.arguments, node.args):
            if argument.alias_info is not None and argument.alias_info.is_write:
                if isinstance(value, torch.fx.Node) and value.op in ("placeholder", "get_attr"):
                    return True
    return False


def _on_cpu(node: torch.fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, Tensor) and value.device.type == "cpu"


def _fast_softplus(x: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    # softplus(x) = log(1 + exp(βx)) / β = (max(βx, 0) + log(1 + exp(-|βx|))) / β, and x above the
    # threshold, as torch.nn.functional.softplus.
    bx = x if beta == 1.0 else x * beta
    out = bx.abs().neg_().exp_().add_(1).log_().add_(bx.clamp(min=0))
    if beta != 1.0:
        out.div_(beta)
    return torch.where(bx > threshold, x, out)


def _fast_softplus_backward(grad: Tensor, x: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    bx = x if beta == 1.0 else x * beta
    return torch.where(bx > threshold, grad, grad * torch.sigmoid(bx))


class ReplayedELBO(ELBO):
    """A ``pyro.infer.ELBO`` whose ``loss_and_grads`` is :class:`LossAndGradsReplay` of another:
    ``SVI(model, guide, optim, loss=ReplayedELBO(Trace_ELBO()))``.

    ``loss`` and ``differentiable_loss`` are the wrapped objective's. After a replayed
    ``loss_and_grads`` the step's params are announced to Pyro (one ``pyro.param`` call each), so
    that ``SVI.step`` finds and steps them as usual.

    :param objective: the objective to replay.
    :param kwargs: passed to :class:`LossAndGradsReplay`.
    """

    def __init__(self, objective: ELBO, **kwargs: Any) -> None:
        super().__init__(num_particles=objective.num_particles,
                         max_plate_nesting=objective.max_plate_nesting,
                         vectorize_particles=objective.vectorize_particles)
        self.objective = objective
        self.replay = LossAndGradsReplay(objective, **kwargs)

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        return self.objective.loss(model, guide, *args, **kwargs)

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> Tensor:
        return self.objective.differentiable_loss(model, guide, *args, **kwargs)

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        loss, params = self.replay(model, guide, *args, **kwargs)
        for name in params:
            pyro.param(name)
        return loss

