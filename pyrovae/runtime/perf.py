"""Process-level speed settings for CPU training and evaluation.

**Why.** A VAE step on the CPU allocates and frees tensors of tens of megabytes (a K=50 IWAE batch
of 100 MNIST images has 3.9 M logits, 16 MB). glibc's ``malloc`` serves blocks above its mmap
threshold with fresh ``mmap`` calls and returns them to the kernel on ``free``, so every such
tensor pays for page faults on first touch: in a profile of pyrovae's K=5000 evaluation that was
215 M minor page faults and a third of the time. :func:`tune_malloc` raises the mmap threshold to
glibc's maximum (32 MiB) and keeps freed memory in the heap, so those blocks are reused instead.
It changes no result, only speed (the IWAE K=50 step of ``benchmarks/speed.py`` went from 98 to
65 ms on 2 cores). It is a process-wide setting, so the library never calls it on import: the
``pyrovae`` command line, the benchmarks and the experiments call it; a user's own script may.

The same effect without code: ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=68719476736``
in the environment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import subprocess
import sys
from typing import Any

import pyro
import torch

logger = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

#: glibc's largest allowed mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX).
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024

_tuned = False


def tune_malloc(
    mmap_threshold: int = MMAP_THRESHOLD_MAX, trim_threshold: int = 64 * 2**30, top_pad: int = 256 * 2**20
) -> bool:
    """Make glibc ``malloc`` keep and reuse large freed blocks (see the module docstring).

    Does nothing (returns ``False``) off Linux/glibc, when ``PYROVAE_NO_MALLOC_TUNING`` is set, or
    when glibc refuses a value. Calling it again is harmless.

    :param mmap_threshold: blocks at least this large come from ``mmap`` (glibc caps it at 32 MiB).
    :param trim_threshold: free memory at the top of the heap kept rather than returned.
    :param top_pad: extra memory requested from the kernel each time the heap grows.
    :return: whether the settings were applied.
    """
    global _tuned
    if _tuned:
        return True
    if os.environ.get("PYROVAE_NO_MALLOC_TUNING") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    clamp = lambda value: min(int(value), 2**31 - 1)  # noqa: E731 - mallopt takes an int
    ok = all(
        mallopt(param, clamp(value)) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, mmap_threshold),
            (_M_TRIM_THRESHOLD, trim_threshold),
            (_M_TOP_PAD, top_pad),
        )
    )
    if not ok:
        logger.debug("glibc refused a mallopt setting; malloc left as it was")
    _tuned = ok
    return ok


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What a benchmark or long run was measured on: platform, CPU, torch build and threads."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "blas": "MKL" if torch.backends.mkl.is_available() else "other",
        "device": str(device),
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        info["cpu"] = next(
            line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")
        )
    except (OSError, StopIteration, subprocess.SubprocessError):
        info["cpu"] = platform.processor() or platform.machine()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
