"""The pieces of stage1_vae_trainer.py: configs, models, one training step, validation grids, saving.

One generator step = one optimizer update of the autoencoder (and, from disc_start on, of the
discriminator), made of gradient_accumulation_steps micro-batches. Randomness that shapes the weights comes
from generators whose states are checkpointed (flips, posterior noise), and batches are a pure function of
(seed, step), so a resumed run reproduces an uninterrupted one exactly on CPU.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from accelerate import Accelerator

from ..config import ModelConfig, Stage1TrainConfig, load_config, load_model_config, to_dict
from ..data import build_dataset
from ..data.transforms import random_flip
from ..losses.autoencoder import AutoencoderLoss
from ..losses.perceptual import build_perceptual_loss
from ..models.discriminator import build_discriminator, sync_batchnorm_if_distributed
from ..models.serialization import save_models
from ..models.vae import Autoencoder, build_autoencoder
from .checkpoint import load_checkpoint, resolve_resume_path, save_checkpoint
from .guard import NonFiniteGuard
from .images import save_image_grid
from .setup import build_optimizer, build_scheduler
from .trackers import log_image

logger = logging.getLogger("ldm.stage1")

LOG_EVERY = 10  # metrics are averaged over this many steps before they are logged


def load_stage1_configs(training_config: str, model_config: str) -> tuple[Stage1TrainConfig, ModelConfig]:
    """Both YAML files, strictly typed; the training config's `quantize` (when set) overrides ldm.yaml's."""
    train_cfg = load_config(training_config, Stage1TrainConfig)
    model_cfg = load_model_config(model_config)
    if train_cfg.quantize is not None:
        model_cfg = dataclasses.replace(model_cfg, vae=dataclasses.replace(model_cfg.vae, quantize=train_cfg.quantize))
    return train_cfg, model_cfg


@dataclass
class Stage1State:
    """Everything the loop updates; `modules()` / `states()` are what a checkpoint holds."""

    vae: nn.Module  # prepared (DDP-wrapped when distributed)
    disc: Optional[nn.Module]
    opt_g: torch.optim.Optimizer
    opt_d: Optional[torch.optim.Optimizer]
    sched_g: object
    sched_d: Optional[object]
    flip_gen: torch.Generator
    noise_gen: torch.Generator
    step: int = 0
    skipped_files: int = 0

    def modules(self, accelerator: Accelerator) -> dict[str, nn.Module]:
        mods = {"vae": accelerator.unwrap_model(self.vae)}
        if self.disc is not None:
            mods["discriminator"] = accelerator.unwrap_model(self.disc)
        return mods

    def states(self) -> dict[str, object]:
        out = {"optimizer": self.opt_g, "scheduler": self.sched_g}
        if self.disc is not None:
            out.update(disc_optimizer=self.opt_d, disc_scheduler=self.sched_d)
        return out

    def generators(self) -> dict[str, torch.Generator]:
        return {"flip": self.flip_gen, "noise": self.noise_gen}


def build_stage1(
    accelerator: Accelerator, model_cfg: ModelConfig, cfg: Stage1TrainConfig
) -> tuple[Stage1State, AutoencoderLoss]:
    """Models, optimisers and LR schedules (prepared), plus the loss with its frozen perceptual network."""
    perceptual = build_perceptual_loss(cfg)  # first: a missing weights file stops the run before the big models
    if perceptual is not None:
        perceptual = perceptual.to(accelerator.device)
    loss_fn = AutoencoderLoss(cfg, perceptual)
    vae = build_autoencoder(model_cfg.vae)
    disc = None
    if cfg.use_patchgan:
        disc = sync_batchnorm_if_distributed(build_discriminator(cfg), accelerator.num_processes, accelerator.device)
    total = cfg.total_training_iterations
    opt_g = build_optimizer(vae.parameters(), cfg)
    sched_g = build_scheduler(cfg.lr_scheduler, opt_g, cfg.lr_warmup_steps, total)
    opt_d = sched_d = None
    if disc is not None:
        opt_d = build_optimizer(disc.parameters(), cfg, lr=cfg.disc_learning_rate)
        sched_d = build_scheduler(cfg.disc_lr_scheduler, opt_d, cfg.disc_lr_warmup_steps, max(1, total - cfg.disc_start))
        vae, disc, opt_g, opt_d = accelerator.prepare(vae, disc, opt_g, opt_d)
    else:
        vae, opt_g = accelerator.prepare(vae, opt_g)
    rank_seed = cfg.seed + accelerator.process_index
    flip_gen = torch.Generator().manual_seed(rank_seed)
    noise_gen = torch.Generator(device=accelerator.device).manual_seed(rank_seed)
    # schedulers are stepped by hand once per optimizer update (accelerate's would step once per process)
    state = Stage1State(vae, disc, opt_g, opt_d, sched_g, sched_d, flip_gen, noise_gen)
    n_params = sum(p.numel() for p in vae.parameters())
    logger.info("autoencoder: %.2fM parameters, latent %s", n_params / 1e6, latent_shape(model_cfg))
    return state, loss_fn


def latent_shape(model_cfg: ModelConfig) -> str:
    v = model_cfg.vae
    return f"{v.latent_dim}x{v.latent_size}x{v.latent_size}" + (" (VQ)" if v.quantize else "")


def maybe_resume(accelerator: Accelerator, state: Stage1State, working_dir, resume: Optional[str]) -> None:
    path = resolve_resume_path(working_dir, resume)
    if path is None:
        if resume:
            logger.info("no checkpoint in %s yet: starting from step 0", working_dir)
        return
    info = load_checkpoint(accelerator, path, state.modules(accelerator), state.states(), state.generators())
    state.step = int(info["step"])
    state.skipped_files = int(info.get("skipped_files", 0))
    logger.info("resumed from %s at step %d", path, state.step)


def build_stage1_dataset(args, model_cfg: ModelConfig, cfg: Stage1TrainConfig):
    return build_dataset(args.dataset, args.path_to_dataset, model_cfg.vae.img_size, cfg)


# --------------------------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------------------------


def all_finite(accelerator: Accelerator, loss: torch.Tensor) -> torch.Tensor:
    """The loss of every process (so all of them skip a step together when one is not finite)."""
    return accelerator.gather(loss.detach().float().reshape(1))


def micro_step(
    accelerator: Accelerator,
    state: Stage1State,
    loss_fn: AutoencoderLoss,
    guard: NonFiniteGuard,
    images: torch.Tensor,
    cfg: Stage1TrainConfig,
) -> Optional[dict[str, torch.Tensor]]:
    """Forward, loss and backward on one micro-batch; optimiser updates when gradients sync. None: skipped."""
    vae_module: Autoencoder = accelerator.unwrap_model(state.vae)
    disc_module = accelerator.unwrap_model(state.disc) if state.disc is not None else None
    x = random_flip(images, cfg.random_flip_p, state.flip_gen)  # (B, 3, H, W)
    models = [m for m in (state.vae, state.disc) if m is not None]
    with accelerator.accumulate(*models):
        with accelerator.autocast():
            out = state.vae(x, generator=state.noise_gen)
            loss, logs = loss_fn.generator_loss(x, out, disc_module, vae_module.last_layer(), state.step)
        if not guard.check(all_finite(accelerator, loss), state.step):
            zero_grads(state)
            return None
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            logs["grad_norm"] = accelerator.clip_grad_norm_(state.vae.parameters(), cfg.max_grad_norm)
            state.opt_g.step()
            state.sched_g.step()
            state.opt_g.zero_grad(set_to_none=True)
            logs["lr"] = torch.tensor(state.sched_g.get_last_lr()[0])
        if state.disc is not None and loss_fn.disc_active(state.step):
            logs.update(disc_update(accelerator, state, loss_fn, x, out.reconstruction, cfg))
    return logs


def disc_update(accelerator, state: Stage1State, loss_fn: AutoencoderLoss, x, x_hat, cfg) -> dict:
    with accelerator.autocast():
        d_loss, logs = loss_fn.discriminator_loss(state.disc, x, x_hat.detach())
    accelerator.backward(d_loss)
    if accelerator.sync_gradients:
        accelerator.clip_grad_norm_(state.disc.parameters(), cfg.max_grad_norm)
        state.opt_d.step()
        state.sched_d.step()
        state.opt_d.zero_grad(set_to_none=True)
        logs["disc_lr"] = torch.tensor(state.sched_d.get_last_lr()[0])
    return logs


def zero_grads(state: Stage1State) -> None:
    state.opt_g.zero_grad(set_to_none=True)
    if state.opt_d is not None:
        state.opt_d.zero_grad(set_to_none=True)


class RunningMean:
    """Averages logged scalars over the steps since the last `pop`."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, logs: dict) -> None:
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1

    def pop(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.counts[k] for k in self.sums}
        self.sums, self.counts = {}, {}
        return out


# --------------------------------------------------------------------------------------------------------------
# Validation, checkpoints, final model
# --------------------------------------------------------------------------------------------------------------


def validation_images(dataset, n: int, seed: int) -> torch.Tensor:
    """n readable images picked at random (fixed by `seed`) from the dataset: (n, 3, H, W)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + 12345)).tolist()
    images = []
    for index in order:
        item = dataset[index]
        if item is not None:
            images.append(item["image"])
        if len(images) == n:
            break
    if not images:
        raise ValueError("no readable image in the dataset for validation grids")
    return torch.stack(images)


@torch.no_grad()
def save_reconstruction_grid(vae: Autoencoder, images: torch.Tensor, path) -> Path:
    """PNG grid: originals on the top row, reconstructions (posterior mode / quantised) below."""
    was_training = vae.training
    vae.eval()
    device = next(vae.parameters()).device
    x = images.to(device)
    recon = vae(x, sample=False).reconstruction.float().clamp(-1, 1)  # (n, 3, H, W)
    vae.train(was_training)
    return save_image_grid(torch.cat([x.float(), recon]), path, nrow=x.shape[0])


def save_training_checkpoint(accelerator: Accelerator, state: Stage1State, working_dir, cfg: Stage1TrainConfig) -> Path:
    return save_checkpoint(
        accelerator,
        working_dir,
        state.step,
        state.modules(accelerator),
        state.states(),
        state.generators(),
        extra={"skipped_files": state.skipped_files},
        limit=cfg.checkpoints_total_limit,
    )


def save_final_model(accelerator: Accelerator, state: Stage1State, args, model_cfg, train_cfg) -> Optional[Path]:
    """working_directory/model.safetensors: the autoencoder with the resolved configs in its metadata."""
    if not accelerator.is_main_process:
        return None
    meta = {
        "model_config": to_dict(model_cfg),
        "training_config": to_dict(train_cfg),
        "dataset": args.dataset,
        "stage": 1,
        "step": state.step,
    }
    return save_models(Path(args.working_directory) / "model.safetensors", {"vae": accelerator.unwrap_model(state.vae)}, meta)


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------


def train_stage1(accelerator: Accelerator, args, state: Stage1State, loss_fn: AutoencoderLoss, dataset, cfg) -> None:
    """Run generator steps until total_training_iterations, logging, saving grids and checkpoints on the way."""
    from ..data.loader import InfiniteLoader
    from .setup import MetricsLog, progress_bar

    accum = cfg.gradient_accumulation_steps
    loader = InfiniteLoader(
        dataset, cfg.per_gpu_batch_size, cfg.seed, accelerator.process_index, accelerator.num_processes,
        cfg.num_workers, cfg.pin_memory, start_batch=state.step * accum,
    )
    batches = iter(loader)
    skipped_before = state.skipped_files
    guard = NonFiniteGuard(cfg.max_nonfinite_steps)
    metrics, window = MetricsLog(accelerator, args.working_directory), RunningMean()
    gens_dir = Path(args.path_to_save_gens or Path(args.working_directory) / "gens")
    val_images = validation_images(dataset, cfg.num_val_random_samples, cfg.seed) if accelerator.is_main_process else None
    total = cfg.total_training_iterations
    bar = progress_bar(accelerator, total, state.step, "stage 1")
    while state.step < total:
        for _ in range(accum):
            batch = next(batches)
            logs = micro_step(accelerator, state, loss_fn, guard, batch["image"].to(accelerator.device), cfg)
            if logs is not None:
                window.add(logs)
        state.step += 1
        state.skipped_files = skipped_before + loader.num_skipped
        bar.update(1)
        if logs is not None:
            shown = ("rec_loss", "lpips_loss", "disc_loss") if loss_fn.perceptual is not None else ("rec_loss", "disc_loss")
            bar.set_postfix({k: f"{float(logs[k]):.4f}" for k in shown if k in logs})
        end = state.step == total
        if state.step % LOG_EVERY == 0 or end:
            metrics.log({**window.pop(), "skipped_files": state.skipped_files}, state.step)
        if accelerator.is_main_process and (state.step % cfg.val_generation_freq == 0 or end):
            grid = save_reconstruction_grid(accelerator.unwrap_model(state.vae), val_images, gens_dir / f"step_{state.step:07d}.png")
            log_image(accelerator, "reconstructions", grid, state.step)
        if state.step % cfg.checkpoint_iterations == 0 or end:
            save_training_checkpoint(accelerator, state, args.working_directory, cfg)
    bar.close()
    report_skipped(accelerator, state.skipped_files)
    if accelerator.is_main_process:
        logger.info("reconstruction grids (originals above reconstructions) are in %s", gens_dir.resolve())


def report_skipped(accelerator: Accelerator, skipped: int) -> None:
    total = int(accelerator.reduce(torch.tensor([skipped], device=accelerator.device), reduction="sum").item())
    if total:
        logger.warning("skipped %d unreadable image(s) during training (see the warnings above for the files)", total)
    else:
        logger.info("skipped 0 unreadable images")
