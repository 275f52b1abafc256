"""Generate images with a trained latent diffusion model (the model.safetensors of stage 2).

    python inference_ldm.py \
        --model_config "configs/ldm.yaml" \
        --path_to_weights "work_dir/diffusion_cc/model.safetensors" \
        --text_conditional \
        --training_dataset "conceptual_captions" \
        --prompt "A beautiful sunset at the beach"

The weights file carries its own configs (VAE, UNet, diffusion schedule, scaling factor, text model name), so
--model_config and --training_dataset are only checked against it. Sampling: DDIM with --num_steps (default 50),
DPM-Solver++(2M) (--sampler dpmpp_2m, default 20 steps) or ancestral DDPM over every training step,
classifier-free guidance --guidance_scale (eps_u + s (eps_c - eps_u); 1 disables it) against the learned null
condition or --negative_prompt, optionally with --guidance_rescale (Lin et al. 2024). Writes --output/grid.png and
one PNG per image. The same --seed on the same device and dtype gives the same images; image j of each prompt
has its own noise, seeded by (seed, j), so it stays the same when --num_images or the prompts change. --path_to_vae_backbone
decodes with another autoencoder of the same latent space (a stage-1 file or a diffusers AutoencoderKL folder).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

import torch

from src.cli import run_cli
from src.config import load_model_config, to_dict
from src.data import DATASET_NAMES
from src.data.transforms import to_pil_images
from src.pipeline import SAMPLERS, LatentDiffusion, PipelineError, load_pipeline, sampler_flags_error, usable_device
from src.training.images import save_image_grid, writable_folder

logger = logging.getLogger("inference")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NO_FLAGS_HINT = (
    "inference_ldm.py needs at least --path_to_weights.\n"
    "If you pasted the design document's command, its first line lacks a trailing backslash, so the shell ran\n"
    "`python inference_ldm.py` alone. Put the command on one line, or end every line but the last with ` \\`:\n\n"
    "  python inference_ldm.py \\\n"
    "    --model_config \"configs/ldm.yaml\" \\\n"
    "    --path_to_weights \"work_dir/diffusion_celebahq/model.safetensors\" \\\n"
    "    --training_dataset \"celebahq\"\n"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path_to_weights", required=True, help="model.safetensors written by stage2_diffusion_trainer.py")
    p.add_argument("--model_config", default=None, help="checked against the config stored in the weights")
    p.add_argument("--training_dataset", default=None, choices=DATASET_NAMES, help="checked against the weights")
    p.add_argument("--text_conditional", action="store_true", help="the model is text-conditional (checked)")
    p.add_argument("--prompt", action="append", default=None,
                   help="text prompt; repeat the flag for several prompts (each gets --num_images images)")
    p.add_argument("--negative_prompt", default=None, help="guide away from this text instead of the null condition")
    p.add_argument("--class_label", action="append", default=None,
                   help="class-conditional models: a label index or a class folder's name; repeatable (default: one "
                        "trained class drawn with --seed)")
    p.add_argument("--num_images", type=int, default=4, help="images per prompt / class label (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    p.add_argument("--num_steps", type=int, default=None,
                   help="sampler steps (default: DDIM 50, DPM-Solver++ 20); DDPM always runs every step")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity: 0 deterministic, 1 DDPM-like")
    p.add_argument("--guidance_scale", type=float, default=4.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--guidance_rescale", type=float, default=0.0,
                   help="0..1: rescale the guided prediction's std towards the conditional one (Lin et al. 2024 eq. 16)")
    p.add_argument("--output", default="outputs/inference", help="folder for grid.png and 000.png, 001.png, ...")
    p.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="UNet / text encoder precision")
    p.add_argument("--path_to_vae_backbone", default=None,
                   help="decode with this autoencoder instead of the stored one: a stage-1 model.safetensors or a "
                   "diffusers AutoencoderKL folder with the same latent space (the scaling factor stays the model's)")
    p.add_argument("--text_encoder", default=None, help="override the stored text model name (a local folder)")
    p.add_argument("--hf_cache_dir", default=None, help="Hugging Face cache holding the text encoder")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        parser.print_usage(sys.stderr)
        sys.stderr.write("\n" + NO_FLAGS_HINT)
        raise SystemExit(2)
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error("--num_images must be at least 1")
    if args.num_steps is not None and args.num_steps < 1:
        parser.error("--num_steps must be at least 1")
    if problem := sampler_flags_error(args.sampler, args.num_steps, args.eta, args.guidance_rescale):
        parser.error(problem)
    if args.prompt is not None and any(not p.strip() for p in args.prompt):
        parser.error("--prompt is empty: describe the image, e.g. --prompt \"A beautiful sunset at the beach\"")
    return args


def check_against_weights(args, pipe: LatentDiffusion) -> None:
    """The design's flags must agree with what the weights say; the weights' own configs are used."""
    meta = pipe.metadata
    if args.training_dataset and args.training_dataset != meta["dataset"]:
        logger.warning("--training_dataset %s, but the model was trained on %s (scaling factor %.6g from the weights)",
                       args.training_dataset, meta["dataset"], pipe.scaling_factor)
    if args.text_conditional and pipe.conditioning != "text":
        raise PipelineError(f"--text_conditional given, but the model is {pipe.conditioning}-conditional "
                            f"(trained on {meta['dataset']}); drop --text_conditional and --prompt")
    if args.model_config:
        stored = meta["model_config"]
        given = to_dict(load_model_config(args.model_config))
        if given["unet"] != stored["unet"] or given["vae"] != stored["vae"]:
            logger.warning("%s differs from the config stored in %s; using the stored one",
                           args.model_config, args.path_to_weights)


def choose_labels(args, pipe: LatentDiffusion) -> list[int] | None:
    if pipe.conditioning != "class":
        return args.class_label  # other models refuse any labels (LatentDiffusion.conditions)
    if args.class_label:
        return pipe.class_labels(args.class_label)
    g = torch.Generator().manual_seed(args.seed)
    labels = torch.randint(0, pipe.num_trained_classes, (1,), generator=g).tolist()  # a class it was trained on
    logger.info("no --class_label: using class %s", labels)
    return labels


def save_images(images: torch.Tensor, out_dir, nrow: int) -> list[Path]:
    """grid.png plus 000.png, 001.png, ... in `out_dir`; returns the paths. Numbered images an earlier, larger run
    left there are removed, so the folder holds this run's images only (grid.png and 000.png are replaced anyway)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    numbered = [p for p in out_dir.glob("*.png") if re.fullmatch(r"\d{3,}", p.stem)]  # 000.png .. 999.png, 1000.png ..
    stale = [p for p in numbered if int(p.stem) >= len(images)]
    if stale:
        logger.info("removing %d numbered image(s) an earlier run left in %s", len(stale), out_dir)
        for path in stale:
            path.unlink()
    paths = [save_image_grid(images, out_dir / "grid.png", nrow=nrow)]
    for i, img in enumerate(to_pil_images(images)):
        img.save(out_dir / f"{i:03d}.png")
        paths.append(out_dir / f"{i:03d}.png")
    return paths


def main(argv=None) -> list[Path]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = usable_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    writable_folder(args.output)  # before sampling, not after
    pipe = load_pipeline(args.path_to_weights, device, DTYPES[args.dtype], args.text_encoder, args.hf_cache_dir,
                         vae_path=args.path_to_vae_backbone)
    check_against_weights(args, pipe)
    images = pipe.generate(
        prompts=args.prompt,
        labels=choose_labels(args, pipe),
        num_per_condition=args.num_images,
        negative_prompt=args.negative_prompt,
        sampler=args.sampler,
        num_steps=args.num_steps,
        guidance_scale=args.guidance_scale,
        guidance_rescale=args.guidance_rescale,
        eta=args.eta,
        seed=args.seed,
        progress=True,
    )  # (N, 3, H, W)
    paths = save_images(images, args.output, nrow=args.num_images)
    print(f"wrote {len(paths) - 1} image(s) of {images.shape[-1]}x{images.shape[-2]} and {paths[0]}")
    return paths


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
