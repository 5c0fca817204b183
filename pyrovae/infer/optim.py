"""Adam with lazy, per-row updates for per-datapoint variational parameters.

A per-datapoint (non-amortized) guide keeps one row of variational parameters per data point, a
parameter of shape ``(N, d)``, and a minibatch touches only the rows of its points. Plain Adam
would still move every other row, because its first-moment estimate keeps pushing a row long after
the row's gradient went to zero; and a row that is updated once per epoch would get the bias
correction of the global step count. :class:`LazyAdam` updates, in a parameter group marked
``lazy=True``, only the rows whose gradient is not entirely zero, together with their moment
estimates, and counts steps per row for the bias correction, so each row follows the trajectory
plain Adam would give it if it were optimized alone on its own minibatch visits.

**References**

- D. P. Kingma, J. Ba, *Adam: A method for stochastic optimization* (ICLR 2015).
- The "lazy" sparse variant follows TensorFlow's ``LazyAdamOptimizer`` (TensorFlow Addons), but
  keeps a step count per row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Union, cast

import pyro
import torch
from pyro.optim import PyroOptim
from torch import Tensor

__all__ = ["FusedPyroOptim", "LazyAdam", "make_pyro_optimizer"]

Params = Union[Iterable[Tensor], Iterable[dict[str, Any]]]


class LazyAdam(torch.optim.Optimizer):
    r"""Adam, with optional row-wise lazy updates and a per-step learning-rate decay.

    For a parameter with gradient :math:`g_t`, at its :math:`t`-th step (:math:`t = 1, 2, \dots`):

    .. math::
        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \\
        \theta_t = \theta_{t-1} - \frac{\eta\, \gamma^{k}}{1 - \beta_1^t}
            \frac{m_t}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon}

    where :math:`\gamma` is ``lr_decay`` and :math:`k = 0, 1, \dots` counts the group's earlier
    steps. Non-lazy groups are exactly :class:`torch.optim.Adam` (with ``lr_decay=1``).

    In a group with ``lazy=True`` the first dimension of each parameter indexes rows (data points).
    A step updates only the rows whose gradient has a non-zero entry — their values, their
    :math:`m` and :math:`v` rows, and their own step count :math:`t` used in the bias correction —
    and leaves every other row, and its state, exactly as it was.

    :param params: parameters or parameter groups (dicts that may override any option below).
    :param lr: learning rate :math:`\eta`.
    :param betas: :math:`(\beta_1, \beta_2)`, decay rates of the moment estimates.
    :param eps: :math:`\epsilon`, added to the denominator for numerical stability.
    :param lr_decay: :math:`\gamma`, multiplicative learning-rate decay per step; 1 means none.
    :param lazy: update only the rows with non-zero gradient (for per-datapoint parameters of
        shape ``(N, ...)``).
    """

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        lr_decay: float = 1.0,
        lazy: bool = False,
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, lr_decay=lr_decay, lazy=lazy)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group after checking its options (see :class:`LazyAdam`)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_options(group)
        group.setdefault("num_steps", 0)
        if group["lazy"]:
            for param in group["params"]:
                if param.dim() == 0:
                    raise ValueError(
                        "lazy=True needs parameters whose first dimension indexes data points, shape "
                        "(num_data, ...); got a scalar parameter. Put it in a group with lazy=False."
                    )

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]  # torch's overloaded stub: closures return float (loss closures return a Tensor)
        """Take one optimization step.

        :param closure: re-evaluates the model and returns the loss (optional).
        :returns: the closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            params = [param for param in group["params"] if param.grad is not None]
            if not params:
                continue
            lr = group["lr"] * group["lr_decay"] ** group["num_steps"]
            group["num_steps"] += 1
            for param in params:
                if param.grad.is_sparse:
                    raise ValueError(
                        "LazyAdam takes dense gradients; for sparse embeddings use torch.optim.SparseAdam."
                    )
                if group["lazy"]:
                    self._lazy_update(param, group, lr)
                else:
                    self._dense_update(param, group, lr)
        return loss

    def _init_state(self, param: Tensor, step_shape: tuple[int, ...]) -> dict[str, Tensor]:
        state = self.state[param]
        if not state:
            # Steps are float32 tensors, as in torch.optim.Adam, so state dicts look alike and
            # Optimizer.load_state_dict leaves them alone (it only casts non-"step" entries).
            # A dense parameter's step count lives on the CPU (as in torch.optim.Adam), so reading
            # it for the bias correction never waits for a GPU.
            device = param.device if step_shape else torch.device("cpu")
            state["step"] = torch.zeros(step_shape, dtype=torch.float32, device=device)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    def _dense_update(self, param: Tensor, group: dict[str, Any], lr: float) -> None:
        state = self._init_state(param, ())
        state["step"] += 1
        grad = param.grad
        assert grad is not None  # step() updates only parameters with a gradient
        _adam_update(
            [param],
            [grad],
            [state["exp_avg"]],
            [state["exp_avg_sq"]],
            [state["step"]],
            lr,
            tuple(group["betas"]),
            group["eps"],
        )

    @staticmethod
    @torch.no_grad()
    def fused_dense_step(pairs: list[tuple[LazyAdam, Tensor]]) -> None:
        """One dense Adam step of many single-parameter optimizers at once.

        Each ``(optimizer, param)`` pair is a :class:`LazyAdam` holding only ``param`` in one
        non-lazy group. The result is exactly that of calling every optimizer's :meth:`step`
        (the same ops in the same order, per tensor), with ``torch._foreach_*`` kernels instead of
        a Python loop. Parameters without a gradient are skipped, as by :meth:`step`.
        """
        buckets: dict[tuple[Any, ...], list[tuple[Tensor, dict[str, Any]]]] = {}
        for optimizer, param in pairs:
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise ValueError("LazyAdam takes dense gradients; for sparse embeddings use torch.optim.SparseAdam.")
            (group,) = optimizer.param_groups
            if group["lazy"] or len(group["params"]) != 1 or group["params"][0] is not param:
                raise ValueError("fused_dense_step takes single-parameter, non-lazy LazyAdam optimizers")
            lr = group["lr"] * group["lr_decay"] ** group["num_steps"]
            group["num_steps"] += 1
            state = optimizer._init_state(param, ())
            state["step"] += 1
            key = (tuple(group["betas"]), group["eps"], param.device, param.dtype, lr)
            buckets.setdefault(key, []).append((param, state))
        for (betas, eps, _, _, lr), items in buckets.items():
            params = [param for param, _ in items]
            _adam_update(
                params,
                [cast(Tensor, param.grad) for param in params],  # only parameters with a gradient were bucketed
                [state["exp_avg"] for _, state in items],
                [state["exp_avg_sq"] for _, state in items],
                [state["step"] for _, state in items],
                lr,
                betas,
                eps,
            )

    def _lazy_update(self, param: Tensor, group: dict[str, Any], lr: float) -> None:
        beta1, beta2 = group["betas"]
        num_rows = param.shape[0]
        state = self._init_state(param, (num_rows,))
        grad = param.grad
        assert grad is not None  # step() updates only parameters with a gradient
        rows = grad.reshape(num_rows, -1).ne(0).any(dim=1).nonzero().squeeze(1)
        if rows.numel() == 0:
            return

        grad_rows = grad.index_select(0, rows)
        exp_avg = state["exp_avg"].index_select(0, rows)
        exp_avg_sq = state["exp_avg_sq"].index_select(0, rows)
        step = state["step"].index_select(0, rows) + 1

        exp_avg.lerp_(grad_rows, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad_rows, grad_rows, value=1 - beta2)
        # Bias corrections in float64: 1 - beta2**t loses most of its digits in float32 when t is small.
        step64 = step.double()
        bias_correction1 = 1 - torch.pow(beta1, step64)
        bias_correction2_sqrt = (1 - torch.pow(beta2, step64)).sqrt()
        row_shape = (-1,) + (1,) * (param.dim() - 1)
        step_size = (lr / bias_correction1).to(param.dtype).reshape(row_shape)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt.to(param.dtype).reshape(row_shape)).add_(group["eps"])
        new_rows = param.index_select(0, rows) - step_size * exp_avg / denom

        param.index_copy_(0, rows, new_rows)
        state["exp_avg"].index_copy_(0, rows, exp_avg)
        state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
        state["step"].index_copy_(0, rows, step)


def _adam_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    lr: float,
    betas: tuple[float, float],
    eps: float,
) -> None:
    """One Adam update of tensors of one device and dtype whose step counts are already
    incremented: torch's fused Adam kernel on the CPU (one pass over each tensor, what
    ``torch.optim.Adam(fused=True)`` runs), ``torch._foreach_*`` kernels elsewhere (the arithmetic of
    ``torch.optim.Adam``'s foreach path, with the step counts kept on the CPU)."""
    beta1, beta2 = betas
    if params[0].device.type == "cpu":
        torch._fused_adam_(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=0.0,
            eps=eps,
            amsgrad=False,
            maximize=False,
        )
        return
    counts = [float(step) for step in steps]
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, [(1 - beta2**count) ** 0.5 for count in counts])
    torch._foreach_add_(denoms, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denoms, [-lr / (1 - beta1**count) for count in counts])


def _check_options(group: dict[str, Any]) -> None:
    if not group["lr"] > 0:
        raise ValueError(f"lr must be positive, got {group['lr']}; pass e.g. lr=1e-3.")
    beta1, beta2 = group["betas"]
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"betas must lie in [0, 1), got {group['betas']}; the usual are (0.9, 0.999).")
    if not group["eps"] >= 0:
        raise ValueError(f"eps must be non-negative, got {group['eps']}; the usual is 1e-8.")
    if not group["lr_decay"] > 0:
        raise ValueError(
            f"lr_decay must be positive, got {group['lr_decay']}; use 1.0 for no decay or e.g. "
            f"0.9999 to shrink the learning rate by 0.01% per step."
        )


def make_pyro_optimizer(
    lr: float,
    lr_decay: float = 1.0,
    lazy_params: Callable[[str], bool] | set[str] | frozenset[str] = frozenset(),
    betas: tuple[float, float] = (0.9, 0.999),
) -> PyroOptim:
    """Wrap :class:`LazyAdam` for :class:`pyro.infer.SVI`, lazy for the named per-datapoint params.

    Pyro creates one optimizer per parameter; each gets ``lazy=True`` when its name is in
    ``lazy_params`` (or ``lazy_params(name)`` is true), e.g. the ``(N, d)`` locations and scales of
    a per-datapoint guide, and ``lazy=False`` (plain Adam) otherwise, e.g. network weights.
    ``get_state()`` / ``set_state()`` of the result round-trip through checkpoints.

    :param lr: learning rate.
    :param lr_decay: multiplicative learning-rate decay per step; 1 means none.
    :param lazy_params: names of the per-datapoint parameters (as passed to ``pyro.param``), or a
        predicate on the name.
    :param betas: Adam's moment decay rates.
    """
    if isinstance(lazy_params, str):
        raise ValueError(
            f"lazy_params must be a set of parameter names, got the string {lazy_params!r}; pass {{{lazy_params!r}}}."
        )
    if callable(lazy_params):
        is_lazy = lazy_params
    else:
        is_lazy = frozenset(lazy_params).__contains__
    # Fail on bad options now rather than at the first SVI step.
    _check_options(dict(lr=lr, betas=tuple(betas), eps=1e-8, lr_decay=lr_decay))

    # A one-argument callable: Pyro passes the parameter's name (two-argument callables get the
    # deprecated (module_name, param_name) split instead).
    def optim_args(param_name: str) -> dict[str, Any]:
        return dict(lr=lr, betas=tuple(betas), lr_decay=lr_decay, lazy=bool(is_lazy(param_name)))

    return FusedPyroOptim(LazyAdam, optim_args)


class FusedPyroOptim(PyroOptim):
    """:class:`pyro.optim.PyroOptim` whose step updates all dense (non-lazy) parameters at once.

    Pyro keeps one optimizer per parameter and steps them one by one; for a VAE that is a dozen
    tiny Adam steps, each a handful of tensor ops, which costs ~2 ms per SVI step on a CPU (as much
    as the network itself at batch 32). Here each parameter still has its own :class:`LazyAdam`
    (created, named and checkpointed exactly as by ``PyroOptim``, so ``get_state``/``set_state``
    and old checkpoints are unchanged), but the dense ones are updated together by
    :meth:`LazyAdam.fused_dense_step` with ``torch._foreach_*`` ops, the same arithmetic in the
    same order, so the parameters are bit-for-bit those of stepping each optimizer alone.
    Lazy (per-datapoint) parameters take their own row-wise step.
    """

    def __call__(self, params: Iterable[Tensor], *args: Any, **kwargs: Any) -> None:
        if args or kwargs:
            raise ValueError("FusedPyroOptim takes no closure or step arguments")
        dense: list[tuple[LazyAdam, Tensor]] = []
        for p in params:
            if p not in self.optim_objs:
                optimizer = self.optim_objs[p] = self._get_optim(p)
                self.grad_clip[p] = self._get_grad_clip(p)  # type: ignore[arg-type]  # Pyro's stub says str; Pyro itself passes the param tensor
                param_name = pyro.get_param_store().param_name(p)
                state = self._state_waiting_to_be_consumed.pop(param_name, None)
                if state is not None:
                    optimizer.load_state_dict(state)
            if self.grad_clip[p] is not None:
                self.grad_clip[p](p)
            optimizer = self.optim_objs[p]
            if optimizer.param_groups[0]["lazy"]:
                optimizer.step()
            elif p.grad is not None:
                dense.append((optimizer, p))
        LazyAdam.fused_dense_step(dense)
