"""One SVI step, opened up: gradients, then (across processes) their all-reduce, a finiteness
check, optional clipping, then the optimizer.

``pyro.infer.SVI.step`` is ``loss_and_grads`` followed at once by the optimizer. Data-parallel
training needs the gradients summed across processes in between, and a run that must never write
NaNs into its parameters needs to look at them before the update; :class:`GradientStep` is that
step with the gap. In one process without clipping it makes exactly the update ``SVI.step`` makes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional, Union

import torch
from pyro.optim import PyroOptim

from pyrovae.infer.loop import StepResult
from pyrovae.infer.replay import LossAndGradsReplay, choose_backend
from pyrovae.protocols import Objective
from pyrovae.runtime.distributed import World, all_reduce_sum_

__all__ = ["GradientStep", "StepResult"]


class GradientStep:
    """``loss_and_grads`` → all-reduce → finiteness check → clip → optimizer step → zero grads.

    **Data parallel.** Each process passes its slice ``index`` of the global batch
    ``batch_index`` (the data plate scales its loss by ``N / |slice|``). Gradients are multiplied by
    ``|slice| / |batch|`` and summed over processes, which gives exactly the gradient of the global
    batch's loss (scale ``N / |batch|``) for any split of the batch. Network weights and other global
    parameters are reduced whole. Per-datapoint parameters (``local_params``, shape ``(N, ...)``)
    have non-zero gradient only in the rows of the batch, so only those rows are reduced and written
    back: every process then holds the same table and makes the same lazy update
    (:class:`pyrovae.infer.optim.LazyAdam` moves exactly the batch's rows). One collective per dtype per
    step carries the gradients, the loss and the stop flag.

    **Clipping.** With ``clip_norm``, gradients are rescaled by
    ``torch.nn.utils.clip_grad_norm_`` over every parameter of the step, after the reduction (so
    every process clips alike). Rescaling by one positive factor keeps zero rows zero, so lazy rows
    stay untouched.

    :param local_params: names of per-datapoint parameters (e.g. ``guide.local_param_names``).
    :param clip_norm: maximum global L2 norm of the gradient, or ``None``.
    :param world: the process group (one process by default).
    :param fast_path: trace ``objective.loss_and_grads`` once per structure and replay the traced
        graph (:class:`pyrovae.infer.replay.LossAndGradsReplay`: the same loss and gradients,
        checked against the eager step on its first replay): ``True`` or ``"replay"``, or
        ``"inductor"`` to compile the graph; ``False`` or ``"eager"`` runs Pyro's code every step.
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        objective: Objective,
        optimizer: PyroOptim,
        *,
        local_params: frozenset[str] = frozenset(),
        clip_norm: Optional[float] = None,
        world: World = World(),
        fast_path: Union[bool, str] = True,
    ) -> None:
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be positive (or None for no clipping), got {clip_norm}")
        self.model = model
        self.guide = guide
        self.objective = objective
        self.optimizer = optimizer
        self.local_params = frozenset(local_params)
        self.clip_norm = clip_norm
        self.world = world
        self.loss_and_grads = LossAndGradsReplay(objective, backend=choose_backend(fast_path))

    def __call__(
        self,
        x: torch.Tensor,
        index: torch.Tensor,
        num_data: int,
        *,
        batch_index: Optional[torch.Tensor] = None,
        weight: Optional[float] = None,
        stop: bool = False,
    ) -> StepResult:
        """Take one step on this process's slice ``(x, index)`` of the batch ``batch_index``.

        :param weight: this slice's share of the batch, ``len(index) / len(batch_index)`` by
            default; pass 0 for a stand-in slice when a process has no points in this batch.
        :param stop: this process asks to stop after the step.
        """
        batch_index = index if batch_index is None else batch_index
        weight = len(index) / len(batch_index) if weight is None else weight
        loss, params = self.loss_and_grads(self.model, self.guide, x, index, num_data=num_data)
        # Frozen params (requires_grad off, e.g. by pyrovae.infer.local.frozen_params) are not stepped: a
        # zero gradient would still move them by Adam's momentum.
        params = {name: param for name, param in params.items() if param.requires_grad}
        names = sorted(params)  # the same order in every process
        grads = []
        for name in names:
            param = params[name]
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            if name in self.local_params:
                grads.append(param.grad.index_select(0, batch_index))
            else:
                grads.append(param.grad)

        if self.world.is_distributed:
            scalars = torch.tensor([loss * weight, float(stop)], dtype=torch.float64, device=x.device)
            for grad in grads:
                grad.mul_(weight)
            all_reduce_sum_(grads + [scalars], self.world)
            for name, grad in zip(names, grads):
                if name in self.local_params:
                    full_grad = params[name].grad
                    assert full_grad is not None  # every param was given a gradient above
                    full_grad.zero_().index_copy_(0, batch_index, grad)
            loss, stop = scalars[0].item(), bool(scalars[1].item() > 0)

        problem = None
        # One L2 norm per tensor by a single foreach kernel (a per-tensor isfinite loop costs
        # ~1.5 ms a step on a CPU); a norm is non-finite if the gradient holds an inf or a NaN, or
        # if it overflowed, which the exact check below tells apart. Their norm is the step's
        # gradient norm (what clip_grad_norm_ would compute), left on the device.
        norms = torch.stack(torch._foreach_norm(grads)) if grads and math.isfinite(loss) else None
        if not math.isfinite(loss):
            problem = f"the loss became {loss}"
        elif norms is not None and not bool(norms.isfinite().all()):
            bad = [name for name, grad in zip(names, grads) if not torch.isfinite(grad).all()]
            if bad:
                problem = f"the gradient of {', '.join(bad)} became non-finite (the loss was {loss:.6g})"
        if problem is None:
            if self.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_([params[name] for name in names], self.clip_norm)
            self.optimizer(params.values())
        for param in params.values():
            param.grad = None  # as optimizer.zero_grad(set_to_none=True): no zero-filled copies
        grad_norm = None if norms is None else torch.linalg.vector_norm(norms)
        return StepResult(loss, stop, problem, grad_norm)
