"""Prompt adherence of a text-conditional model trained on the built-in `shapes` dataset.

Generates one image per prompt ("a <colour> <shape> on a <colour> background", drawn at random from the public
vocabulary in src/data/shapes.py, skipping the prompts of --exclude_prompts, by default the demo's validation
prompts), reads back the shape's colour, the background's colour and the shape class from the pixels
(src/evaluation/shapes.py), and prints the fraction correct for each of the three and the fraction of clean images
(one region, one palette colour, a uniform background, a sharp edge). Every colour/shape/background combination is
in the training data: this scores prompt adherence on seen combinations, not generalisation to unseen ones.

    python evaluate_shapes.py --path_to_weights work_dir/diffusion_shapes/model.safetensors \
        --num_prompts 64 --output outputs/eval

--source tells where the shape may be lost: `samples` (the diffusion model, default), `reconstructions` (the same
prompts drawn by the dataset's renderer, then encoded and decoded by the model's autoencoder: the best any
diffusion model on that autoencoder can do) or `renders` (the drawings themselves: the evaluator's own accuracy).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from src.cli import run_cli
from src.data.shapes import caption, render, sample_attributes
from src.data.transforms import ImageTransform, to_pil_images
from src.evaluation.shapes import score
from src.models.vae import load_autoencoder
from src.pipeline import DEFAULT_STEPS, SAMPLERS, load_pipeline, sampler_flags_error, usable_device

SOURCES = ("samples", "reconstructions", "renders")
from src.training.images import save_image_grid, writable_folder


DEMO_PROMPTS = Path(__file__).resolve().parent / "configs" / "quickstart" / "prompts.txt"  # its validation prompts


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path_to_weights", required=True,
                   help="stage-2 model.safetensors trained on shapes (stage 1's also works with --source "
                        "reconstructions or renders)")
    p.add_argument("--num_prompts", type=int, default=64)
    p.add_argument("--prompt_seed", type=int, default=2024, help="picks the evaluation prompts")
    p.add_argument("--seed", type=int, default=0, help="sampling noise")
    p.add_argument("--exclude_prompts", default=str(DEMO_PROMPTS),
                   help="prompts seen during training sampling; never used for evaluation")
    # the defaults are the demo's (scripts/quickstart.sh), so a plain call reproduces its evaluation
    p.add_argument("--sampler", choices=SAMPLERS, default="dpmpp_2m")
    p.add_argument("--num_steps", type=int, default=None, help="default: DDIM 50, DPM-Solver++ 20")
    p.add_argument("--guidance_scale", type=float, default=2.0)
    p.add_argument("--guidance_rescale", type=float, default=0.0, help="Lin et al. 2024 eq. 16 (0 = off)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--text_encoder", default=None, help="override the stored text model (a local folder)")
    p.add_argument("--output", default="outputs/eval_shapes", help="folder for results.json and grid.png")
    p.add_argument("--source", choices=SOURCES, default="samples",
                   help="score the model's samples, its autoencoder's reconstructions of renders, or the renders")
    args = p.parse_args(argv)
    if args.num_prompts < 1:
        p.error(f"--num_prompts must be at least 1, got {args.num_prompts}")
    if args.num_steps is not None and args.num_steps < 1:
        p.error(f"--num_steps must be at least 1, got {args.num_steps}")
    if problem := sampler_flags_error(args.sampler, args.num_steps, guidance_rescale=args.guidance_rescale):
        p.error(problem)
    return args


def heldout_prompts(n: int, seed: int, exclude: set[str]) -> list[tuple[str, str, str]]:
    """`n` distinct (colour, shape, background) whose canonical caption is not in `exclude`."""
    rng = random.Random(seed)
    chosen: list[tuple[str, str, str]] = []
    for _ in range(100 * n):
        attrs = sample_attributes(rng)
        if attrs not in chosen and caption(*attrs).lower() not in exclude:
            chosen.append(attrs)
        if len(chosen) == n:
            return chosen
    raise ValueError(f"could not find {n} distinct held-out prompts")


def read_exclusions(path: str) -> set[str]:
    """The prompts a run sampled during training, lower-cased; a missing file is an error (a misspelt path would
    let those prompts into the evaluation)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--exclude_prompts {p}: no such file (the demo's is {DEMO_PROMPTS})")
    return {line.strip().lower() for line in p.read_text().splitlines() if line.strip()}


def generate(pipe, prompts: list[str], args) -> torch.Tensor:
    images = []
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start : start + args.batch_size]
        images.append(pipe.generate(prompts=chunk, sampler=args.sampler, num_steps=args.num_steps,
                                    guidance_scale=args.guidance_scale, guidance_rescale=args.guidance_rescale,
                                    seed=args.seed, sample_indices=range(start, start + len(chunk))))
    return torch.cat(images)  # (N, 3, H, W)


def renders(attrs: list[tuple[str, str, str]], size: int, seed: int) -> torch.Tensor:
    """The dataset's drawings of `attrs` (random position, size and rotation), (N, 3, H, W) in [-1, 1]."""
    rng = random.Random(f"renders:{seed}")
    to_tensor = ImageTransform(size, "bicubic")
    return torch.stack([to_tensor(render(*a, size, rng)) for a in attrs])


@torch.no_grad()
def reconstructions(vae, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Encode (posterior mean) and decode with the autoencoder, (N, 3, H, W) in [-1, 1]."""
    device = next(vae.parameters()).device
    out = [vae(x.to(device), sample=False).reconstruction.float().clamp(-1, 1).cpu() for x in images.split(batch_size)]
    return torch.cat(out)


def source_images(args, attrs: list[tuple[str, str, str]], prompts: list[str]) -> torch.Tensor:
    """The images --source asks for. Renders and reconstructions need only the autoencoder, so --path_to_weights
    may then be a stage-1 model.safetensors as well."""
    if args.source == "samples":
        pipe = load_pipeline(args.path_to_weights, device=args.device, text_encoder=args.text_encoder)
        return generate(pipe, prompts, args)
    vae = load_autoencoder(args.path_to_weights, args.device)
    images = renders(attrs, vae.config.img_size, args.seed)
    return reconstructions(vae, images, args.batch_size) if args.source == "reconstructions" else images


def describe(args) -> str:
    if args.source == "samples":
        steps = "" if args.sampler == "ddpm" else f"-{args.num_steps or DEFAULT_STEPS[args.sampler]}"
        rescale = f", rescale {args.guidance_rescale}" if args.guidance_rescale else ""
        return f"samples, {args.sampler}{steps}, guidance {args.guidance_scale}{rescale}"
    return "autoencoder reconstructions of renders" if args.source == "reconstructions" else "renders"


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.device = usable_device(args.device)
    writable_folder(args.output)  # before sampling, not after
    attrs = heldout_prompts(args.num_prompts, args.prompt_seed, read_exclusions(args.exclude_prompts))
    prompts = [caption(*a) for a in attrs]
    start = time.time()
    images = source_images(args, attrs, prompts)
    result = score(attrs, to_pil_images(images))
    result["source"] = describe(args)
    result["prompts"] = prompts
    result["seconds"] = round(time.time() - start, 1)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    save_image_grid(images, out / "grid.png", nrow=8)
    print(f"Prompt adherence on {len(prompts)} held-out prompts ({result['source']}):")
    print(f"  shape colour      {result['shape_color']:.3f}")
    print(f"  background colour {result['background_color']:.3f}")
    print(f"  shape             {result['shape']:.3f}")
    print(f"  clean             {result['clean']:.3f}")
    print(f"  all three         {result['all_three']:.3f}")
    print(f"wrote {out / 'results.json'} and {out / 'grid.png'}")
    return result


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
