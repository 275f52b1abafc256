"""Skip steps whose loss is not finite; stop the run after several in a row."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


class NonFiniteGuard:
    def __init__(self, max_in_row: int = 5):
        self.max_in_row = max_in_row
        self.in_row = 0
        self.total_skipped = 0

    def check(self, loss: torch.Tensor, step: int) -> bool:
        """True when `loss` is finite (train on). False: skip this step. Raises after max_in_row skips."""
        if torch.isfinite(loss).all():
            self.in_row = 0
            return True
        self.in_row += 1
        self.total_skipped += 1
        logger.warning("non-finite loss at step %d (%d in a row): skipping the update", step, self.in_row)
        if self.in_row >= self.max_in_row:
            raise NonFiniteLossError(
                f"{self.in_row} non-finite losses in a row (last at step {step}): stopping. Lower the learning "
                "rate, check the data, or use --mixed_precision bf16 instead of fp16."
            )
        return False
