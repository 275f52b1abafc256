"""Exponential moving average of a model's weights, kept in fp32."""

from __future__ import annotations

import copy

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

    def current_decay(self) -> float:
        n = int(self.num_updates)
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = self.current_decay()
        ema_params = list(self.shadow.parameters())
        params = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for b_ema, b in zip(self.shadow.buffers(), model.buffers()):
            b_ema.copy_(b)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for p, p_ema in zip(model.parameters(), self.shadow.parameters()):
            p.copy_(p_ema.to(p.dtype))
