"""Keep freed host memory in the process, so a CPU training step reuses its buffers.

glibc's malloc hands large freed blocks back to the kernel (each one over the mmap threshold is
unmapped on free, and a heap whose free top outgrows the trim threshold is cut). A training step
allocates the same multi-megabyte gradients and activations every iteration, so each step then maps
fresh pages and takes a page fault per 4 KiB of them. On the lottery experiments' batched
LeNet-300-100 step (9 networks, batch 60) those faults were about 45% of the backward pass.
`retain_freed_memory` raises both thresholds, so malloc keeps the blocks and reuses them; the
process's resident memory then stays at its peak, as with PyTorch's own GPU caching allocator.

Process-wide, so the program's entry point calls it once (the CLI and the benchmark scripts), not the
library functions a user's program calls.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's largest mmap threshold on 64-bit systems
_TRIM_NEVER = 2 ** 31 - 1  # mallopt takes an int


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks up to 32 MiB for reuse; returns whether it took effect
    (False off Linux or without glibc, where nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # no libc found, or one without mallopt (musl)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER))
