"""One GPU, several bench processes at once: their compiles overlap, their timings take turns.

torch.compile spends minutes on the host (tracing, lowering, Triton's kernel builds) for each design-UNet workload,
and a lent GPU has minutes in all. Benches started together under `nice` with BENCH_GPU_LOCK set to one file
compile side by side; every section that times or profiles the GPU (or loads it heavily, like encoding a latent
cache) runs inside `gpu_exclusive()`, which holds an exclusive lock on that file, so no two of them share the GPU.
While it holds the lock a process runs at normal priority again, ahead of the others' compile workers.

    with gpu_exclusive():          # nothing when BENCH_GPU_LOCK is unset; re-entrant within a process
        seconds = time_per_call(step, device, warmup, steps)

What this cannot remove: another process's first compiled step still runs on the GPU (and cuDNN's autotuner
with it) outside the lock, and its compile workers share the CPU; a timing taken this way is checked against the
same row timed alone in an earlier session.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from typing import Optional

LOCK_ENV = "BENCH_GPU_LOCK"

_held = 0  # nesting depth in this process
_file = None
_niceness: Optional[int] = None


def _set_niceness(value: int) -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, 0, value)
    except OSError:  # lowering niceness needs root (a lent GPU machine runs commands as root)
        pass


@contextlib.contextmanager
def gpu_exclusive():
    """The GPU to this process alone for the block (see the module docstring); a no-op without BENCH_GPU_LOCK."""
    global _held, _file, _niceness
    path = os.environ.get(LOCK_ENV)
    if not path:
        yield
        return
    if _held == 0:
        _file = open(path, "a")
        fcntl.flock(_file, fcntl.LOCK_EX)  # waits while another process times
        _niceness = os.getpriority(os.PRIO_PROCESS, 0)
        _set_niceness(0)
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if _held == 0:
            torch = sys.modules.get("torch")  # not imported: nothing queued on a GPU
            if torch is not None and torch.cuda.is_initialized():
                torch.cuda.synchronize()  # this process's queued kernels finish before another one times
            _set_niceness(_niceness)
            fcntl.flock(_file, fcntl.LOCK_UN)
            _file.close()
            _file = None
