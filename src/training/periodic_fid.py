"""Optional FID / KID during stage-2 training: the numbers to watch besides the loss.

    values.update(periodic_fid(args, accelerator, ctx, ema.shadow, step))     # in train_loop, before logging

Every `fid_eval_freq` steps (keys of the training config; either at 0 turns it off) the EMA UNet draws
`fid_num_samples` images with the validation sampler (val_sampler, val_sampler_steps, guidance val_guidance_scale;
sample i's noise seeded by sample_seed(seed, i) from the config's seed, so evaluations differ only by the weights,
not by the batch size or the process count). Each sample is conditioned like one
reference image: the reference is the same number of training images (a fixed random subset), and sample i takes
image i's caption, pre-encoded text or class label. The reference statistics are cached in
working_directory/fid_reference, so only the first evaluation extracts them. All processes share the sampling.

The Inception weights file is looked up at every step while FID is on (one stat call), so a missing file stops
the run at its first step instead of hours later. An evaluation leaves the global RNG states as it found them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..data.loader import collate
from ..evaluation.fid import fid_from_stats, kernel_inception_distance, stats_from_features
from ..evaluation.inception import FEATURE_DIM, load_inception, resolve_inception_weights
from ..evaluation.reference import ImageSource, reference_stats, select_indices
from ..evaluation.sharding import map_batches
from ..models.unet import UNet
from ..pipeline import LatentDiffusion, sample_generators
from .stage2 import Stage2Context, batch_condition

logger = logging.getLogger("ldm")

KID_SUBSET_SIZE = 1000
KID_SUBSETS = 100


def fid_enabled(ctx: Stage2Context) -> bool:
    return ctx.train_cfg.fid_num_samples > 0 and ctx.train_cfg.fid_eval_freq > 0


def fid_due(ctx: Stage2Context, step: int) -> bool:
    """An evaluation follows training step `step`."""
    return fid_enabled(ctx) and step % ctx.train_cfg.fid_eval_freq == 0


def periodic_fid(args, accelerator, ctx: Stage2Context, ema_unet: UNet, step: int) -> dict:
    """{'fid', 'kid'} of the EMA model at this step when an evaluation is due, {} otherwise."""
    if not fid_enabled(ctx):
        return {}
    weights = resolve_inception_weights(ctx.train_cfg.fid_inception_weights)
    if not fid_due(ctx, step):
        return {}
    # the evaluation's DataLoader draws its seed from the global RNG, which training's dropout draws from too:
    # monitoring must not change the training run, so the global CPU (and CUDA) RNG states are put back after it
    devices = [ctx.device] if ctx.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return evaluate_fid(args, accelerator, ctx, ema_unet, step, weights)


@torch.no_grad()
def evaluate_fid(args, accelerator, ctx: Stage2Context, ema_unet: UNet, step: int, weights: Path) -> dict:
    cfg = ctx.train_cfg
    inception = load_inception(weights, ctx.device)
    source = ImageSource(ctx.dataset_name, args.path_to_dataset, ctx.vae.config.img_size, cfg, cfg.fid_num_samples)
    reference, _ = reference_stats(source, inception, Path(args.working_directory) / "fid_reference", accelerator,
                                   cfg.per_gpu_batch_size)
    dataset = source.build()
    indices = select_indices(len(dataset), cfg.fid_num_samples)
    pipe = LatentDiffusion(ctx.vae, ema_unet, ctx.process, ctx.conditioning, ctx.scaling_factor, ctx.text_encoder)
    num_steps = min(cfg.val_sampler_steps, ctx.process.num_timesteps)

    def one_batch(k: int, start: int, end: int):
        items = [(p, dataset[indices[p]]) for p in range(start, end)]
        positions = [p for p, item in items if item is not None]  # unreadable images are skipped
        if not positions:
            return torch.zeros(0, FEATURE_DIM), torch.zeros(0, dtype=torch.long)
        batch = collate([item for _, item in items if item is not None])
        cond = batch_condition(batch, ctx.conditioning, ctx.text_encoder, ctx.device)
        uncond = ema_unet.null_condition(len(positions))
        generator = sample_generators(cfg.seed, positions, ctx.device)
        z = pipe.sample_latents(len(positions), cond, uncond, cfg.val_sampler, num_steps, cfg.val_guidance_scale,
                                generator=generator, guidance_rescale=cfg.val_guidance_rescale)  # (b, C, h, w)
        return inception(pipe.decode(z)), torch.tensor(positions)

    fake = map_batches(len(indices), cfg.per_gpu_batch_size, one_batch, accelerator, desc=f"FID at step {step}")
    fake_np = fake.numpy()
    values = {"fid": fid_from_stats(stats_from_features(fake_np), reference)}
    if reference.features is not None:
        values["kid"] = kernel_inception_distance(fake_np, reference.features, KID_SUBSET_SIZE, KID_SUBSETS, cfg.seed)[0]
    logger.info("step %d: FID %.3f over %d samples", step, values["fid"], len(fake_np))
    return values
