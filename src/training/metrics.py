"""Training metrics that stay on the device between log steps, and metrics.jsonl kept continuous over resumes.

    window = MetricWindow()
    window.add({"loss": loss}, keep=~found_inf)     # every step: device ops only
    values = window.pop()                           # at a log step: one host read for all of them

A resumed run continues metrics.jsonl: lines of steps after the resume step (written by the run that was
stopped or killed after its last checkpoint, and about to be trained again) are dropped when it starts.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)


INTEGER_KEYS = ("skipped_steps",)  # counters logged as integers


class MetricWindow:
    """Sums of scalar device tensors over the steps since the last `pop`; skipped steps are left out."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def add(self, values: dict[str, torch.Tensor], keep: Optional[torch.Tensor] = None) -> None:
        """values: () tensors; keep: () bool, False for a skipped step (its values are not counted)."""
        for key, value in values.items():
            value = value.detach().float()
            count = torch.ones_like(value) if keep is None else keep.to(value.device, torch.float32)
            value = value if keep is None else torch.where(keep.to(value.device), value, 0.0)
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts[key] + count if key in self.counts else count

    def pop(self, extra: Optional[dict[str, torch.Tensor]] = None, accelerator=None) -> dict[str, float]:
        """Means since the last pop (keys no kept step logged are left out) plus `extra` values as they are now;
        one host read for all of them. With `accelerator`, the means are over all processes (every process
        must call pop at the same steps; sums and counts are all-reduced, `extra` is this process's)."""
        keys = sorted(self.sums)  # the same order on every process
        extra = extra or {}
        tensors = [self.sums[k] for k in keys] + [self.counts[k] for k in keys]
        tensors += [torch.as_tensor(v) for v in extra.values()]
        device = tensors[0].device if tensors else torch.device("cpu")
        stacked = torch.stack([t.detach().float().to(device) for t in tensors]) if tensors else torch.zeros(0)
        if accelerator is not None and accelerator.num_processes > 1 and keys:
            stacked[: 2 * len(keys)] = accelerator.reduce(stacked[: 2 * len(keys)].contiguous(), reduction="sum")
        read = stacked.tolist()
        n = len(keys)
        out = {k: read[i] / read[n + i] for i, k in enumerate(keys) if read[n + i] > 0}
        out.update(zip(extra, read[2 * n:]))
        out.update({k: int(v) for k, v in out.items() if k in INTEGER_KEYS})
        self.sums, self.counts = {}, {}
        return out


def mean_over(values: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-key mean of the micro-batches' logged tensors (a key counts only the micro-batches that logged it)."""
    out: dict[str, torch.Tensor] = {}
    for key in dict.fromkeys(k for v in values for k in v):
        present = [v[key].detach().float() for v in values if key in v]
        out[key] = torch.stack(present).mean()
    return out


def truncate_metrics(path, after_step: int) -> int:
    """Drop the lines of `path` (metrics.jsonl) whose step is greater than `after_step`, and unreadable lines
    (one cut short by a kill); rewritten atomically. Returns how many lines were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line)["step"]
            later = step > after_step
        except (ValueError, KeyError, TypeError):  # cut short by a kill, or edited by hand: no step to keep it by
            dropped += 1
            continue
        if later:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
        logger.info("metrics.jsonl: dropped %d line(s) after step %d (they are trained again)", dropped, after_step)
    return dropped
