"""Stage 2: train a diffusion UNet in the latent space of a frozen stage-1 VAE.

    accelerate launch stage2_diffusion_trainer.py \
        --experiment_name "DiffusionTrainer" --wandb_run_name "diffusion_celebahq" \
        --working_directory "work_dir/diffusion_celebahq" \
        --training_config "configs/stage2_diffusion_train.yaml" --model_config "configs/ldm.yaml" \
        --path_to_vae_backbone "<PATH_TO_VAE.safetensors>" \
        --dataset celebahq --path_to_dataset "<PATH_TO_DATA>" --path_to_save_gens "src/diffusion_celebahq"

The dataset decides the conditioning (celebahq: none; imagenet: class labels when unet.class_conditioning;
shapes / conceptual_captions: text). Latents are multiplied by scaling_constants[dataset] of the model config
(compute_vae_scaling.py --update_config writes it; a diffusers VAE brings its own config's scaling_factor).
--path_to_vae_backbone also takes a diffusers AutoencoderKL folder (Stable Diffusion's vae/), converted on load;
--init_unet starts from a diffusers UNet2DConditionModel or a stage-2 model file. --cache_latents DIR encodes the dataset once and trains from the
cache. working_directory/model.safetensors ends up holding the EMA UNet, the VAE and every config; inference_ldm.py
needs nothing else but the text encoder. On SIGTERM or SIGUSR1 it finishes the current step, writes a checkpoint
and exits with status 0 (README, "Long runs").
"""

from __future__ import annotations

import argparse
from pathlib import Path

from src.cli import run_cli
from src.config import Stage2TrainConfig, load_config, load_model_config
from src.data.loader import InfiniteLoader
from src.training.checkpoint import check_fresh_start
from src.training.setup import add_stage_args, init_trackers, make_accelerator
from src.training.stage2 import (
    build_training_state,
    resume_training,
    save_final_model,
    setup_context,
    train_loop,
)
from src.training.user_errors import TRAINING_INPUT_ERRORS


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stage_args(parser)
    parser.add_argument("--path_to_vae_backbone", required=True,
                        help="the frozen VAE: stage-1 model.safetensors, or a diffusers AutoencoderKL folder "
                        "(config.json + diffusion_pytorch_model.safetensors, e.g. Stable Diffusion's vae/)")
    parser.add_argument("--init_unet", default=None, metavar="PATH",
                        help="start from these UNet weights: a diffusers UNet2DConditionModel folder (or a pipeline "
                        "folder with unet/) or a stage-2 model.safetensors; its architecture replaces the unet section")
    parser.add_argument(
        "--cache_latents", default=None, metavar="DIR",
        help="encode the dataset once into DIR (posterior mean/std, text embeddings) and train from it; "
        "a cache made with another VAE or config is refused",
    )
    parser.add_argument("--val_prompts", default=None, help="prompts file for validation grids "
                        "(default: sample_text_cond_prompts.txt at the repository root)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    train_cfg = load_config(args.training_config, Stage2TrainConfig)
    model_cfg = load_model_config(args.model_config)
    check_fresh_start(args.working_directory, args.resume_from_checkpoint)  # an earlier run's checkpoints: resume
    accelerator = make_accelerator(args, train_cfg)
    Path(args.working_directory).mkdir(parents=True, exist_ok=True)
    ctx, dataset = setup_context(args, accelerator, train_cfg, model_cfg)
    state = build_training_state(accelerator, ctx)
    resume_training(accelerator, state, ctx, args.working_directory, args.resume_from_checkpoint)
    loader = InfiniteLoader(
        dataset, train_cfg.per_gpu_batch_size, seed=train_cfg.seed, rank=accelerator.process_index,
        world_size=accelerator.num_processes, num_workers=train_cfg.num_workers, pin_memory=train_cfg.pin_memory,
        start_batch=state.loader_position,
    )
    init_trackers(
        accelerator, args, {"train": train_cfg, "vae": ctx.model_cfg.vae, "unet": ctx.model_cfg.unet}, start_step=state.step
    )
    finished = train_loop(args, accelerator, ctx, state, loader)
    if finished and accelerator.is_main_process:
        save_final_model(ctx, state.ema.shadow, args.working_directory)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    run_cli(main, TRAINING_INPUT_ERRORS)
