"""``train.bf16: auto``: bf16 autocast where this machine's bf16 matrix products are much faster than fp32.

CPUs differ too much for a flag test: an AVX512-BF16 Xeon (Cooper Lake class, oneDNN 3.12) ran bf16
products at half its fp32 speed, while a Zen 4 EPYC with the same flag runs them at 4x. So on a CPU
``auto`` measures: one fp32 and one bf16 product of a transformer-sized shape, a few times each
(~50 ms, once per process), and turns autocast on when bf16 is at least ``FASTER`` times the fp32
speed: below that the casts around every product eat the gain (a whole step gains about half of what
its products gain). ``DELTATUNE_AUTO_BF16=1`` or ``0`` answers instead of the measurement (the test
suite sets 0 so that its numeric checks run in fp32 on every machine).
"""

from __future__ import annotations

import functools
import os
import time

import torch

FASTER = 2.0  # bf16 / fp32 product throughput from which autocast pays for its casts
ENV = "DELTATUNE_AUTO_BF16"


def bf16_enabled(setting: bool | str, device: torch.device) -> bool:
    """``train.bf16`` for this device: true/false as set; ``auto`` turns autocast on where bf16 products
    are faster than fp32: CUDA devices that support bf16, CPUs where they measure ``FASTER``."""
    if setting != "auto":
        return bool(setting)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    declared = os.environ.get(ENV, "").strip()
    if declared in ("0", "1"):
        return declared == "1"
    return cpu_bf16_speedup() >= FASTER


@functools.cache
def cpu_bf16_speedup() -> float:
    """bf16 over fp32 matrix-product throughput on this CPU (the best of 5 of each, interleaved, at
    the process's thread count): a 512 x 1024 by 1024 x 1024 product, the size of a small model's
    projections over a batch. Machines without bf16 arithmetic emulate it: well below 1."""
    flags = _cpu_flags()
    if flags and not flags & {"avx512_bf16", "amx_bf16", "bf16"}:  # x86 / Arm flags of bf16 dot products
        return 0.0  # emulated: never faster, and not worth measuring
    generator = torch.Generator().manual_seed(0)
    x, w = torch.randn(512, 1024, generator=generator), torch.randn(1024, 1024, generator=generator)
    pairs = {torch.float32: (x, w), torch.bfloat16: (x.bfloat16(), w.bfloat16())}
    for a, b in pairs.values():  # warm-up: first calls pick and prepare the kernels
        torch.mm(a, b)
    best = {dtype: float("inf") for dtype in pairs}
    for _ in range(5):
        for dtype, (a, b) in pairs.items():
            start = time.perf_counter()
            torch.mm(a, b)
            best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[torch.float32] / best[torch.bfloat16]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return next((set(line.split(":", 1)[1].split()) for line in fh
                         if line.startswith(("flags", "Features"))), set())  # x86, Arm
    except OSError:  # not Linux
        return set()
