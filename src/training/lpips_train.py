"""Training LPIPS on BAPPS 2AFC triplets (Zhang et al. 2018, Sec. 3.3), as lpips_trainer.py runs it.

Per step: one trunk pass over (ref, p0, p1), distances d0 = d(ref, p0), d1 = d(ref, p1) (Eq. 1), the ranking
head's logit of "p1 preferred", BCE against the judge fraction; Adam (betas 0.5, 0.999), gradients clipped
to norm 1, then the linear layers clamped to >= 0. The rate is constant for num_epochs - decay_epochs epochs,
then falls linearly to zero.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..data.bapps import TwoAFCDataset, to_minus_one_to_one
from ..data.loader import InfiniteLoader
from ..losses.ranking import RankingHead, ranking_loss
from ..models.lpips import LPIPS, load_imagenet_trunk, save_lpips_checkpoint
from .lpips_eval import two_afc_scores
from .setup import progress_bar

logger = logging.getLogger("ldm")


@dataclass
class LPIPSTrainSettings:
    num_epochs: int = 10
    decay_epochs: int = 5
    initial_lr: float = 1e-4
    logging_steps: int = 250
    img_range: str = "minus_one_to_one"
    max_grad_norm: float = 1.0


def available_workers(requested: int) -> int:
    """`requested` data workers, capped at the CPUs this process may use (logged when capped)."""
    cpus = len(os.sched_getaffinity(0))
    if requested > cpus:
        logger.info("--num_workers %d capped at the %d CPUs available", requested, cpus)
    return min(requested, cpus)


def make_train_loader(
    root, train_sets: list[str], img_size: int, img_range: str, batch_size: int, seed: int, num_workers: int,
    accelerator,
) -> InfiniteLoader:
    """2AFC training triplets of `train_sets`, shuffled per epoch from `seed`, sharded over the processes."""
    dataset = TwoAFCDataset(root, "train", train_sets, img_size, img_range)
    logger.info("training on %d triplets from %s", len(dataset), ", ".join(train_sets))
    return InfiniteLoader(
        dataset, batch_size, seed=seed, rank=accelerator.process_index, world_size=accelerator.num_processes,
        num_workers=num_workers,
    )


class TwoAFCModel(nn.Module):
    """LPIPS + ranking head over a triplet: forward(ref, p0, p1) -> d0 (B,), d1 (B,), logits (B,)."""

    def __init__(self, lpips: LPIPS, head: RankingHead):
        super().__init__()
        self.lpips = lpips
        self.head = head

    def forward(self, ref: torch.Tensor, p0: torch.Tensor, p1: torch.Tensor):
        feats = self.lpips.features(torch.cat([ref, p0, p1], dim=0))  # one trunk pass over (3B, 3, H, W)
        f_ref, f0, f1 = zip(*(f.chunk(3, dim=0) for f in feats))
        d0 = self.lpips.distance_from_features(list(f_ref), list(f0))
        d1 = self.lpips.distance_from_features(list(f_ref), list(f1))
        return d0, d1, self.head(d0, d1)


def build_lpips(use_dropout: bool, pretrained_backbone: bool, train_backbone: bool) -> LPIPS:
    """A fresh LPIPS: ImageNet trunk when asked (local file only), trunk frozen unless train_backbone."""
    model = LPIPS(use_dropout=use_dropout)
    if pretrained_backbone:
        load_imagenet_trunk(model)
    model.set_trunk_trainable(train_backbone)
    model.clamp_weights()  # start from a valid (non-negative) metric
    return model


def build_adam(model: nn.Module, lr: float) -> torch.optim.Adam:
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.5, 0.999))


def lr_factor(step: int, total_steps: int, decay_steps: int) -> float:
    """1 until the last `decay_steps` steps, then linear to 0 at `total_steps`."""
    if decay_steps <= 0:
        return 1.0
    return min(1.0, max(0.0, (total_steps - step) / decay_steps))


def build_scheduler(optimizer, total_steps: int, decay_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, decay_steps))


def train_step(accelerator, model, batch: dict, optimizer, scheduler, settings: LPIPSTrainSettings) -> dict:
    """One update; returns {'loss', 'agreement'} as floats (skips the update when the loss is not finite)."""
    ref, p0, p1 = (to_minus_one_to_one(batch[k].to(accelerator.device), settings.img_range) for k in ("ref", "p0", "p1"))
    judge = batch["judge"].to(accelerator.device)  # (B,)
    with accelerator.autocast():
        d0, d1, logits = model(ref, p0, p1)
    loss = ranking_loss(logits, judge)
    finite = bool(torch.isfinite(accelerator.gather(loss.detach()[None])).all())  # same decision on every rank
    if finite:
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    accelerator.unwrap_model(model).lpips.clamp_weights()
    agreement = two_afc_scores(d0.detach(), d1.detach(), judge).mean()
    return {"loss": loss.item(), "agreement": agreement.item(), "finite": finite}


def train_lpips(
    accelerator, model, optimizer, scheduler, loader, settings: LPIPSTrainSettings, checkpoint_path: Path, info: dict,
    metrics=None,
) -> list[float]:
    """Run num_epochs epochs over `loader` (an InfiniteLoader); save the checkpoint after every epoch.

    `metrics` (a MetricsLog) receives loss, train_2afc, lr and skipped_steps every logging_steps, and
    epoch_loss at the end of every epoch. Returns the mean training loss of each epoch.
    """
    per_epoch = loader.batches_per_epoch
    total = settings.num_epochs * per_epoch
    bar = progress_bar(accelerator, total, 0, "lpips")
    sums = {"loss": 0.0, "agreement": 0.0, "n": 0}
    epoch_losses, epoch_sum, skipped = [], 0.0, 0
    for step, batch in zip(range(1, total + 1), loader):
        out = train_step(accelerator, model, batch, optimizer, scheduler, settings)
        skipped += not out["finite"]
        if out["finite"]:
            sums["loss"] += out["loss"]
            sums["agreement"] += out["agreement"]
            sums["n"] += 1
            epoch_sum += out["loss"]
        bar.update(1)
        bar.set_postfix(loss=f"{out['loss']:.4f}", epoch=math.ceil(step / per_epoch))
        if step % settings.logging_steps == 0 and sums["n"]:
            logged = {"loss": sums["loss"] / sums["n"], "train_2afc": sums["agreement"] / sums["n"],
                      "lr": scheduler.get_last_lr()[0], "skipped_steps": skipped}
            logger.info(
                "step %d/%d  epoch %d  loss %.4f  train 2AFC %.3f  lr %.2e  skipped %d",
                step, total, math.ceil(step / per_epoch), *logged.values(),
            )
            if metrics is not None:
                metrics.log(logged, step)
            sums = {"loss": 0.0, "agreement": 0.0, "n": 0}
        if step % per_epoch == 0:
            epoch_losses.append(epoch_sum / per_epoch)
            epoch_sum = 0.0
            if metrics is not None:
                metrics.log({"epoch_loss": epoch_losses[-1]}, step)
            save_epoch_checkpoint(accelerator, model, checkpoint_path, {**info, "epochs_done": step // per_epoch})
    bar.close()
    return epoch_losses


def save_epoch_checkpoint(accelerator, model, path: Path, info: dict) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        save_lpips_checkpoint(path, unwrapped.lpips, unwrapped.head, info)
    accelerator.wait_for_everyone()
