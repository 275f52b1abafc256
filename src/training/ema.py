"""Exponential moving average of a model's weights, kept in fp32."""

from __future__ import annotations

import copy
from typing import Optional

import torch


class EMA(torch.nn.Module):
    """Shadow copy of `model`'s parameters: shadow <- decay * shadow + (1 - decay) * param.

    With `warmup`, the decay at update n is min(decay, (1 + n) / (10 + n)), so early averages are not
    dominated by the random initialisation. `state_dict()` holds only tensors (safetensors-friendly).

    With `update_every` = k > 1 the shadow moves once every k steps, by the k steps' decays together:
    shadow <- lerp(shadow, param, 1 - prod_i decay_i), which is exactly what k per-step updates give when the
    parameters hold still over those steps, and otherwise weights the k steps' parameters by the last one's.
    Each step then costs a few scalar ops instead of a pass over every weight (ema-pytorch's `update_every`,
    without its k-times longer averaging window). Whatever reads the shadow calls `flush` first. The weight still
    pending is part of the state, so a run resumed from any step continues exactly; a checkpoint's shadow may lag
    its step by up to k - 1 steps.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, warmup: bool = True, update_every: int = 1):
        super().__init__()
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        self.decay = decay
        self.warmup = warmup
        self.update_every = update_every
        self.shadow = copy.deepcopy(model).float().eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("pending_weight", torch.zeros(()))  # 1 - prod(decays) since the shadow last moved

    def decay_tensor(self, updates_before: torch.Tensor | None = None) -> torch.Tensor:
        """The decay of the update that follows `updates_before` kept updates (default: the next one), a () fp32
        tensor on the EMA's device (no host sync): (1 + n) / (10 + n) capped at `decay` with warm-up."""
        n = (self.num_updates if updates_before is None else updates_before).float()
        if not self.warmup:
            return torch.full_like(n, self.decay)
        return ((1 + n) / (10 + n)).clamp(max=self.decay)

    def last_decay(self) -> torch.Tensor:
        """The decay of the latest kept update (the first update's before any): what a log line at that step
        reports."""
        return self.decay_tensor((self.num_updates - 1).clamp(min=0))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, skipped: Optional[torch.Tensor] = None,
               step: Optional[int] = None) -> None:
        """Record one optimizer step: a no-op, on the device, when `skipped` (a () bool) is True. The shadow
        moves now when `step` (the number of steps done, a host int) is a multiple of update_every, or when no
        step is given. The host never waits: every value stays on the device."""
        keep = torch.ones((), device=self.num_updates.device) if skipped is None else (~skipped).float()
        # 1 - (1 - w) * decay, kept as w + x * (1 - w) with x = 1 - decay (of a kept step): exact for one step
        self.pending_weight.lerp_(torch.ones_like(self.pending_weight), (1.0 - self.decay_tensor()) * keep)
        self.num_updates += keep.long()
        if step is None or step % self.update_every == 0:
            self._move(model, skipped)

    def flush(self, model: torch.nn.Module) -> None:
        """Before the shadow is read: move it by the steps still pending (none when it moves every step; with
        nothing pending the weight is 0 and the shadow stays as it is)."""
        if self.update_every > 1:
            self._move(model)

    @torch.no_grad()
    def _move(self, model: torch.nn.Module, skipped: Optional[torch.Tensor] = None) -> None:
        """shadow <- lerp(shadow, param, w), w the pending weight. It stays a () device tensor, handed to lerp once
        per parameter (foreach_lerp's single-weight form takes a Python number, and turning the tensor into one
        reads it back). `skipped`: the model's buffers are taken only when the last step was kept."""
        ema_params = list(self.shadow.parameters())
        params = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, [self.pending_weight] * len(ema_params))
        for b_ema, b in zip(self.shadow.buffers(), model.buffers()):
            b_ema.copy_(b if skipped is None else torch.where(skipped, b_ema, b))
        self.pending_weight.zero_()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Checkpoints from before `update_every` have no pending weight: nothing was pending."""
        state_dict = {"pending_weight": torch.zeros(()), **state_dict}
        return super().load_state_dict(state_dict, strict, assign)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for p, p_ema in zip(model.parameters(), self.shadow.parameters()):
            p.copy_(p_ema.to(p.dtype))
