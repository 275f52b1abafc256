"""Tiny stage-2 set-ups for the tests of compute_vae_scaling.py, stage2_diffusion_trainer.py and inference_ldm.py.

A random 16 px stage-1 VAE file (4 x 8 x 8 latents), a small UNet config, and training YAMLs of a few steps.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from PIL import Image

from src.config import ModelConfig, Stage2TrainConfig, UNetConfig, VAEConfig, to_dict
from src.diffusion.schedule import DiffusionProcess
from src.models.serialization import save_models
from src.models.unet import build_unet
from src.models.vae import build_autoencoder
from src.pipeline import save_stage2_model, stage2_metadata
from tests.helpers import reset_accelerate

TINY_VAE = VAEConfig(
    img_size=16, latent_channels=4, residual_layers_per_block=1, vae_channels_per_block=[8, 16],
    groupnorm_groups=4, attention_layers=1,
)


def tiny_unet(text_model: str = "", text_dim: int = 32, class_conditioning: bool = False) -> UNetConfig:
    return UNetConfig(
        down_block_types=["AttnDown", "Down"], up_block_types=["Up", "AttnUp"], mid_block_types="AttnMid",
        unet_channels_per_block=[16, 32], unet_residual_layers_per_block=1, attention_head_dim=8,
        time_embed_start_dim=16, time_embed_proj_dim=32, text_conditioning_hf_model=text_model,
        text_embed_dim=text_dim, class_conditioning=class_conditioning, class_embed_dim=32, num_classes=3,
        groupnorm_groups=8,
    )


def make_vae_file(path, seed: int = 0, vae_cfg: VAEConfig = TINY_VAE) -> Path:
    """A stage-1 model.safetensors holding a randomly initialised tiny VAE."""
    torch.manual_seed(seed)
    vae = build_autoencoder(vae_cfg)
    meta = {"model_config": to_dict(ModelConfig(vae=vae_cfg)), "training_config": {}, "dataset": "shapes", "stage": 1}
    return save_models(path, {"vae": vae}, meta)


def make_stage2_file(path, conditioning: str, unet_cfg: UNetConfig, dataset: str, text_model=None,
                     vae_cfg: VAEConfig = TINY_VAE, num_timesteps: int = 20, extra: dict | None = None) -> Path:
    """A stage-2 model.safetensors with random weights (scaling factor 0.7, a DDPM schedule of num_timesteps);
    `extra` adds metadata (class_names, ...)."""
    torch.manual_seed(0)
    vae = build_autoencoder(vae_cfg)
    unet = build_unet(unet_cfg, vae_cfg.latent_dim, conditioning)
    with torch.no_grad():  # a spread beyond the initialisation: conditions and seeds give clearly different samples
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model_cfg = ModelConfig(vae=vae_cfg, unet=unet_cfg, scaling_constants={dataset: 0.7})
    process = DiffusionProcess(num_timesteps=num_timesteps)
    meta = stage2_metadata(model_cfg, Stage2TrainConfig(num_diffusion_timesteps=num_timesteps), process, dataset,
                           conditioning, 0.7, text_model, extra)
    return save_stage2_model(path, unet, vae, meta)


def make_conditioning_models(folder) -> dict[str, Path]:
    """One tiny stage-2 model.safetensors per conditioning: "text" (shapes, a tiny CLIP), "class" (imagenet) and
    "none" (celebahq), under `folder`."""
    from tests.helpers import make_tiny_clip

    d = Path(folder)
    clip = make_tiny_clip(d / "clip")
    return {
        "text": make_stage2_file(d / "text.safetensors", "text", tiny_unet(str(clip)), "shapes", str(clip)),
        "class": make_stage2_file(d / "class.safetensors", "class", tiny_unet(class_conditioning=True), "imagenet"),
        "none": make_stage2_file(d / "none.safetensors", "none", tiny_unet(), "celebahq"),
    }


def write_model_config(path, unet: UNetConfig, scaling: dict[str, float], vae_cfg: VAEConfig = TINY_VAE) -> Path:
    data = to_dict(ModelConfig(vae=vae_cfg, unet=unet, scaling_constants=scaling))
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
    return Path(path)


def write_train_config(path, **overrides) -> Path:
    cfg = {
        "learning_rate": 1e-3, "lr_warmup_steps": 0, "total_training_iterations": 6, "checkpoint_iterations": 3,
        "per_gpu_batch_size": 4, "num_workers": 0, "pin_memory": False, "shapes_num_images": 24,
        "num_val_random_samples": 2, "val_generation_freq": 1000, "val_sampler_steps": 2, "ema_decay": 0.99,
        "seed": 0, "log_every": 1,
    }
    cfg.update(overrides)
    Path(path).write_text(yaml.safe_dump(cfg))
    return Path(path)


def make_image_folders(root, num_classes: int = 3, per_class: int = 4, size: int = 20) -> Path:
    """ImageNet layout root/class_k/img_i.png of flat-coloured noisy images."""
    g = torch.Generator().manual_seed(0)
    for c in range(num_classes):
        d = Path(root) / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = torch.tensor([(c * 80) % 256, 100, 255 - c * 60]).view(1, 1, 3).float()
            arr = (base + 30 * torch.rand(size, size, 3, generator=g)).clamp(0, 255).byte().numpy()
            Image.fromarray(arr).save(d / f"img_{i}.png")
    return Path(root)


def run_trainer(argv: list[str]) -> None:
    """Run stage2_diffusion_trainer.main in this process, with accelerate's process-wide state reset first."""
    import stage2_diffusion_trainer

    reset_accelerate()
    stage2_diffusion_trainer.main(argv)


def trainer_argv(work, train_cfg, model_cfg, vae_file, dataset: str, *extra: str) -> list[str]:
    """The design's stage-2 command shape."""
    return [
        "--experiment_name", "DiffusionTrainer", "--wandb_run_name", f"diffusion_{dataset}",
        "--working_directory", str(work), "--training_config", str(train_cfg), "--model_config", str(model_cfg),
        "--path_to_vae_backbone", str(vae_file), "--dataset", dataset, *extra,
    ]


def read_losses(work) -> dict[int, float]:
    import json

    lines = (Path(work) / "metrics.jsonl").read_text().splitlines()
    return {row["step"]: row["loss"] for row in map(json.loads, lines)}


def make_flat_folder(root, count: int = 8, size: int = 20) -> Path:
    """A flat folder of images (celebahq layout)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    for i in range(count):
        arr = (255 * torch.rand(size, size, 3, generator=g)).byte().numpy()
        Image.fromarray(arr).save(root / f"face_{i:02d}.png")
    return root
