"""Experiment trackers (TensorBoard, Weights & Biases) for every trainer: the `--report_to` flag, the
Accelerator's tracker settings, start-up with a log line saying where the run is recorded, and validation
grids sent as images. Scalars reach the trackers through `MetricsLog` (src/training/setup.py) as
`accelerator.log(values, step)`, under the same names as in metrics.jsonl.

TensorBoard event files go to working_directory/tensorboard/<experiment_name>/; W&B writes
working_directory/wandb/ (offline runs too, with WANDB_MODE=offline), and a resumed run continues the W&B run of
the earlier attempts (working_directory/wandb/run_id.txt).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
from pathlib import Path

import numpy as np
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

logger = logging.getLogger("ldm")

REPORT_TO_CHOICES = ("tensorboard", "wandb", "all", "none")
TENSORBOARD_SUBDIR = "tensorboard"
WANDB_RUN_ID_FILE = "run_id.txt"  # in working_dir/wandb/: the W&B run a resumed run continues


class TrackerChoiceError(ValueError):
    """Flags that name trackers in a way no run can honour (contradicting, or not installed)."""


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def wandb_available() -> bool:
    return importlib.util.find_spec("wandb") is not None


def default_report_to() -> str:
    """tensorboard when the package is installed, otherwise none."""
    return "tensorboard" if tensorboard_available() else "none"


def add_tracker_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--report_to tensorboard|wandb|all|none, and --log_wandb (its alias for wandb)."""
    parser.add_argument(
        "--report_to", default=None, choices=REPORT_TO_CHOICES,
        help="where scalars and validation grids go (default: tensorboard when installed, otherwise none)",
    )
    parser.add_argument(
        "--log_wandb", action="store_true",
        help="alias of --report_to wandb (with --report_to tensorboard: both); WANDB_MODE=offline works",
    )
    return parser


def tracker_names(args) -> list[str]:
    """The trackers the flags ask for: a sub-list of ['tensorboard', 'wandb']."""
    report_to = getattr(args, "report_to", None)
    if getattr(args, "log_wandb", False):
        if report_to == "none":
            raise TrackerChoiceError("--log_wandb (W&B) contradicts --report_to none: pass one of them")
        report_to = "all" if report_to in ("tensorboard", "all") else "wandb"
    report_to = report_to or default_report_to()
    if report_to not in REPORT_TO_CHOICES:
        raise TrackerChoiceError(f"--report_to {report_to!r} is not one of: {', '.join(REPORT_TO_CHOICES)}")
    names = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"], "none": []}[report_to]
    if "tensorboard" in names and not tensorboard_available():
        raise TrackerChoiceError(
            "--report_to tensorboard needs the tensorboard package (pip install -r requirements.txt), "
            "or pass --report_to wandb|none"
        )
    if "wandb" in names and not wandb_available():  # accelerate would only warn, and the run log to no W&B run
        raise TrackerChoiceError(
            "--report_to wandb / all (or --log_wandb) needs the wandb package (pip install -r requirements.txt), "
            "or pass --report_to tensorboard|none"
        )
    return names


def tracker_accelerator_kwargs(args, working_dir) -> dict:
    """Accelerator(**these): the chosen trackers, and the folders their files go to."""
    working_dir = Path(working_dir)
    config = ProjectConfiguration(project_dir=str(working_dir), logging_dir=str(working_dir / TENSORBOARD_SUBDIR))
    return {"log_with": tracker_names(args) or None, "project_config": config}


def tracker_config(configs: dict) -> dict:
    """{section: dataclass config or dict} -> flat {'section/key': scalar} (lists and dicts as JSON, None as 'None')."""
    from ..config import to_dict

    sections = {name: cfg if isinstance(cfg, dict) else to_dict(cfg) for name, cfg in configs.items()}
    flat = {f"{section}/{k}": v for section, values in sections.items() for k, v in values.items()}
    return {k: (json.dumps(v) if isinstance(v, (list, dict)) else "None" if v is None else v) for k, v in flat.items()}


def start_trackers(
    accelerator: Accelerator, project: str, run_name, working_dir, configs: dict, start_step: int = 0
) -> None:
    """accelerator.init_trackers with the run's configs, then one log line per tracker saying where it writes.

    A run resumed at `start_step` continues what the earlier attempts recorded: TensorBoard hides the events an
    earlier attempt wrote after that step (SummaryWriter's purge_step), so its curves continue instead of doubling
    back, and W&B continues the same run (its id is kept in working_dir/wandb/run_id.txt)."""
    init_kwargs = {"wandb": wandb_init_kwargs(run_name, working_dir, start_step)}
    # events up to start_step stay; a run (re)started at step 0 hides every event of an attempt that died
    # before its first checkpoint (metrics.jsonl drops those lines too)
    init_kwargs["tensorboard"] = {"purge_step": start_step + 1}
    accelerator.init_trackers(project, init_kwargs=init_kwargs)
    if accelerator.is_main_process:
        if configs:
            store_config(accelerator, tracker_config(configs))
        for tracker in accelerator.trackers:
            if tracker.name == "wandb":
                save_wandb_run_id(working_dir, tracker.run.id)
            logger.info(tracker_location(tracker))


def wandb_run_id_file(working_dir) -> Path:
    return Path(working_dir) / "wandb" / WANDB_RUN_ID_FILE


def wandb_init_kwargs(run_name, working_dir, start_step: int) -> dict:
    """wandb.init(**these): a resumed run (start_step > 0) continues the W&B run of the earlier attempts (one
    curve, not a new run per start); a run starting at step 0 is a new W&B run. WANDB_RUN_ID, when set, wins."""
    kwargs = {"name": run_name, "dir": str(working_dir)}
    id_file = wandb_run_id_file(working_dir)
    if start_step > 0 and id_file.is_file() and not os.environ.get("WANDB_RUN_ID"):
        kwargs.update(id=id_file.read_text().strip(), resume="allow")
    return kwargs


def save_wandb_run_id(working_dir, run_id: str) -> None:
    id_file = wandb_run_id_file(working_dir)
    id_file.parent.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id + "\n")


def store_config(accelerator: Accelerator, values: dict) -> None:
    """The run's flat config to every tracker (main process). TensorBoard gets it as hparams in the run's own event
    file: accelerate's store_init_configuration (SummaryWriter.add_hparams) wrote two more folders per start, each
    a separate run holding nothing but the hparams."""
    from torch.utils.tensorboard.summary import hparams

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for summary in hparams(values, {}):  # experiment, session start, session end
                tracker.writer.file_writer.add_summary(summary)
            tracker.writer.flush()
        else:
            tracker.store_init_configuration(values)


def tracker_location(tracker) -> str:
    """Where a started tracker writes, and how to look at it."""
    if tracker.name == "tensorboard":
        run_dir = Path(tracker.logging_dir).resolve()
        return f"TensorBoard event files: {run_dir}  (open with: tensorboard --logdir {run_dir.parent})"
    if tracker.name == "wandb":
        run = tracker.run
        where = getattr(getattr(run, "settings", None), "sync_dir", None) or run.dir
        if getattr(run, "offline", False):  # a resumed run: one folder per start, synced in order as one run
            starts = list(Path(where).parent.glob(f"offline-run-*-{run.id}*"))
            upload = where if len(starts) <= 1 else Path(where).parent / f"offline-run-*-{run.id}*"
            return f"W&B offline run: {where}  (upload with: wandb sync {upload})"
        return f"W&B run: {getattr(run, 'url', None) or where}"
    return f"tracker {tracker.name} started"


def log_image(accelerator: Accelerator, tag: str, path, step: int) -> None:
    """Send a PNG grid to the image-capable trackers (TensorBoard, W&B) at `step`; metrics.jsonl keeps scalars."""
    from PIL import Image

    if not accelerator.trackers:
        return
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB"))  # (H, W, 3) uint8
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, pixels, global_step=step, dataformats="HWC")
            tracker.writer.flush()
        elif tracker.name == "wandb":
            tracker.log_images({tag: [pixels]}, step=step)
