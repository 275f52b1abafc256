"""Mixed precision for the training loops: the autocast dtype, and under fp16 a dynamic loss scaler.

    precision = MixedPrecision.from_accelerator(accelerator)   # --mixed_precision no | bf16 | fp16
    with precision.autocast():
        loss = model(x)
    precision.backward(loss)                                   # scaled by the GradScaler under fp16

accelerate only autocasts fp16 on accelerators; this object does it on the CPU too (torch.autocast("cpu",
float16) with torch.amp.GradScaler("cpu")), so the fp16 path that GPUs run is the one the CPU tests run. The
scaler's state travels in checkpoints (`state_dict`), so an fp16 resume continues with the same loss scale.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MIN_LOSS_SCALE = 1.0  # below it an fp16 gradient skip is no longer an overflow the scaler can fix


class MixedPrecision:
    def __init__(self, mode: str, device: torch.device):
        if mode not in DTYPES:
            raise ValueError(f"mixed precision {mode!r} is not supported by the trainers: use one of {list(DTYPES)}")
        self.mode = mode
        self.device = torch.device(device)
        self.dtype = DTYPES[mode]
        self.scaler = torch.amp.GradScaler(self.device.type) if mode == "fp16" else None

    @classmethod
    def from_accelerator(cls, accelerator) -> "MixedPrecision":
        return cls(str(accelerator.mixed_precision), accelerator.device)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def loss_scale(self) -> Optional[torch.Tensor]:
        """The current loss scale as a () device tensor (no host sync), or None without a scaler."""
        if self.scaler is None:
            return None
        return self.scaler.scale(torch.ones((), device=self.device))

    def gradient_skip_counts(self) -> torch.Tensor | bool:
        """Whether a step skipped for non-finite gradients (with finite losses) counts against the guard's limit of
        skips in a row. Without a scaler, always. Under fp16 an overflow is the scaler's to fix by backing off, so
        it does not count until the scale, after this step's update, is below MIN_LOSS_SCALE: then the unscaled
        gradients themselves are not finite, which no back-off cures (a NaN gradient of a finite loss would
        otherwise skip every step without a word while the scale shrinks towards 0). A () bool device tensor
        under fp16 (no host sync)."""
        if self.scaler is None:
            return True
        return self.loss_scale() < MIN_LOSS_SCALE

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def update(self) -> None:
        """Grow the scale after enough good steps, halve it after an overflow (the scaler's own rule)."""
        if self.scaler is not None:
            self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
