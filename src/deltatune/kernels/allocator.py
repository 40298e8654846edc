"""Give freed activation memory back to the system (glibc's malloc).

glibc serves a large allocation with its own pages (mmap) and unmaps them on free, but it raises that
threshold to the size of every such block freed (up to 32 MB), so after the first step a training loop's
activations (a few MB each) come from the heap, whose freed space stays counted in the process's memory. A
step then peaks at the activations kept for backward plus every transient tensor of the forward pass ever
freed into the heap. Fixing the threshold at 1 MiB (``mallopt(M_MMAP_THRESHOLD)``) keeps tensors of 1 MiB and
more on their own pages: SmolLM2 LoRA's step peaks 1.0-1.7 GB lower, but every large tensor is then fresh
pages the kernel must fault in and zero, and the step runs at 0.72x the speed (BENCHMARKS.md), so it is off
by default (``train.return_freed_memory``). Other C libraries (musl, macOS, Windows) are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
THRESHOLD = 1 << 20


def return_freed_memory(threshold: int = THRESHOLD) -> bool:
    """Serve allocations of ``threshold`` bytes and more by mmap from now on (process-wide); False where the C
    library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
