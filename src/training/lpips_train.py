"""Training LPIPS on BAPPS 2AFC triplets (Zhang et al. 2018, Sec. 3.3), as lpips_trainer.py runs it.

Per step: one trunk pass over (ref, p0, p1), distances d0 = d(ref, p0), d1 = d(ref, p1) (Eq. 1), the ranking
head's logit of "p1 preferred", BCE against the judge fraction; Adam (betas 0.5, 0.999), gradients clipped
to norm 1, then the linear layers clamped to >= 0. The rate is constant for num_epochs - decay_epochs epochs,
then falls linearly to zero. The step never waits for the host: a non-finite loss skips the fused Adam's update on
the device, and the logged sums stay on the device until a log step or an epoch's end. SIGTERM / SIGUSR1 stop
the loop after its step with a training checkpoint, from which --resume_from_checkpoint continues exactly.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..data.bapps import TwoAFCDataset, to_minus_one_to_one
from ..data.loader import InfiniteLoader
from ..losses.ranking import RankingHead, ranking_loss
from ..models.lpips import LPIPS, load_imagenet_trunk, save_lpips_checkpoint
from .lpips_eval import two_afc_scores
from .optim import optimizer_step_unless, with_fused_kernel
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
    """Adam (betas 0.5, 0.999), fused: one kernel for every parameter, and a non-finite step skipped on the device."""
    params = [p for p in model.parameters() if p.requires_grad]
    return with_fused_kernel(lambda fused: torch.optim.Adam(params, lr=lr, betas=(0.5, 0.999), fused=fused))


def lr_factor(step: int, total_steps: int, decay_steps: int) -> float:
    """1 until the last `decay_steps` steps, then linear to 0 at `total_steps`."""
    if decay_steps <= 0:
        return 1.0
    return min(1.0, max(0.0, (total_steps - step) / decay_steps))


class ConfiguredLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR whose base rate is this run's --initial_lr: a checkpoint restores where the schedule is (its step
    count), not the rate of the run that wrote it, as stage 1 and 2's schedules (optim.LRSchedule) do."""

    def load_state_dict(self, state_dict: dict) -> None:
        """Call after the optimizer's load_state_dict (which puts back the stored rates)."""
        base_lrs = list(self.base_lrs)
        super().load_state_dict(state_dict)
        self.base_lrs = base_lrs
        self._last_lr = [base * f(self.last_epoch) for base, f in zip(base_lrs, self.lr_lambdas)]
        for group, base, lr in zip(self.optimizer.param_groups, base_lrs, self._last_lr):
            group["initial_lr"], group["lr"] = base, lr


def build_scheduler(optimizer, total_steps: int, decay_steps: int):
    return ConfiguredLambdaLR(optimizer, lambda step: lr_factor(step, total_steps, decay_steps))


def train_step(accelerator, model, batch: dict, optimizer, scheduler, settings: LPIPSTrainSettings) -> dict:
    """One update, without a host sync. Returns () device tensors, each the mean over the processes' batches (the
    same on every process): 'loss', 'agreement' (train 2AFC) and 'finite' (bool): a step whose loss is not finite
    on any process changes no weight and no Adam state."""
    ref, p0, p1 = (to_minus_one_to_one(batch[k].to(accelerator.device), settings.img_range) for k in ("ref", "p0", "p1"))
    judge = batch["judge"].to(accelerator.device)  # (B,)
    with accelerator.autocast():
        d0, d1, logits = model(ref, p0, p1)
    loss = ranking_loss(logits, judge)
    agreement = two_afc_scores(d0.detach(), d1.detach(), judge).mean()
    per_process = accelerator.gather(torch.stack([loss.detach().float(), agreement])[None])  # (processes, 2)
    finite = torch.isfinite(per_process[:, 0]).all()  # () bool, the same on every rank
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
    if accelerator.scaler is not None:  # fp16: the scaler finds the non-finite gradients and skips the step
        optimizer.step()
    else:  # the fused Adam inside accelerate's wrapper skips on the device
        optimizer_step_unless(getattr(optimizer, "optimizer", optimizer), (~finite).float())
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    accelerator.unwrap_model(model).lpips.clamp_weights()
    loss_mean, agreement_mean = per_process.mean(0)  # every process's batch, as the logs and epoch losses say
    return {"loss": loss_mean, "agreement": agreement_mean, "finite": finite}


@dataclass
class LPIPSProgress:
    """The loop's counters: saved in training checkpoints (state.json), so a resumed run reports the same
    epoch losses as an uninterrupted one."""

    step: int = 0
    window_loss: float = 0.0  # sums since the last log line
    window_agreement: float = 0.0
    window_n: int = 0
    epoch_sum: float = 0.0
    epoch_n: int = 0  # kept (finite) steps of the current epoch: epoch_sum's count
    epoch_losses: list = field(default_factory=list)
    skipped: int = 0


class DeviceCounters:
    """LPIPSProgress's sums as float64 device tensors while training: each step adds to them without a host read;
    `read` copies them into the progress (one read) at log steps, epoch ends and checkpoints. float64 keeps the sums
    what Python's floats made of the float32 losses, and a resumed run restores them exactly."""

    KEYS = ("window_loss", "window_agreement", "window_n", "epoch_sum", "epoch_n", "skipped")
    COUNTS = ("window_n", "epoch_n", "skipped")

    def __init__(self, progress: LPIPSProgress, device):
        self.progress = progress
        self.sums = {k: torch.tensor(float(getattr(progress, k)), dtype=torch.float64, device=device)
                     for k in self.KEYS}

    @torch.no_grad()
    def add(self, out: dict) -> None:
        finite = out["finite"]
        loss = torch.where(finite, out["loss"].double(), 0.0)  # a skipped step adds nothing (not even a NaN)
        self.sums["window_loss"] += loss
        self.sums["epoch_sum"] += loss
        self.sums["epoch_n"] += finite.double()
        self.sums["window_agreement"] += torch.where(finite, out["agreement"].double(), 0.0)
        self.sums["window_n"] += finite.double()
        self.sums["skipped"] += (~finite).double()

    def read(self) -> LPIPSProgress:
        values = torch.stack([self.sums[k] for k in self.KEYS]).tolist()
        for key, value in zip(self.KEYS, values):
            setattr(self.progress, key, int(value) if key in self.COUNTS else value)
        return self.progress

    def reset(self, *keys: str) -> None:
        for key in keys:
            self.sums[key].zero_()
            setattr(self.progress, key, type(getattr(self.progress, key))(0))


def train_lpips(
    accelerator, model, optimizer, scheduler, loader, settings: LPIPSTrainSettings, checkpoint_path: Path, info: dict,
    progress: LPIPSProgress, work_dir: Path, metrics=None,
) -> bool:
    """Run num_epochs epochs over `loader` (an InfiniteLoader) from `progress.step`; after every epoch save the
    LPIPS checkpoint and a training checkpoint (work_dir/checkpoint_<step>, for --resume_from_checkpoint).
    `metrics` (a MetricsLog) receives loss, train_2afc, lr and skipped_steps every logging_steps, and epoch_loss
    at the end of every epoch.

    Returns True when training finished (the mean loss of each epoch is in progress.epoch_losses), False when
    SIGTERM / SIGUSR1 stopped it early after its current step and a training checkpoint.
    """
    from .preemption import GracefulStop

    per_epoch = loader.batches_per_epoch
    total = settings.num_epochs * per_epoch
    bar = progress_bar(accelerator, total, progress.step, "lpips")
    batches = iter(loader)
    counters = DeviceCounters(progress, accelerator.device)
    with GracefulStop() as stop:
        while progress.step < total:
            progress.step += 1
            step = progress.step
            counters.add(train_step(accelerator, model, next(batches), optimizer, scheduler, settings))
            bar.update(1)
            log_step = step % settings.logging_steps == 0
            epoch_end = step % per_epoch == 0
            synced = log_step or epoch_end
            if synced:
                counters.read()  # the host reads the device's sums here only (and before a stop's checkpoint)
            if log_step and progress.window_n:
                bar.set_postfix(loss=f"{progress.window_loss / progress.window_n:.4f}", epoch=math.ceil(step / per_epoch))
                log_window(progress, total, per_epoch, scheduler, metrics)
                counters.reset("window_loss", "window_agreement", "window_n")
            if epoch_end:
                # the mean over the epoch's kept steps (a skipped step's loss is no number)
                progress.epoch_losses.append(progress.epoch_sum / progress.epoch_n if progress.epoch_n else math.nan)
                counters.reset("epoch_sum", "epoch_n")
                if metrics is not None:
                    metrics.log({"epoch_loss": progress.epoch_losses[-1]}, step)
                save_epoch_checkpoint(accelerator, model, checkpoint_path, {**info, "epochs_done": step // per_epoch})
            # one process alone decides between sync points; several agree at log steps and epoch ends
            stopping = stop.should_stop(accelerator, sync_point=synced)
            if stopping and not synced:
                counters.read()
            if epoch_end or stopping:
                path = save_training_state(accelerator, model, optimizer, scheduler, progress, work_dir,
                                           loader.batches_seen, loader.batch_size)
            if stopping and step < total:
                bar.close()
                stop.report(step, total, path)
                return False
    bar.close()
    return True


def log_window(progress: LPIPSProgress, total: int, per_epoch: int, scheduler, metrics=None) -> None:
    """The log line of the steps since the last one (and the same values to metrics.jsonl / the trackers)."""
    n = progress.window_n
    logged = {"loss": progress.window_loss / n, "train_2afc": progress.window_agreement / n,
              "lr": rate_used(scheduler, progress.step), "skipped_steps": progress.skipped}
    logger.info(
        "step %d/%d  epoch %d  loss %.4f  train 2AFC %.3f  lr %.2e  skipped %d",
        progress.step, total, math.ceil(progress.step / per_epoch), *logged.values(),
    )
    if metrics is not None:
        metrics.log(logged, progress.step)


def rate_used(scheduler, step: int) -> float:
    """The learning rate of optimizer step `step` (1-based): the LambdaLR's rate before that step's scheduler.step()
    (get_last_lr() after it is the next step's)."""
    return scheduler.base_lrs[0] * scheduler.lr_lambdas[0](step - 1)


def save_training_state(accelerator, model, optimizer, scheduler, progress: LPIPSProgress, work_dir: Path,
                        loader_position: int, batch_size: int) -> Path:
    """work_dir/checkpoint_<step>: model, Adam and schedule states, RNG, the loop's counters, the loader's
    position and the data layout (2 kept)."""
    from .checkpoint import data_layout, save_checkpoint

    extra = {k: v for k, v in asdict(progress).items() if k != "step"}
    extra["data_layout"] = data_layout(accelerator, batch_size)
    states = {"optimizer": optimizer, "scheduler": scheduler}
    if accelerator.scaler is not None:  # fp16: accelerate's loss scaler, so that the resume keeps its scale
        states["grad_scaler"] = accelerator.scaler
    return save_checkpoint(
        accelerator, work_dir, progress.step, {"model": accelerator.unwrap_model(model)},
        states, extra=extra, limit=2, loader_position=loader_position,
    )


def resume_training_state(accelerator, model, optimizer, scheduler, loader, work_dir: Path, resume) -> LPIPSProgress:
    """--resume_from_checkpoint (None, 'latest' or a checkpoint folder): the restored counters, or fresh ones; the
    `loader` (an InfiniteLoader) continues where it was, skipping the batches already trained without loading them."""
    from .checkpoint import check_data_layout, data_layout, load_checkpoint, resolve_resume_path, saved_loader_position

    path = resolve_resume_path(work_dir, resume, accelerator)
    if path is None:
        if resume:
            logger.info("no checkpoint in %s yet: starting from step 0", work_dir)
        return LPIPSProgress()
    states = {"optimizer": optimizer, "scheduler": scheduler}
    if accelerator.scaler is not None and (Path(path) / "grad_scaler.pt").is_file():  # written by an fp16 run
        states["grad_scaler"] = accelerator.scaler
    info = load_checkpoint(accelerator, path, {"model": accelerator.unwrap_model(model)}, states)
    for group in optimizer.param_groups:  # a checkpoint of an unfused Adam: this run's fused kernel goes on
        group["fused"] = optimizer.defaults.get("fused")
    check_data_layout(info, data_layout(accelerator, loader.batch_size), path)  # another --batch_size: a warning
    loader.batches_seen = saved_loader_position(info, info["step"])  # one batch per step
    info.setdefault("epoch_n", info["step"] % loader.batches_per_epoch)  # a checkpoint from before the count
    logger.info("resumed from %s at step %d", path, info["step"])
    return LPIPSProgress(**{k: v for k, v in info.items() if k not in ("loader_position", "data_layout")})


def save_epoch_checkpoint(accelerator, model, path: Path, info: dict) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        save_lpips_checkpoint(path, unwrapped.lpips, unwrapped.head, info)
    accelerator.wait_for_everyone()
