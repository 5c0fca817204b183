"""Rewrites of a traced training step (:mod:`pyrovae.infer.replay`).

:func:`simplify` is exact: the rewritten graph computes every value with the same kernel on the
same inputs as before, so the results are the same bits; it only runs fewer operations (each costs
a few microseconds of dispatch in a replay, which at the batch sizes VAEs train with is a good
part of a step). :func:`fast_kernels` is not: it swaps slow CPU kernels for faster formulas that
agree to rounding.

The graphs are those of ``make_fx``: ATen ops, some in place (``add_``, ``normal_``), with views.
Two rules keep :func:`simplify` exact in their presence:

- a value that is written in place anywhere in the graph, or shares memory with one that is
  (views and their bases), is never merged, folded or bypassed;
- captured tensors (``get_attr``) are read live at every replay: only tensors the step creates
  itself (factory ops, literals lifted by ``lift_fresh_copy``) are folded into constants.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch.fx import GraphModule, Node

__all__ = ["fast_kernels", "simplify"]

aten = torch.ops.aten

#: Factory ops whose result depends only on their arguments (not on a random generator or on
#: uninitialised memory).
_FACTORIES = {
    aten.zeros.default,
    aten.ones.default,
    aten.full.default,
    aten.scalar_tensor.default,
    aten.arange.default,
    aten.arange.start,
    aten.arange.start_step,
    aten.lift_fresh_copy.default,
}

#: View ops that return their input unchanged when asked for its own shape.
_SAME_SHAPE_VIEWS = {aten.view.default, aten.expand.default, aten.reshape.default, aten._unsafe_view.default}


def _schema(node: Node) -> Optional[torch.FunctionSchema]:
    target = node.target
    return target._schema if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) else None


def _is_pure(node: Node) -> bool:
    """A deterministic function of its arguments that writes nothing."""
    schema = _schema(node)
    if schema is None or schema.is_mutable:
        return False
    tags = node.target.tags  # type: ignore[union-attr]
    if torch.Tag.nondeterministic_seeded in tags or torch.Tag.nondeterministic_bitwise in tags:
        return False
    name = node.target.name()  # type: ignore[union-attr]
    return "empty" not in name and "rand" not in name and "normal" not in name and "bernoulli" not in name


def _aliased_args(node: Node) -> list[Node]:
    """The inputs whose memory the node's output may share (views)."""
    schema = _schema(node)
    if schema is None or not any(r.alias_info is not None for r in schema.returns):
        return []
    return [
        value
        for argument, value in zip(schema.arguments, node.args)
        if argument.alias_info is not None and isinstance(value, Node)
    ]


def _written(graph: torch.fx.Graph) -> set[Node]:
    """Every node written in place, with everything that shares its memory (views, bases, and
    the outputs of the in-place ops, which alias their input)."""
    parent: dict[Node, Node] = {}

    def find(n: Node) -> Node:
        while parent.get(n, n) is not n:
            n = parent[n]
        return n

    written = []
    for node in graph.nodes:
        for base in _aliased_args(node):
            parent[find(node)] = find(base)
        schema = _schema(node)
        if schema is not None and schema.is_mutable:
            for argument, value in zip(schema.arguments, node.args):
                if argument.alias_info is not None and argument.alias_info.is_write and isinstance(value, Node):
                    written.append(value)
    roots = {find(n) for n in written}
    return {n for n in graph.nodes if find(n) in roots}


def simplify(module: GraphModule) -> GraphModule:
    """Exact simplifications: dead code, repeated pure computations (common subexpressions),
    computations on constants the step creates (folded once, by the same kernels), ``alias``,
    ``t(t(x))`` and same-shape views of ``x``."""
    graph = module.graph
    graph.eliminate_dead_code()
    written = _written(graph)
    constants: dict[Node, Any] = {}
    seen: dict[tuple[Any, ...], Node] = {}
    counter = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node in written:
            continue
        args_written = any(isinstance(a, Node) and a in written for a in pytree.tree_leaves((node.args, node.kwargs)))
        if args_written:
            continue
        target = node.target
        # Views that change nothing, and transposes of transposes.
        if target is aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            continue
        if target is aten.t.default and isinstance(node.args[0], Node) and node.args[0].target is aten.t.default:
            node.replace_all_uses_with(node.args[0].args[0])
            continue
        if target in _SAME_SHAPE_VIEWS and _same_shape(node, node.args[0]):
            node.replace_all_uses_with(node.args[0])
            continue
        # Constants the step makes itself: evaluate once (not a graph output: the caller may
        # write into what it gets).
        tensor_args = [a for a in pytree.tree_leaves((node.args, node.kwargs)) if isinstance(a, Node)]
        lifted = target is aten.lift_fresh_copy.default and _is_attr(node.args[0])
        foldable = lifted or (
            target is not aten.lift_fresh_copy.default
            and (target in _FACTORIES or _is_pure(node))
            and all(a in constants for a in tensor_args)
        )
        if foldable and not any(user.op == "output" for user in node.users):
            if lifted:
                value = getattr(module, node.args[0].target).clone()
            else:
                args, kwargs = pytree.tree_map(
                    lambda a: constants[a] if isinstance(a, Node) else a, (node.args, node.kwargs)
                )
                value = target(*args, **kwargs)
            if isinstance(value, Tensor):
                name = f"_folded_{counter}"
                counter += 1
                module.register_buffer(name, value, persistent=False)
                with graph.inserting_before(node):
                    folded = graph.get_attr(name)
                folded.meta = dict(node.meta)
                node.replace_all_uses_with(folded)
                constants[folded] = value
                continue
        # The same pure op on the same inputs: one computation.
        if _is_pure(node):
            key = (target, _hashable(node.args), _hashable(node.kwargs))
            if key in seen:
                node.replace_all_uses_with(seen[key])
                continue
            seen[key] = node
    graph.eliminate_dead_code()
    graph.lint()
    module.recompile()
    return module


def _is_attr(node: Any) -> bool:
    return isinstance(node, Node) and node.op == "get_attr"


def _same_shape(node: Node, source: Any) -> bool:
    if not isinstance(source, Node):
        return False
    out, inp = node.meta.get("val"), source.meta.get("val")
    return (
        isinstance(out, Tensor)
        and isinstance(inp, Tensor)
        and out.shape == inp.shape
        and out.stride() == inp.stride()
        and out.dtype == inp.dtype
    )


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return (type(value).__name__, str(value))
    if isinstance(value, float):
        return ("float", "nan") if math.isnan(value) else ("float", value.hex())
    return value


# ------------------------------------------------------------------------------------------------
def fast_kernels(module: GraphModule) -> GraphModule:
    """Swap slow CPU kernels for faster formulas; results agree to rounding, not bit for bit.

    ``softplus`` and its backward become ``exp``/``log`` and ``sigmoid`` formulas that torch
    vectorizes on the CPU (its own softplus kernel is several times slower per element there),
    with softplus's threshold kept: ``x`` where ``βx > threshold``.
    """
    graph = module.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or not _on_cpu(node):
            continue
        replacements: dict[Any, Callable[..., Tensor]] = {
            aten.softplus.default: _fast_softplus,
            aten.softplus_backward.default: _fast_softplus_backward,
        }
        replacement = replacements.get(node.target)
        if replacement is not None:
            with graph.inserting_before(node):
                new = graph.call_function(replacement, node.args, node.kwargs)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
    graph.eliminate_dead_code()
    module.recompile()
    return module


def _on_cpu(node: Node) -> bool:
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
