"""Non-finite steps: which ones to skip, the state a skipped step must not change, and when to give up.

A training step (all its micro-batches, and for stage 1 the discriminator's update too) is skipped as a whole
when any of its losses or gradients is not finite. Everything here runs on the device: the decision is a
tensor (`found_inf`) that the optimizers, the EMA and `ForwardState` obey without a host sync, and the guard's
counters are read on the host only when `check()` is called (at log and checkpoint steps).
"""

from __future__ import annotations

import logging
from typing import Iterable, Sequence

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


def nonfinite_flags(values: dict[str, torch.Tensor], terms: Sequence[str], device) -> torch.Tensor:
    """(len(terms),) bool: which of the named values is NaN or infinite (absent names are False)."""
    flags = [~torch.isfinite(values[t].detach()).all() if t in values else None for t in terms]
    false = torch.zeros((), dtype=torch.bool, device=device)
    return torch.stack([false if f is None else f.to(device) for f in flags])


def any_process(accelerator, flags: torch.Tensor) -> torch.Tensor:
    """flags (bool) OR-ed over the processes (an all-reduce on the device; no host sync)."""
    if accelerator.num_processes == 1:
        return flags
    return accelerator.reduce(flags.float(), reduction="sum") > 0


class NonFiniteGuard:
    """Counts skipped steps on the device; `check()` raises once `max_in_row` counted skips came in a row.

    `terms` names the values whose flags `record` receives (losses, then gradient norms), so the error can say
    which of them went non-finite. Steps skipped by the fp16 loss scaler for an overflow of its scaled
    gradients are skipped but not counted against `max_in_row`: backing off is the scaler's job, until the scale
    has fallen below 1 (MixedPrecision.gradient_skip_counts).
    """

    def __init__(self, terms: Sequence[str], max_in_row: int = 5, device="cpu"):
        self.terms = list(terms)
        self.max_in_row = max_in_row
        long = dict(dtype=torch.long, device=device)
        self.in_row = torch.zeros((), **long)
        self.skipped = torch.zeros((), **long)  # all skipped steps, overflow skips included
        self.tripped_step = torch.full((), -1, **long)
        self.tripped_terms = torch.zeros(len(self.terms), dtype=torch.bool, device=device)

    @torch.no_grad()
    def record(self, step: int, flags: torch.Tensor, skipped: torch.Tensor, counted: torch.Tensor) -> None:
        """flags (len(terms),) bool; skipped / counted () bool. Device ops only."""
        self.skipped += skipped.long()
        # a counted skip extends the run of skips, an update ends it, an overflow skip leaves it as it is
        self.in_row.copy_(torch.where(counted, self.in_row + 1, torch.where(skipped, self.in_row, 0)))
        trip = (self.in_row >= self.max_in_row) & (self.tripped_step < 0)
        self.tripped_step.copy_(torch.where(trip, step, self.tripped_step))
        self.tripped_terms.copy_(torch.where(trip, flags, self.tripped_terms))

    def check(self) -> None:
        """Host read: raise NonFiniteLossError, naming the step and the terms, when the limit was reached."""
        step = int(self.tripped_step)
        if step < 0:
            return
        names = [t for t, bad in zip(self.terms, self.tripped_terms.tolist()) if bad] or ["the loss"]
        raise NonFiniteLossError(
            f"{self.max_in_row} non-finite steps in a row, the last at step {step} (non-finite: {', '.join(names)}): "
            "stopping. Lower the learning rate, check the data, or use --mixed_precision bf16 instead of fp16."
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"in_row": self.in_row.cpu(), "skipped": self.skipped.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.in_row.copy_(state["in_row"])
        self.skipped.copy_(state["skipped"])


def mutable_tensors(modules: Iterable[nn.Module]) -> list[torch.Tensor]:
    """What a training forward pass writes outside the optimizer: every buffer (BatchNorm running statistics,
    the VQ codebook's usage counts) and the VQ codebook itself, which dead-code re-seeding rewrites."""
    from ..models.quantizer import VectorQuantizer

    out: list[torch.Tensor] = []
    for module in modules:
        out += [b for b in module.buffers()]
        out += [m.embedding.weight for m in module.modules() if isinstance(m, VectorQuantizer)]
    return out


class ForwardState:
    """Saves `mutable_tensors` before a step and puts them back when the step is skipped (on the device)."""

    def __init__(self, modules: Iterable[nn.Module]):
        self.tensors = mutable_tensors(modules)
        self.saved = [t.detach().clone() for t in self.tensors]

    @torch.no_grad()
    def save(self) -> None:
        if self.tensors:
            torch._foreach_copy_(self.saved, [t.detach() for t in self.tensors])

    @torch.no_grad()
    def restore_if(self, skipped: torch.Tensor) -> None:
        for t, s in zip(self.tensors, self.saved):
            t.copy_(torch.where(skipped, s, t))
