"""Train (or evaluate) an LPIPS perceptual metric on BAPPS, then score it per category against people.

    accelerate launch lpips_trainer.py --path_to_root <PATH_TO_DATA_ROOT> --work_dir <PATH_TO_WORK_DIR> \
      --checkpoint_name "lpips_64x64_vgg.pt" --img_size 64 --batch_size 25 --num_workers 32 --num_epochs 10 \
      --decay_epochs 5 --logging_steps 250 --pretrained_backbone --use_dropout \
      --img_range minus_one_to_one --middle_channels 32 --eval_lpips_pkg --mixed_precision

Writes work_dir/checkpoint_name (stage 1's `lpips_checkpoint`) and work_dir/eval.json, and after every epoch a
training checkpoint work_dir/checkpoint_<step>; on SIGTERM or SIGUSR1 it finishes the current step, writes one
and exits with status 0 (continue with --resume_from_checkpoint latest). No BAPPS at hand?
`python -m src.data.bapps_synth --out data/bapps_synth` writes a synthetic one in the same layout.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Optional

from accelerate import Accelerator
from accelerate.utils import set_seed

from src.cli import run_cli
from src.data.bapps import IMG_RANGES, JND_CATEGORIES, TRAIN_CATEGORIES, VAL_CATEGORIES
from src.losses.ranking import RankingHead
from src.models.lpips import load_lpips_checkpoint
from src.training.checkpoint import check_fresh_start
from src.training.lpips_eval import (
    comparison_metrics,
    evaluate_bapps,
    format_results,
    results_as_scalars,
    write_eval_json,
)
from src.training.lpips_train import (
    LPIPSTrainSettings,
    TwoAFCModel,
    available_workers,
    build_adam,
    build_lpips,
    build_scheduler,
    make_train_loader,
    resume_training_state,
    train_lpips,
)
from src.training.setup import MetricsLog, launched_without_gpu, setup_logging
from src.training.trackers import add_tracker_args, start_trackers, tracker_accelerator_kwargs
from src.training.user_errors import TRAINING_INPUT_ERRORS

logger = logging.getLogger("ldm")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path_to_root", required=True, help="BAPPS root (holding 2afc/ and jnd/) or its 2afc/ folder")
    p.add_argument("--work_dir", required=True, help="where the checkpoint and eval.json go")
    p.add_argument("--checkpoint_name", default="lpips_64x64_vgg.pt", help="file name; .pt or .safetensors")
    p.add_argument("--img_size", type=int, default=64, help="patches are resized to this")
    p.add_argument("--batch_size", type=int, default=50, help="training triplets per step and process")
    p.add_argument("--eval_batch_size", type=int, default=None, help="default: --batch_size")
    p.add_argument("--num_workers", type=int, default=4, help="data workers (capped at the CPUs available)")
    p.add_argument("--num_epochs", type=int, default=10, help="total epochs, decay included")
    p.add_argument("--decay_epochs", type=int, default=5, help="last epochs over which the rate falls to 0")
    p.add_argument("--initial_lr", type=float, default=1e-4)
    p.add_argument("--logging_steps", type=int, default=250, help="a log line every this many steps")
    p.add_argument("--pretrained_backbone", action="store_true", help="ImageNet VGG16 trunk from the torch cache")
    p.add_argument("--train_backbone", action="store_true", help="fine-tune the trunk too (frozen otherwise)")
    p.add_argument("--use_dropout", action="store_true", help="dropout before the linear layers while training")
    p.add_argument("--img_range", choices=IMG_RANGES, default="minus_one_to_one", help="range patches load in")
    p.add_argument("--middle_channels", type=int, default=32, help="width of the ranking head")
    p.add_argument("--eval_lpips_pkg", action="store_true", help="also score the `lpips` package, same batches")
    p.add_argument(
        "--mixed_precision", nargs="?", const=None, default=None, choices=["no", "fp16", "bf16"],
        help="no value: accelerate's setting (accelerate launch/config); a value is used as given",
    )
    p.add_argument("--train_sets", nargs="+", choices=TRAIN_CATEGORIES, default=list(TRAIN_CATEGORIES))
    p.add_argument("--val_sets", nargs="+", choices=VAL_CATEGORIES, default=list(VAL_CATEGORIES))
    p.add_argument("--jnd_sets", nargs="*", choices=JND_CATEGORIES, default=list(JND_CATEGORIES))
    p.add_argument("--evaluation_only", action="store_true", help="evaluate work_dir/checkpoint_name, no training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--experiment_name", default="LPIPS", help="tracker project name (TensorBoard run folder)")
    add_tracker_args(p)  # --report_to tensorboard|wandb|all|none, --log_wandb
    p.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest' or a work_dir/checkpoint_N folder (written after every epoch and on SIGTERM/SIGUSR1)")
    args = p.parse_args(argv)
    for flag in ("batch_size", "num_epochs", "logging_steps", "img_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if not 0 <= args.decay_epochs <= args.num_epochs:
        p.error(f"--decay_epochs ({args.decay_epochs}) must be between 0 and --num_epochs ({args.num_epochs})")
    args.eval_batch_size = args.eval_batch_size or args.batch_size
    return args


def train(args, accelerator, checkpoint: Path, metrics: MetricsLog):
    """Train from scratch or from --resume_from_checkpoint. Returns the trained LPIPS (eval mode), the epoch losses
    and the number of steps, or Nones when a stop signal ended the run early (after a training checkpoint)."""
    work_dir = Path(args.work_dir)
    loader = make_train_loader(
        args.path_to_root, args.train_sets, args.img_size, args.img_range, args.batch_size, args.seed,
        available_workers(args.num_workers), accelerator,
    )
    lpips = build_lpips(args.use_dropout, args.pretrained_backbone, args.train_backbone)
    model = TwoAFCModel(lpips, RankingHead(args.middle_channels))
    optimizer = build_adam(model, args.initial_lr)
    total = args.num_epochs * loader.batches_per_epoch
    scheduler = build_scheduler(optimizer, total, args.decay_epochs * loader.batches_per_epoch)
    model, optimizer = accelerator.prepare(model, optimizer)
    progress = resume_training_state(accelerator, model, optimizer, scheduler, loader, work_dir,
                                     args.resume_from_checkpoint)
    start_trackers(accelerator, args.experiment_name, None, work_dir, {"args": vars(args)}, progress.step)
    metrics.continue_from(progress.step)
    settings = LPIPSTrainSettings(
        args.num_epochs, args.decay_epochs, args.initial_lr, args.logging_steps, args.img_range
    )
    info = {k: getattr(args, k) for k in ("img_size", "img_range", "middle_channels", "pretrained_backbone",
                                          "train_backbone", "train_sets", "initial_lr", "batch_size", "seed")}
    if not train_lpips(accelerator, model, optimizer, scheduler, loader, settings, checkpoint, info, progress, work_dir,
                       metrics):
        return None, None, None
    return accelerator.unwrap_model(model).lpips.eval(), progress.epoch_losses, total


def earlier_epoch_losses(path: Path) -> Optional[list]:
    """The training losses an earlier eval.json in this work_dir holds (None when there is none)."""
    try:
        return json.loads(path.read_text()).get("train_epoch_losses")
    except (OSError, ValueError, AttributeError):
        return None


def main(args) -> dict:
    accelerator = Accelerator(  # torchrun on CPU: gloo
        mixed_precision=args.mixed_precision, cpu=launched_without_gpu(),
        **tracker_accelerator_kwargs(args, args.work_dir),
    )
    setup_logging(accelerator)
    set_seed(args.seed + accelerator.process_index)  # each process its own dropout masks (as stages 1 and 2)
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = work_dir / args.checkpoint_name
    losses = steps = metrics_log = None
    if args.evaluation_only:
        lpips = load_lpips_checkpoint(checkpoint)
        logger.info("evaluating %s", checkpoint)
    else:
        check_fresh_start(work_dir, args.resume_from_checkpoint)  # an earlier run's checkpoints: resume
        metrics_log = MetricsLog(accelerator, work_dir)
        lpips, losses, steps = train(args, accelerator, checkpoint, metrics_log)
        if lpips is None:  # stopped by a signal: the training checkpoint is written, evaluation waits for the end
            accelerator.end_training()
            return {}
        logger.info("saved %s", checkpoint)
    metrics, note = comparison_metrics(lpips, args.eval_lpips_pkg, accelerator)
    results = evaluate_bapps(
        metrics, args.path_to_root, args.val_sets, args.jnd_sets, args.img_size, args.img_range,
        args.eval_batch_size, available_workers(args.num_workers), accelerator,
    )
    accelerator.print(format_results(results))
    if steps is not None:  # a training run: its held-out scores join its curves
        metrics_log.log(results_as_scalars(results), steps)
    if accelerator.is_main_process:
        if losses is None:  # --evaluation_only: the training run's losses stay in eval.json
            losses = earlier_epoch_losses(work_dir / "eval.json")
        info = {"checkpoint": str(checkpoint), "lpips_package": note, "train_epoch_losses": losses,
                "mixed_precision": accelerator.mixed_precision}
        write_eval_json(work_dir / "eval.json", results, info)
    accelerator.end_training()
    return results


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()), TRAINING_INPUT_ERRORS)
