"""Where the time of one training step goes: torch.profiler's self CPU time per ATen op, per step.

Used by ``experiments/benchmark_speed.py --parts profile`` to say why a step is as slow as it is
(e.g. torch's CPU softplus kernel on the Pyro-tutorial network, Pyro's per-step Python) with
numbers from a JSON, not from memory.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from torch.profiler import ProfilerActivity, profile

__all__ = ["op_profile"]


def op_profile(step: Callable[[], Any], steps: int = 50, warmup: int = 5, top: Optional[int] = None) -> dict[str, Any]:
    """Profile ``steps`` calls of ``step``.

    :return: ``{"ms_per_step": wall-clock per step (profiler on), "ops": [{"name", "calls_per_step",
        "self_ms_per_step"}, ...] (largest first; the ``top`` largest, all by default: which ops
        rank first depends on the machine's load, which ops run does not), "aten_ms_per_step": self time of all ATen
        ops, "other_ms_per_step": the rest of the wall-clock (Python, dispatch, the profiler)}``.
    """
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    wall_ms = 1e3 * (time.perf_counter() - start) / steps
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    aten_ms = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    ops = [{"name": e.key, "calls_per_step": e.count / steps, "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps}
           for e in events[:top]]
    return {"ms_per_step": wall_ms, "ops": ops, "aten_ms_per_step": aten_ms,
            "other_ms_per_step": max(wall_ms - aten_ms, 0.0), "steps": steps}
