"""A delta's start computed from training data before the first step (``Method.data_start``: LoRA's EVA).

The method reads the loop's first micro-batches (``loop.first_batches``: a loader of their own from the run's
seed, so the training order is untouched) and returns tensors, kept in the run directory (``start/``), that
``Method.set_start`` puts in place. Every process of a run, and a resumed run, sets its start from that file:
the data pass runs once per run, in the main process, and a resumed run rebuilds the same shapes (EVA's
per-layer ranks) before its checkpoint is loaded into them. The global random state is restored afterwards
(peft draws fresh layers when it changes a rank), so the run's dropout masks are those of a run without it.
"""

from __future__ import annotations

import weakref

import torch
from safetensors.torch import load_file, save_file

from ..fs import atomic_dir
from ..kernels import fuse
from ..rundir import RunDir, barrier, is_main_process
from .loop import Job, first_batches
from .progress import phase

FOLDER, FILE = "start", "start.safetensors"
_SET: weakref.WeakSet = weakref.WeakSet()  # models whose start is set: a second call (resume, then _start) is none


def settle_start(job: Job, run: RunDir) -> bool:
    """Compute the method's start from data (main process, once per run) and set it; False for a method whose
    start needs no data. In a multi-process launch every process calls this: the others wait for the file."""
    n = job.method.start_batches(job.options)
    if not n:
        return False
    if job.model in _SET:
        return True
    file = run.path / FOLDER / FILE
    with torch.random.fork_rng():
        if is_main_process() and not file.is_file():
            batches = first_batches(job, n)
            phase("start", f"{job.method.name}: reading {len(batches)} training batches for the delta's start",
                  job.train.progress)
            state = job.method.data_start(job.model, job.options, batches)
            atomic_dir(file.parent, lambda tmp: save_file({k: v.contiguous() for k, v in state.items()},
                                                          tmp / FILE))
        barrier()
        job.method.set_start(job.model, job.options, load_file(file))
    fuse(job.model, job.train.kernels)  # layers the start rebuilt (a new rank) come back with peft's own modules
    _SET.add(job.model)
    return True
