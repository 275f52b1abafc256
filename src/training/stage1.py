"""The pieces of stage1_vae_trainer.py: configs, models, one training step, validation grids, saving.

One generator step = one optimizer update of the autoencoder (and, from disc_start on, of the
discriminator), made of gradient_accumulation_steps micro-batches; a step with a non-finite loss or gradient
is skipped as a whole (guard.py, optim.py). Randomness that shapes the weights comes from generators whose
states are checkpointed (flips, posterior noise), and batches are a pure function of (seed, step), so a
resumed run reproduces an uninterrupted one exactly on CPU.
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

from ..config import ConfigError, ModelConfig, Stage1TrainConfig, load_config, load_model_config, to_dict
from ..data import build_dataset
from ..data.transforms import random_flip
from ..losses.autoencoder import AutoencoderLoss
from ..losses.perceptual import build_perceptual_loss
from ..models.discriminator import build_discriminator, patch_map_size, sync_batchnorm_if_distributed
from ..models.serialization import save_models
from ..models.vae import Autoencoder, build_autoencoder
from .checkpoint import data_layout, load_checkpoint, resolve_resume_path, resumed_loader_position, save_checkpoint
from .guard import ForwardState, NonFiniteGuard, any_process, nonfinite_flags
from .images import save_image_grid
from .metrics import MetricWindow, mean_over
from .optim import Trainable, guarded_update
from .performance import attention_kernels, compile_autoencoder, compile_in_place, mark_step, to_memory_format
from .precision import MixedPrecision
from .setup import build_trainable, every, gradient_sync, step_events
from .trackers import log_image

logger = logging.getLogger("ldm.stage1")


def load_stage1_configs(training_config: str, model_config: str) -> tuple[Stage1TrainConfig, ModelConfig]:
    """Both YAML files, strictly typed; the training config's `quantize` (when set) overrides ldm.yaml's."""
    train_cfg = load_config(training_config, Stage1TrainConfig)
    model_cfg = load_model_config(model_config)
    if train_cfg.quantize is not None:
        model_cfg = dataclasses.replace(model_cfg, vae=dataclasses.replace(model_cfg.vae, quantize=train_cfg.quantize))
    check_discriminator_fits(train_cfg, model_cfg, training_config)
    return train_cfg, model_cfg


def check_discriminator_fits(train_cfg: Stage1TrainConfig, model_cfg: ModelConfig, source) -> None:
    """A PatchGAN too deep (or with too large a kernel) for vae.img_size would fail only at disc_start, possibly
    hours into the run: stop before any model is built instead."""
    if not train_cfg.use_patchgan:
        return
    size, depth, kernel = model_cfg.vae.img_size, train_cfg.disc_depth, train_cfg.disc_kernel_size
    if patch_map_size(size, depth, kernel) < 1:
        fits = max((d for d in range(1, depth) if patch_map_size(size, d, kernel) >= 1), default=None)
        hint = f"disc_depth {fits} fits" if fits else "no disc_depth fits this disc_kernel_size"
        raise ConfigError(
            f"{source}: key 'disc_depth' {depth} (disc_kernel_size {kernel}) downsamples vae.img_size {size} images "
            f"below the discriminator's kernel; {hint}"
        )


@dataclass
class Stage1State:
    """Everything the loop updates; `modules()` / `states()` are what a checkpoint holds."""

    vae: nn.Module  # prepared (DDP-wrapped when distributed)
    disc: Optional[nn.Module]
    vae_opt: Trainable
    disc_opt: Optional[Trainable]
    precision: MixedPrecision
    guard: NonFiniteGuard
    forward_state: ForwardState  # BatchNorm statistics and VQ codebook, put back when a step is skipped
    flip_gen: torch.Generator
    noise_gen: torch.Generator
    # the modules inside accelerate's wrappers, unwrapped once: unwrap_model looks packages up on disk at every call
    vae_module: Autoencoder = dataclasses.field(init=False, repr=False)
    disc_module: Optional[nn.Module] = dataclasses.field(init=False, repr=False)
    step: int = 0
    skipped_files: int = 0  # this process's unreadable files; summed over processes, the run's
    loader_position: int = 0  # batches this process's loader handed out, unreadable ones included

    def __post_init__(self):
        from accelerate.utils import extract_model_from_parallel

        self.vae_module = extract_model_from_parallel(self.vae)
        self.disc_module = extract_model_from_parallel(self.disc) if self.disc is not None else None

    def modules(self) -> dict[str, nn.Module]:
        mods = {"vae": self.vae_module}
        if self.disc_module is not None:
            mods["discriminator"] = self.disc_module
        return mods

    def states(self) -> dict[str, object]:
        """Loaded in this order: each optimizer before its schedule (which re-binds the optimizer's lr)."""
        out = {"optimizer": self.vae_opt.optimizer, "scheduler": self.vae_opt.schedule}
        if self.disc is not None:
            out.update(disc_optimizer=self.disc_opt.optimizer, disc_scheduler=self.disc_opt.schedule)
        out.update(grad_scaler=self.precision, guard=self.guard)
        return out

    def generators(self) -> dict[str, torch.Generator]:
        return {"flip": self.flip_gen, "noise": self.noise_gen}


LOSS_TERMS = ("loss", "rec_loss", "lpips_loss", "kl_loss", "vq_loss", "gen_loss", "adaptive_weight", "disc_loss")
GRAD_TERMS = ("grad_norm/autoencoder", "grad_norm/discriminator")


def build_stage1(
    accelerator: Accelerator, model_cfg: ModelConfig, cfg: Stage1TrainConfig
) -> tuple[Stage1State, AutoencoderLoss]:
    """Models, optimisers and LR schedules (models prepared), plus the loss with its frozen perceptual network."""
    device = accelerator.device
    perceptual = build_perceptual_loss(cfg)  # first: a missing weights file stops the run before the big models
    if perceptual is not None:
        perceptual = compile_in_place(to_memory_format(perceptual.to(device), cfg), cfg)
    loss_fn = AutoencoderLoss(cfg, perceptual)
    vae = to_memory_format(build_autoencoder(model_cfg.vae).to(device), cfg)
    total = cfg.total_training_iterations
    vae_opt = build_trainable("autoencoder", vae, cfg, device, cfg.learning_rate, (cfg.adam_beta1, cfg.adam_beta2),
                              cfg.weight_decay, cfg.lr_scheduler, cfg.lr_warmup_steps, total)
    disc = disc_opt = None
    if cfg.use_patchgan:
        disc = sync_batchnorm_if_distributed(build_discriminator(cfg), accelerator.num_processes, device).to(device)
        disc = to_memory_format(disc, cfg)
        disc_opt = build_trainable(
            "discriminator", disc, cfg, device, cfg.disc_learning_rate, (cfg.disc_adam_beta1, cfg.disc_adam_beta2),
            cfg.disc_weight_decay, cfg.disc_lr_scheduler, cfg.disc_lr_warmup_steps, max(1, total - cfg.disc_start),
        )
    forward_state = ForwardState([m for m in (vae, disc) if m is not None])
    compile_autoencoder(vae, cfg)  # in place: every block but the decoder's output layer (the adaptive weight's)
    compile_in_place(disc, cfg)
    vae = accelerator.prepare(vae)
    if disc is not None:
        disc = accelerator.prepare(disc)
    rank_seed = cfg.seed + accelerator.process_index
    flip_gen = torch.Generator(device=device).manual_seed(rank_seed + 1_000_003)  # its own stream, on the device
    noise_gen = torch.Generator(device=device).manual_seed(rank_seed)
    guard = NonFiniteGuard(LOSS_TERMS + GRAD_TERMS, cfg.max_nonfinite_steps, device)
    precision = MixedPrecision.from_accelerator(accelerator)
    state = Stage1State(vae, disc, vae_opt, disc_opt, precision, guard, forward_state, flip_gen, noise_gen)
    n_params = sum(p.numel() for p in vae.parameters())
    logger.info("autoencoder: %.2fM parameters, latent %s, mixed precision %s", n_params / 1e6,
                latent_shape(model_cfg), precision.mode)
    return state, loss_fn


def latent_shape(model_cfg: ModelConfig) -> str:
    v = model_cfg.vae
    return f"{v.latent_dim}x{v.latent_size}x{v.latent_size}" + (" (VQ)" if v.quantize else "")


def maybe_resume(
    accelerator: Accelerator, state: Stage1State, working_dir, resume: Optional[str], cfg: Stage1TrainConfig
) -> None:
    """--resume_from_checkpoint: restore every state of the run, its step and its data position."""
    path = resolve_resume_path(working_dir, resume, accelerator)
    if path is None:
        if resume:
            logger.info("no checkpoint in %s yet: starting from step 0", working_dir)
        return
    modules, states = state.modules(), state.states()
    fresh_disc = "discriminator" in modules and not (path / "discriminator.safetensors").is_file()
    if fresh_disc:  # use_patchgan turned on for the resume: a new PatchGAN, optimizer and LR schedule, as at disc_start
        del modules["discriminator"], states["disc_optimizer"], states["disc_scheduler"]
    info = load_checkpoint(accelerator, path, modules, states, state.generators())
    state.step = int(info["step"])
    if fresh_disc:
        logger.warning("%s was written without a PatchGAN (use_patchgan was False): the discriminator starts fresh "
                       "at step %d and trains from step %d on (disc_start)", path, state.step,
                       max(state.step, cfg.disc_start))
    # state.json holds the count over every process: the main process carries it on, the others start from 0
    state.skipped_files = int(info.get("skipped_files", 0)) if accelerator.is_main_process else 0
    state.loader_position = resumed_loader_position(accelerator, info, cfg, path)
    logger.info("resumed from %s at step %d", path, state.step)


def build_stage1_dataset(args, model_cfg: ModelConfig, cfg: Stage1TrainConfig):
    return build_dataset(args.dataset, args.path_to_dataset, model_cfg.vae.img_size, cfg)


# --------------------------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------------------------


def micro_batch(
    state: Stage1State, loss_fn: AutoencoderLoss, images: torch.Tensor, cfg: Stage1TrainConfig, gan: bool
) -> dict[str, torch.Tensor]:
    """Forward, losses and (scaled) backward of one micro-batch, generator then discriminator; returns the
    logged values as device tensors."""
    accum = cfg.gradient_accumulation_steps
    x = random_flip(images, cfg.random_flip_p, state.flip_gen)  # (B, 3, H, W)
    with state.precision.autocast(), attention_kernels(cfg.attention_backend):
        out = state.vae(x, generator=state.noise_gen)
        loss, logs = loss_fn.generator_loss(
            x, out, state.disc_module if gan else None, state.vae_module.last_layer(), state.step,
            state.precision.loss_scale(),
        )
    state.precision.backward(loss / accum)
    if gan:
        with state.precision.autocast():
            d_loss, d_logs = loss_fn.discriminator_loss(state.disc, x, out.reconstruction.detach())
        state.precision.backward(d_loss / accum)
        logs.update(d_logs)
    return logs


def train_step(
    accelerator: Accelerator, state: Stage1State, loss_fn: AutoencoderLoss, batches, cfg: Stage1TrainConfig
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One generator step: gradient_accumulation_steps micro-batches, then one update of the autoencoder and
    (from disc_start on) of the discriminator, both or neither (guard.py). Device ops only: returns the step's
    logged values and `skipped`, () bool."""
    device = accelerator.device
    accum = cfg.gradient_accumulation_steps
    gan = state.disc is not None and loss_fn.disc_active(state.step)
    models = [state.vae] + ([state.disc] if gan else [])
    state.forward_state.save()
    micro_logs = []
    for i in range(accum):
        mark_step()  # CUDA graphs (compile_mode: reduce-overhead): a new step begins, as in stage 2
        images = next(batches)["image"].to(device, non_blocking=True)
        with gradient_sync(accelerator, models, sync=i == accum - 1):
            micro_logs.append(micro_batch(state, loss_fn, images, cfg, gan))
    overflow = torch.zeros((), dtype=torch.bool, device=device)  # fp16: the adaptive weight's gradients overflowed
    for logs in micro_logs:
        overflow = overflow | logs.pop("grad_overflow", overflow)
    flags = torch.stack([nonfinite_flags(logs, LOSS_TERMS, device) for logs in micro_logs]).any(0)  # (terms,)
    flags = any_process(accelerator, torch.cat([flags, overflow[None]]))  # every process skips the same steps
    loss_flags, overflow = flags[:-1], flags[-1]
    units = [state.vae_opt] + ([state.disc_opt] if gan else [])
    skipped, grad_bad, norms = guarded_update(units, state.precision, loss_flags.any(), overflow)
    state.forward_state.restore_if(skipped)
    grad_flags = torch.cat([grad_bad, grad_bad.new_zeros(len(GRAD_TERMS) - len(units))])
    counted = loss_flags.any() | (grad_bad.any() & state.precision.gradient_skip_counts())  # not an fp16 overflow
    state.guard.record(state.step + 1, torch.cat([loss_flags, grad_flags]), skipped, counted)
    logs = mean_over(micro_logs)
    logs["grad_norm"] = norms[0]
    if gan:
        logs["disc_grad_norm"] = norms[1]
    return logs, skipped


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
        state.modules(),
        state.states(),
        state.generators(),
        extra={"skipped_files": files_skipped(accelerator, state.skipped_files),
               "data_layout": data_layout(accelerator, cfg.per_gpu_batch_size, cfg.gradient_accumulation_steps)},
        limit=cfg.checkpoints_total_limit,
        loader_position=state.loader_position,
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
    return save_models(Path(args.working_directory) / "model.safetensors", {"vae": state.vae_module}, meta)


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------


def train_stage1(accelerator: Accelerator, args, state: Stage1State, loss_fn: AutoencoderLoss, dataset, cfg) -> bool:
    """Run generator steps until total_training_iterations, logging, saving grids and checkpoints on the way.

    Returns True at the end of training, False when a stop signal (SIGTERM / SIGUSR1) ended the run early,
    after a checkpoint. Device values are read on the host only at log, checkpoint and stop steps.
    """
    from ..data.loader import InfiniteLoader
    from .preemption import GracefulStop
    from .setup import MetricsLog, progress_bar

    loader = InfiniteLoader(
        dataset, cfg.per_gpu_batch_size, cfg.seed, accelerator.process_index, accelerator.num_processes,
        cfg.num_workers, cfg.pin_memory, start_batch=state.loader_position,
    )
    batches = iter(loader)
    skipped_before = state.skipped_files
    metrics, window = MetricsLog(accelerator, args.working_directory, start_step=state.step), MetricWindow()
    gens_dir = Path(args.path_to_save_gens or Path(args.working_directory) / "gens")
    val_images = validation_images(dataset, cfg.num_val_random_samples, cfg.seed) if accelerator.is_main_process else None
    total = cfg.total_training_iterations
    bar = progress_bar(accelerator, total, state.step, "stage 1")
    with GracefulStop() as stop:
        while state.step < total:
            logs, skipped = train_step(accelerator, state, loss_fn, batches, cfg)
            window.add(logs, keep=~skipped)
            state.step += 1
            state.skipped_files = skipped_before + loader.num_skipped
            state.loader_position = loader.batches_seen
            bar.update(1)
            events = step_events(state.step, cfg, stop, accelerator)
            if events.log:
                log_step(accelerator, state, window, metrics, bar, loss_fn)
            if accelerator.is_main_process and (every(state.step, cfg.val_generation_freq) or
                                                (events.end and cfg.val_generation_freq)):
                grid = save_reconstruction_grid(state.vae_module, val_images, gens_dir / f"step_{state.step:07d}.png")
                log_image(accelerator, "reconstructions", grid, state.step)
            if events.checkpoint:
                path = save_training_checkpoint(accelerator, state, args.working_directory, cfg)
            if events.stop:
                bar.close()
                stop.report(state.step, total, path)
                return False
    bar.close()
    report_skipped(accelerator, files_skipped(accelerator, state.skipped_files))
    if accelerator.is_main_process:
        logger.info("reconstruction grids (originals above reconstructions) are in %s", gens_dir.resolve())
    return True


def log_step(accelerator, state: Stage1State, window: MetricWindow, metrics, bar, loss_fn: AutoencoderLoss) -> None:
    """The host reads of a log step: the guard's verdict, the window's means (over processes), the bar."""
    state.guard.check()
    extra = {"lr": state.vae_opt.schedule.last_lr, "skipped_steps": state.guard.skipped}
    if state.disc_opt is not None:
        extra["disc_lr"] = state.disc_opt.schedule.last_lr
    values = window.pop(extra, accelerator)
    metrics.log({**values, "skipped_files": files_skipped(accelerator, state.skipped_files)}, state.step)
    shown = ("rec_loss", "lpips_loss", "disc_loss") if loss_fn.perceptual is not None else ("rec_loss", "disc_loss")
    bar.set_postfix({k: f"{values[k]:.4f}" for k in shown if k in values})


def files_skipped(accelerator: Accelerator, skipped: int) -> int:
    """The run's count of unreadable files: every process's `skipped`, summed (a collective)."""
    return int(accelerator.reduce(torch.tensor([skipped], device=accelerator.device), reduction="sum").item())


def report_skipped(accelerator: Accelerator, total: int) -> None:
    if total:
        logger.warning("skipped %d unreadable image(s) during training (see the warnings above for the files)", total)
    else:
        logger.info("skipped 0 unreadable images")
