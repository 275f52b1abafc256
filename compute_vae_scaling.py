"""Compute the latent scaling factor of a stage-1 VAE on a dataset: 1 / std of its posterior samples.

    python compute_vae_scaling.py \
        --path_to_pretrained_weights <PATH_TO_VAE.safetensors> \
        --dataset "celebahq" \
        --path_to_dataset "<PATH_TO_DATA>"

Stage 2 multiplies every latent z ~ q(z|x) by this constant so the diffusion model sees latents of unit variance
(Stable Diffusion's 0.18215; Rombach et al. 2022, sec. 4.3.2 / appendix G), and inference divides by it before
decoding. The std is taken over all latent elements of a random subset of the dataset (--num_batches x
--batch_size images). --update_config writes the value to `scaling_constants.<dataset>` in --model_config,
changing only that line.

--path_to_pretrained_weights also takes a diffusers AutoencoderKL folder (config.json +
diffusion_pytorch_model.safetensors, e.g. Stable Diffusion's vae/) or that .safetensors beside its config.json; it
then encodes images of --model_config's vae.img_size, and its config's own scaling_factor is printed for comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors import safe_open
from torch.utils.data import DataLoader, Subset

from src.cli import run_cli
from src.config import ConfigError, Stage1TrainConfig, from_dict, load_model_config, to_dict, update_yaml_value
from src.data import DATASET_NAMES, DatasetError, build_dataset
from src.data.loader import collate
from src.models.diffusers_compat import is_diffusers_model, load_vae_backbone
from src.models.vae import Autoencoder
from src.training.setup import launched_without_gpu


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path_to_pretrained_weights", required=True,
                   help="stage-1 model.safetensors, or a diffusers AutoencoderKL folder (or its .safetensors "
                   "beside config.json)")
    p.add_argument("--model_config", default="configs/ldm.yaml", help="model YAML that --update_config writes to")
    p.add_argument("--dataset", required=True, choices=DATASET_NAMES)
    p.add_argument("--path_to_dataset", default=None, help="dataset folder (not needed for 'shapes')")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--num_batches", type=int, default=100, help="batches of a random subset (fewer if the data ends)")
    p.add_argument("--num_workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="picks the subset and the posterior samples")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--update_config", action="store_true", help="write the value to scaling_constants.<dataset>")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.num_batches < 1:
        p.error("--batch_size and --num_batches must be at least 1")
    return args


def data_config(path) -> Stage1TrainConfig:
    """The stage-1 training config stored with the weights (same interpolation, same shapes seed), else defaults."""
    if is_diffusers_model(path):
        return Stage1TrainConfig()
    with safe_open(str(path), framework="pt") as f:  # metadata only; the weights were loaded already
        stored = json.loads((f.metadata() or {}).get("training_config", "{}")) or {}
    try:
        return from_dict(Stage1TrainConfig, stored, f"{path} metadata 'training_config'")
    except ConfigError:
        return Stage1TrainConfig()


def subset_loader(dataset, batch_size: int, num_batches: int, num_workers: int, seed: int) -> DataLoader:
    """A random subset of min(len, batch_size * num_batches) images, in batches."""
    n = min(len(dataset), batch_size * num_batches)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return DataLoader(Subset(dataset, order), batch_size=batch_size, num_workers=num_workers, collate_fn=collate)


@torch.no_grad()
def latent_statistics(vae: Autoencoder, loader: DataLoader, device, seed: int) -> tuple[float, float, int]:
    """(mean, std, number of images) of posterior samples z = mean + std * eps over every latent element.

    Sums are accumulated in float64 per batch: Var = E[z^2] - E[z]^2 over N * C * h * w elements.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    total = total_sq = 0.0
    count = images = 0
    from tqdm.auto import tqdm

    for batch in tqdm(loader, desc="encoding", file=sys.stderr):
        if "image" not in batch:
            continue
        x = batch["image"].to(device)  # (B, 3, H, W)
        mean, std = vae.latent_moments(x)  # (B, C, h, w) each
        z = (mean + std * torch.randn(mean.shape, generator=g, device=device)).double()
        total += z.sum().item()
        total_sq += (z * z).sum().item()
        count += z.numel()
        images += x.shape[0]
    if images == 0:
        raise DatasetError("no readable images in the subset")
    mu = total / count
    var = max(total_sq / count - mu * mu, 0.0)
    return mu, math.sqrt(var), images


def check_model_config(path, vae: Autoencoder) -> None:
    model_cfg = load_model_config(path)
    if to_dict(model_cfg.vae) != to_dict(vae.config):
        print(f"note: the vae section of {path} differs from the VAE's stored config "
              "(the weights file's own config was used)", file=sys.stderr)


def load_backbone(args) -> tuple[Autoencoder, float | None]:
    """(the VAE, its diffusers config's scaling_factor or None). A diffusers VAE encodes vae.img_size images of
    --model_config (its own sample_size when that file does not exist)."""
    img_size = None
    if is_diffusers_model(args.path_to_pretrained_weights) and Path(args.model_config).is_file():
        img_size = load_model_config(args.model_config).vae.img_size
    return load_vae_backbone(args.path_to_pretrained_weights, img_size)


def main(argv=None) -> float:
    args = parse_args(argv)
    # under accelerate launch / torchrun every process measures the same subset on its own device (the numbers are
    # the same), and only the main one reports them and writes the config: concurrent rewrites of one file collide
    state = PartialState(cpu=launched_without_gpu())
    device = args.device or state.device
    vae, config_factor = load_backbone(args)
    vae = vae.to(device).float().eval()
    if args.update_config:
        check_model_config(args.model_config, vae)  # fail on a bad config before the slow part
    dataset = build_dataset(args.dataset, args.path_to_dataset, vae.config.img_size, data_config(args.path_to_pretrained_weights))
    loader = subset_loader(dataset, args.batch_size, args.num_batches, args.num_workers, args.seed)
    mean, std, images = latent_statistics(vae, loader, device, args.seed)
    factor = 1.0 / std
    if not state.is_main_process:
        return factor
    print(f"latent mean {mean:.6f}, std {std:.6f} over {images} images of {args.dataset}")
    print(f"scaling factor ({args.dataset}): {factor:.7f}")
    if config_factor is not None:
        print(f"(its config.json says scaling_factor {config_factor:.7g}; stage 2 uses that unless "
              f"scaling_constants.{args.dataset} is set, as --update_config does)")
    if args.update_config:
        update_yaml_value(args.model_config, "scaling_constants", args.dataset, factor)
        print(f"wrote scaling_constants.{args.dataset}: {factor:.7g} to {args.model_config}")
    return factor


if __name__ == "__main__":
    run_cli(main)
