"""Which malloc serves the tensors: tcmalloc by default, glibc's with its freed memory given back on request.

On Linux a CPU tensor's memory comes from the C library's malloc. glibc serves a large allocation with its own
pages (mmap) and unmaps them on free, but it raises that threshold to the size of every such block freed (up to
32 MB), so after the first step a training loop's activations (a few MB each) come from the heap, where freed
transients are kept and fragment it: SmolLM2 LoRA's step peaks 1.2-1.7 GB above what backward keeps. Below the
threshold, every tensor would be fresh pages the kernel faults in and zeroes (0.79x the speed, BENCHMARKS.md).

tcmalloc (gperftools' ``libtcmalloc_minimal``, Debian's ``libtcmalloc-minimal4``) reuses freed spans by best
fit and keeps the peak at what is live, at glibc's speed. It must be loaded before anything allocates, so
the commands that train or run a model re-execute themselves once with it in ``LD_PRELOAD``
(:func:`reexec_with_tcmalloc`), as PyTorch's own CPU launcher (``torch.backends.xeon.run_cpu``) does.
``DELTATUNE_ALLOCATOR=system`` keeps the C library's malloc, a malloc already in ``LD_PRELOAD`` (jemalloc,
mimalloc) is kept, and without tcmalloc on the machine nothing changes.

``train.return_freed_memory`` is the switch for glibc (when tcmalloc is absent or refused): the mmap threshold
fixed at 1 MiB (:func:`return_freed_memory`). Other C libraries (musl, macOS, Windows) are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from pathlib import Path

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
THRESHOLD = 1 << 20
ENV = "DELTATUNE_ALLOCATOR"  # "system": keep the C library's malloc
TCMALLOC = "libtcmalloc_minimal.so.4"
MALLOCS = ("tcmalloc", "jemalloc", "mimalloc")
LIBRARY_DIRS = (Path(sys.prefix) / "lib", Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib/aarch64-linux-gnu"),
                Path("/usr/lib64"), Path("/usr/local/lib"), Path("/usr/lib"))
# tcmalloc prints a stack for every allocation above 1 GiB (a model's weights being read): not a problem here
QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def return_freed_memory(threshold: int = THRESHOLD) -> bool:
    """Serve allocations of ``threshold`` bytes and more by mmap from now on (process-wide); False where the C
    library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))


def find_tcmalloc() -> Path | None:
    """tcmalloc's shared library on this machine (the environment's own lib folder first), or None."""
    if platform.system() != "Linux":
        return None
    return next((d / TCMALLOC for d in LIBRARY_DIRS if (d / TCMALLOC).is_file()), None)


def tcmalloc_environment(env: dict | None = None) -> dict | None:
    """``env`` (default: this process's) with tcmalloc preloaded, or None when it is refused
    (``DELTATUNE_ALLOCATOR=system``), already there, or not on this machine."""
    env = dict(os.environ if env is None else env)
    preload = env.get("LD_PRELOAD", "")
    if env.get(ENV) == "system" or any(name in preload for name in MALLOCS):  # refused, or a malloc preloaded
        return None  # already (by us, or by the user, whose choice stands)
    lib = find_tcmalloc()
    if lib is None:
        return None
    return {**QUIET, **env, "LD_PRELOAD": f"{lib}:{preload}" if preload else str(lib)}


def child_environment(malloc: str, env: dict | None = None) -> dict | None:
    """``env`` (default: this process's) for a child process on ``malloc``: "system" with no malloc preloaded,
    "tcmalloc" with it preloaded (None where this machine has none). For benchmarks that compare the two."""
    base = {k: v for k, v in (os.environ if env is None else env).items() if k not in ("LD_PRELOAD", ENV)}
    return base if malloc == "system" else tcmalloc_environment(base)


def reexec_with_tcmalloc() -> None:
    """Start this command again with tcmalloc preloaded (same process id, arguments and environment), when
    :func:`tcmalloc_environment` allows it; otherwise return and go on with the C library's malloc."""
    env = tcmalloc_environment()
    if env is None or not sys.orig_argv:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:  # cannot start again (a frozen executable, a sandbox): keep going as we are
        return


def active() -> str:
    """The malloc this process runs on: tcmalloc, jemalloc, mimalloc or the C library's (env.json records it)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return next((name for name in MALLOCS if f"lib{name}" in maps), "system")


def planned(env: dict | None = None) -> str:
    """The malloc a command that runs a model will run on, started from ``env`` (default: this process's):
    ``deltatune plan`` plans for it."""
    env = os.environ if env is None else env
    if "tcmalloc" in env.get("LD_PRELOAD", ""):
        return "tcmalloc"
    return "tcmalloc" if tcmalloc_environment(dict(env)) is not None else "system"
