"""Stage-2 training steps per second with and without --cache_latents (same process, same model, same batches).

    .venv/bin/python bench/bench_stage2_cache.py [--steps 20] [--batch_size 32] [--device cpu]

Uses the quickstart configs (32 px shapes, 4 x 8 x 8 latents, UNet (64, 128), the 384-d MiniLM text encoder) with a
randomly initialised VAE: the VAE's and text encoder's cost does not depend on their weights. Without the cache
every step runs the VAE encoder on the (randomly mirrored) batch and the text encoder on its captions; with it,
each step reads the stored posterior moments (of each image and its mirror image) and text embeddings. The one-off cost of
building the cache is reported too, with the number of steps after which it has paid for itself.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from src.config import ModelConfig, Stage2TrainConfig, load_config, load_model_config, to_dict  # noqa: E402
from src.data.loader import InfiniteLoader  # noqa: E402
from src.models.serialization import save_models  # noqa: E402
from src.models.vae import build_autoencoder  # noqa: E402
from src.training.optim import build_adamw  # noqa: E402
from src.training.stage2 import StepRandomness, batch_loss, setup_context  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_config", default=str(ROOT / "configs/quickstart/ldm.yaml"))
    p.add_argument("--training_config", default=str(ROOT / "configs/quickstart/stage2_diffusion_train.yaml"))
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode (after 3 warm-up steps)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--num_images", type=int, default=512, help="shapes images (the cache encodes all of them)")
    p.add_argument("--device", default=None)
    return p.parse_args()


def random_vae_file(model_cfg: ModelConfig, path: Path) -> Path:
    torch.manual_seed(0)
    vae = build_autoencoder(model_cfg.vae)
    meta = {"model_config": to_dict(model_cfg), "training_config": {}, "dataset": "shapes", "stage": 1}
    return save_models(path, {"vae": vae}, meta)


def time_steps(accelerator, ctx, dataset, train_cfg, steps: int, warmup: int = 3) -> float:
    """Steps per second of forward + backward + AdamW, data loading and VAE / text encoding included."""
    unet = ctx.unet_module.to(accelerator.device).train()
    optimizer = build_adamw(unet, train_cfg.learning_rate, (train_cfg.adam_beta1, train_cfg.adam_beta2),
                            train_cfg.adam_epsilon, train_cfg.weight_decay, accelerator.device)
    randomness = StepRandomness.create(train_cfg.seed, 0, accelerator.device)
    batches = iter(InfiniteLoader(dataset, train_cfg.per_gpu_batch_size, seed=train_cfg.seed, num_workers=0))
    for i in range(warmup + steps):
        if i == warmup:
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        loss = batch_loss(next(batches), ctx, unet, randomness)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def main() -> None:
    args = parse_args()
    train_cfg = load_config(args.training_config, Stage2TrainConfig)
    train_cfg.per_gpu_batch_size = args.batch_size
    train_cfg.shapes_num_images = args.num_images
    model_cfg = load_model_config(args.model_config)
    model_cfg.scaling_constants.setdefault("shapes", 1.0)
    accelerator = Accelerator(cpu=args.device == "cpu")
    if accelerator.device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vae_file = random_vae_file(model_cfg, tmp / "vae.safetensors")
        results = {}
        # a set-up whose time is not kept: the first one also pays one-off costs (reading the text encoder and the
        # VAE from disk, lazy imports), which would otherwise count against the images and make the build look cheap
        for mode in ("warm-up", "images", "cache"):
            ns = argparse.Namespace(
                dataset="shapes", path_to_dataset=None, path_to_vae_backbone=str(vae_file),
                model_config=args.model_config, val_prompts=None,
                cache_latents=str(tmp / "cache") if mode == "cache" else None, init_unet=None,
            )
            torch.manual_seed(0)
            start = time.perf_counter()
            ctx, dataset = setup_context(ns, accelerator, train_cfg, model_cfg)
            setup_s = time.perf_counter() - start
            if mode != "warm-up":
                results[mode] = (time_steps(accelerator, ctx, dataset, train_cfg, args.steps), setup_s)
    (img_sps, img_setup), (cache_sps, cache_setup) = results["images"], results["cache"]
    build_s = cache_setup - img_setup  # both set-ups load the same models; the difference is the encoding
    saved_per_step = 1 / img_sps - 1 / cache_sps
    print(f"device: {accelerator.device}, batch {args.batch_size}, {args.steps} timed steps, "
          f"{args.num_images} shapes images, flips {train_cfg.random_flip_p > 0}")
    print(f"from images      : {img_sps:7.2f} steps/s")
    print(f"from latent cache: {cache_sps:7.2f} steps/s")
    print(f"speed-up (cache / images): {cache_sps / img_sps:.2f}x")
    print(f"cache build: {build_s:.1f} s for {args.num_images} images "
          + (f"(pays for itself after ~{build_s / saved_per_step:.0f} steps)" if saved_per_step > 0 else ""))


if __name__ == "__main__":
    main()
