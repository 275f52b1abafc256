"""A tiny stage-1 training state (16 px autoencoder, small PatchGAN, no LPIPS) and image batches for tests that
drive stage 1's train_step directly."""

import torch

from src.config import ModelConfig, Stage1TrainConfig, VAEConfig


def tiny_stage1(accum: int = 2, quantize: bool = False, **overrides):
    from accelerate import Accelerator

    from src.training.stage1 import build_stage1
    from tests.helpers import reset_accelerate

    reset_accelerate()
    cfg = Stage1TrainConfig(use_lpips=False, disc_start=0, disc_start_dim=8, disc_depth=2, lr_warmup_steps=2,
                            disc_lr_warmup_steps=2, total_training_iterations=10, gradient_accumulation_steps=accum,
                            learning_rate=1e-3, max_nonfinite_steps=3, **overrides)
    vq = {"quantize": True, "codebook_size": 16, "codebook_reset_steps": 1} if quantize else {}  # codes die at once
    model_cfg = ModelConfig(vae=VAEConfig(img_size=16, vae_channels_per_block=[8, 16], groupnorm_groups=4, **vq))
    accelerator = Accelerator(cpu=True)
    state, loss_fn = build_stage1(accelerator, model_cfg, cfg)
    return accelerator, state, loss_fn, cfg


def images(seed: int, n: int = 2) -> dict:
    return {"image": torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1}
