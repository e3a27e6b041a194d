"""The host allocator's setting for a training process on the CPU: keep freed memory.

glibc's malloc serves large blocks with ``mmap`` and gives freed memory back to the kernel
(``munmap``, or trimming the heap's top once the free space there passes a threshold that
follows the largest block freed so far). A training step frees its activations and gradients at
its end, so the next step maps them afresh and the kernel faults in and zeroes every page again.
Measured on bench_runtime's small config (2 threads, 2026-12-02): the ``reference`` executor
took 5,700-20,000 minor page faults and 23-47 ms of system time a step, eager PyTorch 3,700 and
7-13 ms; the ``reference`` executor's excess over eager was that (its gradient sums are out of
place). ``keep_freed_memory`` fixes glibc's mmap threshold at its maximum (32 MiB: smaller blocks
come from the heap) and the trim threshold at 1 GiB, so freed memory stays in the process for
the next step: no faults in the steady state. The price: the process keeps its high-water mark,
which every step reaches again anyway. Not glibc (macOS, musl): nothing is changed.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3           # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20                             # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit)
TRIM_THRESHOLD = 1 << 30
_kept = False


def keep_freed_memory() -> bool:
    """Set once per process; True where it took (glibc)."""
    global _kept
    if _kept:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _kept = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _kept
