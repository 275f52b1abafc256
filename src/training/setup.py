"""What every training script shares: CLI flags, the Accelerator, trackers, optimisers and logging."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Iterable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from ..config import TrainConfig
from ..data import DATASET_NAMES
from .trackers import add_tracker_args, start_trackers, tracker_accelerator_kwargs

logger = logging.getLogger("ldm")


def add_stage_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags both stage trainers take (the design document's names)."""
    parser.add_argument("--experiment_name", default="LDM", help="tracker project name")
    parser.add_argument("--wandb_run_name", default=None, help="run name shown in W&B")
    parser.add_argument("--working_directory", required=True, help="checkpoints, logs and model.safetensors")
    add_tracker_args(parser)  # --report_to tensorboard|wandb|all|none, --log_wandb
    parser.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint_N folder, or 'latest'")
    parser.add_argument("--training_config", required=True, help="training YAML")
    parser.add_argument("--model_config", default="configs/ldm.yaml", help="model YAML (default configs/ldm.yaml)")
    parser.add_argument("--dataset", required=True, choices=DATASET_NAMES)
    parser.add_argument("--path_to_dataset", default=None, help="dataset folder (not needed for 'shapes')")
    parser.add_argument("--path_to_save_gens", default=None, help="where PNG grids go (default working_directory/gens)")
    return parser


def setup_logging(accelerator: Accelerator) -> None:
    level = logging.INFO if accelerator.is_main_process else logging.WARNING
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout, force=True
    )


def launched_without_gpu() -> bool:
    """True under a multi-process launcher (torchrun) on a machine without CUDA: accelerate only reads the
    launcher's environment as a multi-CPU (gloo) run when asked for the CPU explicitly."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def make_accelerator(args, cfg: TrainConfig) -> Accelerator:
    """An Accelerator with gradient accumulation, mixed precision from `accelerate launch` and trackers."""
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        cpu=launched_without_gpu(),
        **tracker_accelerator_kwargs(args, args.working_directory),
    )
    setup_logging(accelerator)
    set_seed(cfg.seed + accelerator.process_index)
    return accelerator


def init_trackers(accelerator: Accelerator, args, configs: dict, start_step: int = 0) -> None:
    """Start the --report_to trackers (project --experiment_name, run --wandb_run_name) with the run's configs;
    `start_step` > 0 for a resumed run."""
    start_trackers(accelerator, args.experiment_name, args.wandb_run_name, args.working_directory, configs, start_step)


class MetricsLog:
    """Appends one JSON line per logged step to working_directory/metrics.jsonl and forwards to trackers."""

    def __init__(self, accelerator: Accelerator, working_dir):
        self.accelerator = accelerator
        self.path = Path(working_dir) / "metrics.jsonl"

    def log(self, values: dict, step: int) -> None:
        values = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in values.items()}
        self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig, lr: Optional[float] = None):
    return torch.optim.AdamW(
        [p for p in params if p.requires_grad],
        lr=cfg.learning_rate if lr is None else lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
    )


def build_scheduler(name: str, optimizer, warmup_steps: int, total_steps: int):
    from transformers import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def progress_bar(accelerator: Accelerator, total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not accelerator.is_main_process,
        dynamic_ncols=True,
        mininterval=float(os.environ.get("LDM_PROGRESS_INTERVAL", "1.0")),
    )
