"""Keep freed memory in the process, so that a batch's activations cost no page faults.

glibc's ``malloc`` maps a block of more than 128 KiB on its own and unmaps it when it is
freed, and it gives the free top of its heap back to the kernel. A network called again and
again on a large batch then gets fresh pages for its activations on every call, and the
kernel zeroes each one on first touch: on the benchmark CPU a CIFAR-10 member at batch 256
on one thread made 8,160 page faults per call and took 48-49 ms, against none and 38-40 ms
with freed memory kept (``benchmarks/allocator.py``, BENCHMARKS.md). glibc raises its
mapping threshold as blocks are freed, so whether a process paid this depended on what it
had allocated before: latency profiles of the same members read 0.097-0.139 ms per image at
batch 256 with glibc's defaults and 0.080-0.097 with freed memory kept. In five of eight
earlier runs of the CIFAR-10 benchmark, the profile measured at its start had read 1.2-1.5x
the batch-256 cost that the timing after it measured, which looked like the machine
drifting.

:func:`retain_freed_memory` sets glibc's thresholds so that blocks up to its limit (32 MiB)
come from the heap and nothing is trimmed: freed memory is reused, and the process keeps
its peak size. Every entry point calls it (``flexens.cli.run``), as do the serving workers
and the latency profile, which records it. Blocks over 32 MiB (large images at large
batches) are still mapped per call; a caching allocator (jemalloc or tcmalloc through
``LD_PRELOAD``, as PyTorch's CPU performance guide suggests) removes those too.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""``mallopt`` parameters (glibc's ``malloc.h``)."""
MMAP_THRESHOLD_MAX = 32 << 20
"""The largest mapping threshold glibc accepts on a 64-bit system (``HEAP_MAX_SIZE / 2``)."""
TRIM_NEVER = (1 << 31) - 1
"""A trim threshold (a C ``int``) no heap of an inference process reaches: never trim."""


def retain_freed_memory() -> bool:
    """Make ``malloc`` keep freed memory for reuse; True where it took effect (glibc on
    Linux), False elsewhere (another C library, another system), where nothing changes."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_NEVER)
    )
