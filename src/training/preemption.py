"""A graceful stop on SIGTERM, SIGUSR1 or Ctrl-C: finish the current step, write a checkpoint, exit with status 0.

Clusters send SIGTERM (or SIGUSR1, with SLURM's --signal) some time before they kill a job; at a terminal it is
Ctrl-C (SIGINT), and a second Ctrl-C aborts at once (KeyboardInterrupt), as without the handler. The handler only
sets a flag; the training loop asks `should_stop` after a step and, when it says yes, checkpoints and returns.

    with GracefulStop() as stop:
        for step ...:
            ...
            if stop.should_stop(accelerator, at_sync_point):
                save checkpoint; break

Under torchrun every process must stop after the same step, even when the signal reached only some of them:
the flags are summed over the processes (an all-reduce), at sync points only (log and checkpoint steps),
because reading the sum back is a host sync that the hot loop otherwise never makes. A single process needs
no agreement and stops after the very step during which the signal came.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Optional

import torch

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class GracefulStop:
    def __init__(self, signals=STOP_SIGNALS):
        self.signals = signals
        self.received: Optional[str] = None  # name of the first stop signal this process got
        self._previous: dict = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # Python only lets the main thread install
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
        elif signum == signal.SIGINT:  # Ctrl-C again: the user does not want to wait for the step
            raise KeyboardInterrupt

    def should_stop(self, accelerator, sync_point: bool) -> bool:
        """True when this run must stop after the current step: the same answer on every process."""
        if accelerator.num_processes == 1:
            return self.received is not None
        if not sync_point:
            return False
        flag = torch.tensor([1.0 if self.received else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    def report(self, step: int, total: int, checkpoint) -> None:
        logger.warning("%s: stopped after step %d/%d and wrote %s; continue with --resume_from_checkpoint latest",
                       self.received or "a stop signal on another process", step, total, checkpoint)

