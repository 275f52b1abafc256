"""Optimisers, their learning-rate schedules on the device, and the guarded update that never waits for the host.

    opt = build_adamw(model, lr, betas, eps, weight_decay, device)     # fused AdamW, tensor lr, no-decay groups
    sched = LRSchedule(opt, "constant_with_warmup", lr, warmup, total)
    unit = Trainable("unet", params, opt, sched, max_grad_norm)
    found_inf, grad_bad, norms = guarded_update([unit], precision, loss_bad)

The update of one training step (Micikevicius et al. 2018, "Mixed Precision Training", Sec. 3.2 for the scaling):
    1. a non-finite loss of any micro-batch (or an fp16 overflow outside the backward pass, as the adaptive GAN
       weight's gradients) poisons the gradients, so that the fp16 scaler sees it too
    2. unscale the gradients (fp16) and take each unit's gradient norm, all on the device
    3. found_inf = any loss or any gradient norm not finite
    4. every optimizer steps with `found_inf` (fused AdamW then changes neither the weights nor its moments,
       and takes back its step count), every schedule advances by 1 - found_inf, the scaler updates

Clipping to max_grad_norm (g <- g * min(1, max_norm / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_) is
done by fused AdamW itself: its kernel divides each gradient by `grad_scale` as it reads it (and writes it back),
so the divisor max(1, (norm + 1e-6) / max_norm) goes there instead of a separate multiply, which read and wrote
every fp32 gradient: one read of them fewer per step, 3.4 GB for the design UNet (bench/bench_update.py: -7 %
on a CPU, no measurable change on an H200). An unfused AdamW clips in place first.

The schedule's factors (those of transformers.get_scheduler) are computed once into a table; the rate of the
next update is base_lr * table[successful updates so far], written into the optimizer's tensor lr on the
device. So a skipped step moves neither the weights nor the schedule, and nothing is read back per step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- optimiser


def decays(module: nn.Module, name: str, param: nn.Parameter) -> bool:
    """AdamW's weight decay applies to matrices and kernels only: not to biases, norm scales (1-d), embeddings
    (nn.Embedding tables: class embeddings, the VQ codebook) or learned embedding parameters (`*embedding`)."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return param.ndim >= 2 and not isinstance(owner, nn.Embedding) and not leaf.endswith("embedding")


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two AdamW groups: with `weight_decay`, and without."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if decays(module, n, p)]
    no_decay = [p for n, p in named if not decays(module, n, p)]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]


def build_adamw(
    module: nn.Module, lr: float, betas: tuple[float, float], eps: float, weight_decay: float, device
) -> torch.optim.AdamW:
    """AdamW over `module`'s trainable parameters, fused when the device allows (CPU and CUDA do), with a tensor
    learning rate on `device` that LRSchedule writes into."""
    groups = param_groups(module, weight_decay)
    lr_tensor = torch.tensor(float(lr), dtype=torch.float32, device=device)  # the unfused kernels take a float
    return with_fused_kernel(lambda fused: torch.optim.AdamW(
        groups, lr=lr_tensor if fused else float(lr), betas=betas, eps=eps, fused=fused))


def with_fused_kernel(make: Callable[[bool], torch.optim.Optimizer]) -> torch.optim.Optimizer:
    """make(True): the optimizer with its fused kernel (one kernel over every parameter, and a non-finite step
    skipped on the device: optimizer_step_unless). On a device without one, make(False), said in the log: a
    non-finite step is then skipped after a host sync."""
    try:
        return make(True)
    except RuntimeError as err:
        logger.info("fused optimizer unavailable (%s): non-finite steps are skipped with a host sync", err)
        return make(False)


# --------------------------------------------------------------------------------------------------- schedule


def schedule_factors(name: str, warmup_steps: int, total_steps: int, base_lr: float = 1.0) -> list[float]:
    """f(k) for k = 0 .. total_steps: the multipliers of the base rate that transformers.get_scheduler(name)
    applies after k scheduler steps to an optimizer whose rate is `base_lr` (polynomial's factors depend on it:
    they decay base_lr to its absolute lr_end, 1e-7; a rate of 0 stays 0 whatever the factors)."""
    from transformers import get_scheduler

    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr if base_lr > 0 else 1.0)
    try:
        sched = get_scheduler(name, dummy, num_warmup_steps=warmup_steps, num_training_steps=max(1, total_steps))
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"lr scheduler {name!r} cannot be used: {err}") from err
    lambdas = getattr(sched, "lr_lambdas", None)
    if not lambdas:
        raise ValueError(f"lr scheduler {name!r} is not a function of the step count; use e.g. "
                         "constant_with_warmup, linear or cosine")
    return [float(lambdas[0](k)) for k in range(max(1, total_steps) + 1)]


class LRSchedule:
    """The rate of every group of `optimizer`, base_lr * factors[updates], kept on the device.

    `updates` counts successful optimizer updates (a skipped step does not advance it). state_dict() holds just
    that count; the table is rebuilt from the config, so resuming is exact. `lr` is the rate of the next update;
    `last_lr` the rate the latest step used (what the trainers log at that step).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, name: str, base_lr: float, warmup_steps: int,
                 total_steps: int):
        self.optimizer = optimizer
        self.base_lr = base_lr
        lr = optimizer.param_groups[0]["lr"]
        self.tensor_lr = isinstance(lr, torch.Tensor)
        device = lr.device if self.tensor_lr else optimizer.param_groups[0]["params"][0].device
        self.factors = torch.tensor(schedule_factors(name, warmup_steps, total_steps, base_lr), dtype=torch.float32,
                                    device=device)  # (total + 1,)
        self.updates = torch.zeros((), dtype=torch.long, device=device)
        self.lr = torch.zeros((), dtype=torch.float32, device=device)
        self.refresh()
        self.last_lr = self.lr.clone()  # no step taken yet: the first step's rate

    def refresh(self) -> None:
        index = self.updates.clamp(max=self.factors.numel() - 1).view(1)
        self.lr.copy_(self.base_lr * self.factors.gather(0, index)[0])  # gather: a 0-d index would be read back
        for group in self.optimizer.param_groups:
            if self.tensor_lr:
                group["lr"] = self.lr  # the same tensor: the fused kernel reads it on the device
            else:
                group["lr"] = float(self.lr)

    def advance(self, ok: torch.Tensor) -> None:
        """One step: +1 successful update when `ok` (a () tensor, 0 or 1), +0 when the step was skipped."""
        self.last_lr.copy_(self.lr)  # the rate this step used (a skipped step's too)
        self.updates += ok.long()
        self.refresh()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"updates": self.updates.cpu()}

    def load_state_dict(self, state: dict) -> None:
        """Call after the optimizer's load_state_dict (which replaces the groups' lr with stored values)."""
        self.updates.copy_(state["updates"])
        self.refresh()
        self.last_lr.copy_(self.lr)


# --------------------------------------------------------------------------------------------------- the update


@dataclass
class Trainable:
    """One optimizer with the parameters it updates, its schedule and its clipping threshold."""

    name: str  # names its gradient norm in logs and non-finite messages ("grad_norm/<name>")
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    max_grad_norm: float  # <= 0: no clipping (the norm is still computed)


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return bool(optimizer.defaults.get("fused"))


def grad_norm_and_clip(unit: Trainable) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The total 2-norm of `unit`'s gradients (a () device tensor), and how they are clipped to max_grad_norm:
    for a fused optimizer, the divisor its step applies, max(1, (norm + 1e-6) / max_grad_norm), a () fp32 tensor
    whose reciprocal is clip_grad_norm_'s clamped coefficient; an unfused optimizer's gradients are clipped here,
    in place (divisor None). None too when nothing is clipped (max_grad_norm <= 0, or no gradients)."""
    grads = [p.grad for p in unit.params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=unit.schedule.lr.device), None
    if unit.max_grad_norm <= 0:
        return torch.nn.utils.get_total_norm(grads), None
    if not is_fused(unit.optimizer):
        return torch.nn.utils.clip_grad_norm_(unit.params, unit.max_grad_norm), None
    norm = torch.nn.utils.get_total_norm(grads)
    return norm, ((norm.float() + 1e-6) / unit.max_grad_norm).clamp(min=1.0)


@torch.no_grad()
def poison_gradients(units: Sequence[Trainable], bad: torch.Tensor) -> None:
    """Add NaN to one gradient element of each unit when `bad`, so that the loss scaler counts the step as an
    overflow and every gradient norm says not finite (a no-op otherwise)."""
    nan = torch.where(bad, float("nan"), 0.0)
    for unit in units:
        grad = next((p.grad for p in unit.params if p.grad is not None), None)
        if grad is not None:
            grad.view(-1)[:1].add_(nan.to(grad.dtype))


def optimizer_step_unless(
    optimizer: torch.optim.Optimizer, found_inf: torch.Tensor, grad_divisor: Optional[torch.Tensor] = None
) -> None:
    """optimizer.step() that is a no-op when found_inf (a () float tensor) is 1, without a host sync for a fused
    Adam / AdamW (its `found_inf` attribute, as torch.amp.GradScaler passes it: neither the weights nor the moments
    nor the step count change). A fused optimizer divides the gradients by `grad_divisor` (a () fp32 tensor) as
    it reads them, and leaves the divided gradients in .grad (GradScaler's `grad_scale`); unfused, it must be None."""
    if is_fused(optimizer):
        optimizer.found_inf, optimizer.grad_scale = found_inf, grad_divisor
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale
    elif grad_divisor is not None:
        raise ValueError("an unfused optimizer cannot divide the gradients in its step; clip them before")
    elif not bool(found_inf):  # host sync: only without a fused optimizer
        optimizer.step()


def guarded_update(
    units: Sequence[Trainable], precision, loss_bad: torch.Tensor, overflow: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Update every unit, or none of them. loss_bad: () bool, a loss of this step (any process) not finite;
    overflow: () bool, a scaled gradient computed outside the backward pass overflowed (fp16).

    Returns found_inf () bool (the step was skipped), grad_bad (len(units),) bool and the gradient norms.
    """
    if overflow is not None:
        loss_bad = loss_bad | overflow
    if precision.scaler is not None:
        poison_gradients(units, loss_bad)
    for unit in units:
        precision.unscale_(unit.optimizer)
    norms, divisors = zip(*(grad_norm_and_clip(unit) for unit in units))
    grad_bad = ~torch.isfinite(torch.stack(norms))  # (units,)
    found_inf = loss_bad | grad_bad.any()
    skip = found_inf.float()
    for unit, divisor in zip(units, divisors):
        optimizer_step_unless(unit.optimizer, skip, divisor)
        unit.schedule.advance(1 - skip)
        unit.optimizer.zero_grad(set_to_none=True)
    precision.update()
    return found_inf, grad_bad, list(norms)
