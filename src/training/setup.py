"""What every training script shares: CLI flags, the Accelerator, trackers, optimisers and logging."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from ..config import TrainConfig
from ..data import DATASET_NAMES
from .performance import configure_backends, use_compile_cache
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
    compile_cache = use_compile_cache(cfg, args.working_directory)  # before anything compiles
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        cpu=launched_without_gpu(),
        **tracker_accelerator_kwargs(args, args.working_directory),
    )
    setup_logging(accelerator)
    set_seed(cfg.seed + accelerator.process_index)
    configure_backends(cfg)  # TF32, cudnn.benchmark (CUDA only)
    if compile_cache is not None:
        logger.info("torch.compile caches: %s (a resumed run compiles from them)", compile_cache)
    return accelerator


def init_trackers(accelerator: Accelerator, args, configs: dict, start_step: int = 0) -> None:
    """Start the --report_to trackers (project --experiment_name, run --wandb_run_name) with the run's configs;
    `start_step` > 0 for a resumed run."""
    start_trackers(accelerator, args.experiment_name, args.wandb_run_name, args.working_directory, configs, start_step)


class MetricsLog:
    """Appends one JSON line per logged step to working_directory/metrics.jsonl and forwards to trackers.

    `start_step`: the step the run starts (or resumes) from; lines of later steps left by an earlier run are
    dropped first, so a resumed run continues the file instead of repeating steps.
    """

    def __init__(self, accelerator: Accelerator, working_dir, start_step: Optional[int] = None):
        self.accelerator = accelerator
        self.path = Path(working_dir) / "metrics.jsonl"
        if start_step is not None:
            self.continue_from(start_step)

    def continue_from(self, step: int) -> None:
        """Drop the lines of steps after `step` (the step this run starts from)."""
        from .metrics import truncate_metrics

        if self.accelerator.is_main_process:
            truncate_metrics(self.path, step)

    def log(self, values: dict, step: int) -> None:
        values = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in values.items()}
        self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")


def build_trainable(name: str, module: torch.nn.Module, cfg: TrainConfig, device, lr: float, betas, weight_decay: float,
                    scheduler: str, warmup_steps: int, total_steps: int):
    """A fused AdamW over `module` (no decay on biases, norms, embeddings), its device-side LR schedule and
    clipping threshold, as one `Trainable`."""
    from .optim import LRSchedule, Trainable, build_adamw

    optimizer = build_adamw(module, lr, betas, cfg.adam_epsilon, weight_decay, device)
    schedule = LRSchedule(optimizer, scheduler, lr, warmup_steps, total_steps)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return Trainable(name, params, optimizer, schedule, cfg.max_grad_norm)


def gradient_sync(accelerator: Accelerator, models: list, sync: bool):
    """Context for one micro-batch's backward: DDP all-reduces gradients only when `sync` (the last
    micro-batch of a step); earlier ones accumulate locally under accelerator.no_sync."""
    import contextlib

    stack = contextlib.ExitStack()
    if not sync:
        for model in models:
            stack.enter_context(accelerator.no_sync(model))
    return stack


def every(step: int, interval: int) -> bool:
    """True at multiples of `interval`; never when it is 0 (the configs' "0 = never")."""
    return interval > 0 and step % interval == 0


@dataclass
class StepEvents:
    """What follows a training step: host reads (guard, metrics), a checkpoint, a stop on a signal, the end."""

    log: bool
    checkpoint: bool
    stop: bool
    end: bool


def step_events(step: int, cfg: TrainConfig, stop, accelerator: Accelerator) -> StepEvents:
    """Logs every log_every steps and at every checkpoint (every checkpoint_iterations steps and at the end); a
    stop signal is voted on at those sync points (every step for a single process) and adds both."""
    end = step == cfg.total_training_iterations
    checkpoint = every(step, cfg.checkpoint_iterations) or end
    sync_point = every(step, cfg.log_every) or checkpoint
    stopping = stop.should_stop(accelerator, sync_point) and not end
    return StepEvents(sync_point or stopping, checkpoint or stopping, stopping, end)


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
