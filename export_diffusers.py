"""Export a trained latent diffusion model (stage-2 model.safetensors) to a diffusers folder.

    python export_diffusers.py --path_to_weights work_dir/diffusion_cc/model.safetensors --output exports/cc

Text-conditional models load with `diffusers.DiffusionPipeline.from_pretrained(DIR)` (a StableDiffusionPipeline
with the model's own text encoder); the learned null text token is DIR/null_text_embeds.safetensors, to be passed
as negative_prompt_embeds (README, "Export to diffusers"). Unconditional and class-conditional models are unet/,
vae/ and scheduler/ folders for UNet2DConditionModel, AutoencoderKL and DDIMScheduler
(examples/diffusers_sampling.py samples them). Nothing is written when the model can't be exported, and an
existing --output folder is replaced only with --overwrite.
"""

from __future__ import annotations

import argparse

from src.cli import run_cli
from src.diffusers_export import export_diffusers


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path_to_weights", required=True, help="model.safetensors written by stage2_diffusion_trainer.py")
    p.add_argument("--output", required=True, help="folder to write (must not exist or be empty, see --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --output")
    p.add_argument("--text_encoder", default=None, help="override the stored text model name (a local folder)")
    p.add_argument("--hf_cache_dir", default=None, help="Hugging Face cache holding the text encoder")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out = export_diffusers(args.path_to_weights, args.output, args.overwrite, args.text_encoder, args.hf_cache_dir)
    print(f"wrote {out}")
    return out


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
