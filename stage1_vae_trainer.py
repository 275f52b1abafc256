"""Stage 1: train the autoencoder (KL-VAE, or VQ-VAE with `quantize: True`) with LPIPS and a delayed PatchGAN.

    accelerate launch stage1_vae_trainer.py --experiment_name "VAETrainer" --wandb_run_name "vae_celeba" \
        --working_directory "work_dir/vae_celeba" --training_config "configs/stage1_vae_train.yaml" \
        --model_config "configs/ldm.yaml" --dataset celebahq --path_to_dataset "<PATH_TO_CELEBAHQ>" \
        --path_to_save_gens "src/celebahq_vae_gen"

Plain `python stage1_vae_trainer.py ...` works too. Writes checkpoint_N folders and, at the end,
working_directory/model.safetensors (the autoencoder with its resolved configs) for stage 2. On SIGTERM or
SIGUSR1 it finishes the current step, writes a checkpoint and exits with status 0 (README, "Long runs").
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from src.cli import run_cli
from src.training.checkpoint import check_fresh_start
from src.training.setup import add_stage_args, init_trackers, make_accelerator
from src.training.stage1 import (
    build_stage1,
    build_stage1_dataset,
    latent_shape,
    load_stage1_configs,
    maybe_resume,
    save_final_model,
    train_stage1,
)
from src.training.user_errors import TRAINING_INPUT_ERRORS

logger = logging.getLogger("ldm.stage1")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_stage_args(parser).parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    train_cfg, model_cfg = load_stage1_configs(args.training_config, args.model_config)  # fails before any model
    check_fresh_start(args.working_directory, args.resume_from_checkpoint)  # an earlier run's checkpoints: resume
    Path(args.working_directory).mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(args, train_cfg)
    dataset = build_stage1_dataset(args, model_cfg, train_cfg)
    state, loss_fn = build_stage1(accelerator, model_cfg, train_cfg)
    maybe_resume(accelerator, state, args.working_directory, args.resume_from_checkpoint, train_cfg)
    init_trackers(accelerator, args, {"model": model_cfg.vae, "train": train_cfg}, start_step=state.step)
    logger.info("training on %s (%d images), latent %s", args.dataset, len(dataset), latent_shape(model_cfg))
    finished = train_stage1(accelerator, args, state, loss_fn, dataset, train_cfg)
    if finished:
        path = save_final_model(accelerator, state, args, model_cfg, train_cfg)
        if path is not None:
            logger.info("autoencoder written to %s", path)
    accelerator.end_training()


if __name__ == "__main__":
    run_cli(main, TRAINING_INPUT_ERRORS)
