"""Exponential moving average of a model's weights, kept in fp32."""

from __future__ import annotations

import copy
from typing import Optional

import torch


class EMA(torch.nn.Module):
    """Shadow copy of `model`'s parameters: shadow <- decay * shadow + (1 - decay) * param.

    With `warmup`, the decay at update n is min(decay, (1 + n) / (10 + n)), so early averages are not
    dominated by the random initialisation. `state_dict()` holds only tensors (safetensors-friendly).
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, warmup: bool = True):
        super().__init__()
        self.decay = decay
        self.warmup = warmup
        self.shadow = copy.deepcopy(model).float().eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def decay_tensor(self) -> torch.Tensor:
        """The decay of the next update, a () fp32 tensor on the EMA's device (no host sync)."""
        n = self.num_updates.float()
        if not self.warmup:
            return torch.full_like(n, self.decay)
        return ((1 + n) / (10 + n)).clamp(max=self.decay)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, skipped: Optional[torch.Tensor] = None) -> None:
        """shadow <- lerp(shadow, param, 1 - decay); a no-op, on the device, when `skipped` (a () bool) is True.
        The host never waits: the weight stays a () device tensor, handed to lerp once per parameter (foreach_lerp's
        single-weight form takes a Python number, and turning the tensor into one reads it back every step)."""
        keep = torch.ones((), device=self.num_updates.device) if skipped is None else (~skipped).float()
        weight = (1.0 - self.decay_tensor()) * keep  # () fp32
        ema_params = list(self.shadow.parameters())
        params = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, [weight] * len(ema_params))
        for b_ema, b in zip(self.shadow.buffers(), model.buffers()):
            b_ema.copy_(b if skipped is None else torch.where(skipped, b_ema, b))
        self.num_updates += keep.long()

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for p, p_ema in zip(model.parameters(), self.shadow.parameters()):
            p.copy_(p_ema.to(p.dtype))
