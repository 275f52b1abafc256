"""Sample an export of export_diffusers.py with diffusers alone: the code the README's "Export to diffusers" shows.

    python examples/diffusers_sampling.py --model exports/shapes --prompt "a red circle on a blue background" \
        --num_images 4 --seed 0 --num_steps 50 --guidance_scale 2 --output outputs/diffusers_samples

Text-conditional exports run diffusers' StableDiffusionPipeline (`sample_text`); unconditional and class-conditional
ones, which no diffusers pipeline drives, run a DDIM loop over UNet2DConditionModel, AutoencoderKL and DDIMScheduler
(`sample_unet`). With the same prompts or class labels, --num_images, --seed, --num_steps and --guidance_scale the
images equal inference_ldm.py's (the initial noise is drawn the same way: image j of each prompt / label from its
own CPU generator, seeded with sample_seed(seed, j)).
StableDiffusionPipeline guides only above 1, so `sample_text` refuses a guidance scale below 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Optional

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file


def sample_seed(seed: int, index: int) -> int:
    """src.pipeline.sample_seed, restated so that this file needs diffusers alone: the noise seed of image `index`."""
    offset = int.from_bytes(hashlib.sha256(f"ldm-sample-seed:{seed}".encode()).digest()[:4], "little")
    return (offset + index) % 2**32


def initial_latents(unet: UNet2DConditionModel, num_conditions: int, num_images: int, seed: int) -> torch.Tensor:
    """The noise inference_ldm.py starts num_images images of each of num_conditions prompts / labels from with
    --seed: (num_conditions * num_images, C, h, w), image j of each from a CPU generator seeded sample_seed(seed, j)."""
    size = unet.config.sample_size
    shape = (1, unet.config.in_channels, size, size)
    return torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(sample_seed(seed, j)))
                      for _ in range(num_conditions) for j in range(num_images)])


def prompt_embeddings(pipe, folder, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, negative_prompt_embeds), each (1, L, D) for the L real tokens of `prompt`.

    The model masks padding tokens in cross-attention, and StableDiffusionPipeline passes the UNet no mask, so the
    prompt is tokenised without padding. The learned null token stands for "no prompt"; repeated L times it gives
    the same attention output as once (L equal keys share the weight of one)."""
    ids = pipe.tokenizer(prompt, truncation=True, max_length=pipe.tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        emb = pipe.text_encoder(ids.input_ids, attention_mask=ids.attention_mask)[0]  # (1, L, D)
    null = load_file(f"{folder}/null_text_embeds.safetensors")["null_text_embeds"]  # (1, 1, D)
    return emb, null.expand(1, emb.shape[1], -1)


def sample_text(folder, prompts: list[str], num_images: int = 4, seed: int = 0, num_steps: int = 50,
                guidance_scale: float = 4.0) -> torch.Tensor:
    """num_images per prompt, in prompt order, as (P * N, 3, H, W) in [0, 1]. One pipeline call per prompt:
    prompts of different token lengths can't share a batch without the padding mask."""
    if guidance_scale < 1:
        # StableDiffusionPipeline guides only when guidance_scale > 1 and samples the conditional model otherwise;
        # ours computes u + s (c - u) for any s (s = 0 is unconditional), so below 1 the images would differ
        raise ValueError(f"guidance_scale {guidance_scale} < 1: StableDiffusionPipeline does not guide below 1, so "
                         "its images would not be inference_ldm.py's; sample scales below 1 with inference_ldm.py")
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    latents = initial_latents(pipe.unet, len(prompts), num_images, seed)
    images = []
    for i, prompt in enumerate(prompts):
        emb, neg = prompt_embeddings(pipe, folder, prompt)
        images.append(pipe(prompt_embeds=emb, negative_prompt_embeds=neg, num_images_per_prompt=num_images,
                           latents=latents[i * num_images:(i + 1) * num_images], num_inference_steps=num_steps,
                           guidance_scale=guidance_scale, output_type="pt").images)
    return torch.cat(images)


@torch.no_grad()
def sample_unet(folder, labels: Optional[list[int]] = None, num_images: int = 4, seed: int = 0, num_steps: int = 50,
                guidance_scale: float = 4.0) -> torch.Tensor:
    """Unconditional (labels None) or class-conditional samples, num_images per label: (B, 3, H, W) in [0, 1].
    Classifier-free guidance runs against the null class, the last row of the class embedding."""
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    n = len(labels) * num_images if labels else num_images
    latents = initial_latents(unet, len(labels) if labels else 1, num_images, seed)
    context = torch.zeros(n, 1, unet.config.cross_attention_dim)  # the exported cross-attention is all zeros
    cond = torch.tensor([c for c in labels for _ in range(num_images)]) if labels else None
    null = None if cond is None else torch.full_like(cond, unet.config.num_class_embeds - 1)
    scheduler.set_timesteps(num_steps)
    for t in scheduler.timesteps:
        if cond is not None and guidance_scale != 1:
            both = unet(torch.cat([latents] * 2), t, torch.cat([context] * 2), class_labels=torch.cat([null, cond]))
            uncond_pred, cond_pred = both.sample.chunk(2)
            pred = uncond_pred + guidance_scale * (cond_pred - uncond_pred)
        else:
            pred = unet(latents, t, context, class_labels=cond).sample
        latents = scheduler.step(pred, t, latents).prev_sample
    images = vae.decode(latents / vae.config.scaling_factor).sample  # (B, 3, H, W) in [-1, 1]
    return (images / 2 + 0.5).clamp(0, 1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="folder written by export_diffusers.py")
    p.add_argument("--prompt", action="append", default=None, help="repeatable (text-conditional exports)")
    p.add_argument("--class_label", type=int, action="append", default=None, help="repeatable (class exports)")
    p.add_argument("--num_images", type=int, default=4, help="images per prompt / class label")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=4.0)
    p.add_argument("--output", default="outputs/diffusers_samples", help="folder for grid.png")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    info_file = Path(args.model) / "export_info.json"
    if not info_file.is_file():
        sys.exit(f"error: {info_file} not found: --model takes a folder written by export_diffusers.py")
    info = json.loads(info_file.read_text())
    conditioning = info["conditioning"]
    kw = dict(num_images=args.num_images, seed=args.seed, num_steps=args.num_steps, guidance_scale=args.guidance_scale)
    if conditioning == "text":
        if not args.prompt:
            sys.exit("error: this export is text-conditional: give --prompt")
        images = sample_text(args.model, args.prompt, **kw)
    else:
        if (conditioning == "class") != bool(args.class_label) or args.prompt:
            sys.exit(f"error: this export is {conditioning}-conditional: "
                     + ("give --class_label" if conditioning == "class" else "give neither --prompt nor --class_label"))
        # the class folders the model was trained on; the null class (guidance's "no class") is the last embedding
        unet_config = json.loads((Path(args.model) / "unet" / "config.json").read_text())
        trained = len(info.get("class_names") or []) or (unet_config["num_class_embeds"] or 1) - 1
        if any(not 0 <= c < trained for c in args.class_label or []):
            sys.exit(f"error: --class_label must be in 0 .. {trained - 1}, the classes the model was trained on")
        images = sample_unet(args.model, args.class_label, **kw)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from src.training.images import save_image_grid  # the grid layout of inference_ldm.py

    path = save_image_grid(images * 2 - 1, Path(args.output) / "grid.png", nrow=args.num_images)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
