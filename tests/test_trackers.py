"""--report_to: TensorBoard event files from tiny stage-1 and stage-2 runs read back with tensorboard's own
EventAccumulator (scalars equal to metrics.jsonl at the same steps, validation grids as images), a W&B offline
run, and the flag's choices."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from src.training.trackers import TrackerChoiceError, add_tracker_args, tracker_names
from tests.stage2_helpers import make_flat_folder, make_vae_file, run_trainer, tiny_unet, trainer_argv
from tests.helpers import reset_accelerate
from tests.stage2_helpers import write_model_config, write_train_config
from tests.test_stage1_trainer import stage1_args, write_configs


def read_jsonl(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]


def events(work: Path, project: str) -> EventAccumulator:
    run_dir = work / "tensorboard" / project
    assert list(run_dir.glob("events.out.tfevents.*")), f"no event file in {run_dir}"
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def assert_scalars_match_jsonl(acc: EventAccumulator, rows: list[dict], names: list[str]) -> None:
    """Every named metric is in the event file at the steps, and with the values, metrics.jsonl has."""
    for name in names:
        logged = {row["step"]: row[name] for row in rows if name in row}
        assert logged, f"{name} missing from metrics.jsonl"
        seen = {e.step: e.value for e in acc.Scalars(name)}
        assert sorted(seen) == sorted(logged), name
        assert all(seen[s] == pytest.approx(v, rel=1e-5, abs=1e-7) for s, v in logged.items()), name


def wait_for_records(path: Path, names: list[bytes], timeout: float = 20.0) -> bytes:
    """The bytes of a W&B run file once they hold `names`: wandb's service process writes its records (protobuf,
    keys in clear) a moment after run.finish() returns."""
    deadline = time.monotonic() + timeout
    while True:
        records = path.read_bytes()
        if all(n in records for n in names) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def run_stage1(argv: list[str]) -> None:
    import stage1_vae_trainer

    reset_accelerate()
    stage1_vae_trainer.main(argv)


def test_stage1_tensorboard_by_default_scalars_and_grids_at_their_steps(tmp_path, capsys):
    """A VQ run with the PatchGAN from step 6: every stage-1 scalar, and the reconstruction grids."""
    cfgs = write_configs(tmp_path / "cfg", quantize=True, per_gpu_batch_size=2, total_training_iterations=12,
                         checkpoint_iterations=12, val_generation_freq=6, disc_start=6, num_val_random_samples=2,
                         shapes_num_images=16)
    model = yaml.safe_load(cfgs[1].read_text())
    model["vae"].update(vae_channels_per_block=[8, 8], attention_layers=0)
    cfgs[1].write_text(yaml.safe_dump(model))
    work = tmp_path / "work"
    run_stage1(stage1_args(work, cfgs))  # no --report_to: TensorBoard, as it is installed
    out = capsys.readouterr().out
    run_dir = (work / "tensorboard" / "VAETrainer").resolve()
    assert f"TensorBoard event files: {run_dir}" in out and f"tensorboard --logdir {run_dir.parent}" in out

    acc, rows = events(work, "VAETrainer"), read_jsonl(work)
    assert [r["step"] for r in rows] == [10, 12]  # every 10 steps and at the end
    names = ["rec_loss", "vq_loss", "perplexity", "codebook_usage", "grad_norm", "lr",
             "adaptive_weight", "gen_loss", "disc_loss", "logits_real", "logits_fake", "disc_lr"]
    assert_scalars_match_jsonl(acc, rows, names)

    grids = acc.Images("reconstructions")
    assert [g.step for g in grids] == [6, 12]
    png = Image.open(work / "gens" / "step_0000012.png")
    assert (grids[-1].width, grids[-1].height) == png.size == (2 + 2 * 18, 2 + 2 * 18)
    assert not (work / "wandb").exists()


def test_stage2_report_to_all_writes_tensorboard_events_and_an_offline_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    d = tmp_path
    vae = make_vae_file(d / "vae.safetensors")
    model_cfg = write_model_config(d / "ldm.yaml", tiny_unet(), {"celebahq": 0.8})
    train = write_train_config(d / "train.yaml", total_training_iterations=4, checkpoint_iterations=4,
                               val_generation_freq=2, lr_warmup_steps=2, lr_scheduler="linear")
    work = d / "work"
    run_trainer(trainer_argv(work, train, model_cfg, vae, "celebahq", "--path_to_dataset", str(make_flat_folder(d / "faces")),
                             "--path_to_save_gens", str(work / "gens"), "--report_to", "all"))

    acc, rows = events(work, "DiffusionTrainer"), read_jsonl(work)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert_scalars_match_jsonl(acc, rows, ["loss", "lr", "ema_decay", "grad_norm"])
    lrs = [e.value for e in acc.Scalars("lr")]
    assert lrs[0] < lrs[1]  # the warm-up shows: the tracker gets each step's own rate
    decays = [e.value for e in acc.Scalars("ema_decay")]
    assert all(0 < a < b < 1 for a, b in zip(decays, decays[1:]))  # the EMA warm-up
    grids = acc.Images("validation")
    assert [g.step for g in grids] == [2, 4]
    assert (grids[0].width, grids[0].height) == Image.open(work / "gens" / "step_0000002.png").size

    runs = list((work / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb")), "W&B should write one offline run"
    names = [n.encode() for n in ("loss", "lr", "ema_decay", "grad_norm", "validation")]
    records = wait_for_records(next(runs[0].glob("run-*.wandb")), names)
    assert all(name in records for name in names), "the W&B run should hold every scalar and the grids"
    media = sorted(p.name.split("_")[1] for p in (runs[0] / "files" / "media" / "images").glob("validation_*.png"))
    assert media == ["2", "4"]  # W&B names each image file after its step


def flags(*argv: str) -> argparse.Namespace:
    return add_tracker_args(argparse.ArgumentParser()).parse_args(list(argv))


def test_report_to_choices_alias_and_errors(capsys):
    assert tracker_names(flags()) == ["tensorboard"]  # installed here, so the default
    assert tracker_names(flags("--report_to", "none")) == []
    assert tracker_names(flags("--report_to", "all")) == ["tensorboard", "wandb"]
    assert tracker_names(flags("--log_wandb")) == ["wandb"]
    assert tracker_names(flags("--log_wandb", "--report_to", "tensorboard")) == ["tensorboard", "wandb"]
    with pytest.raises(TrackerChoiceError, match="contradicts"):
        tracker_names(flags("--log_wandb", "--report_to", "none"))
    with pytest.raises(SystemExit):
        flags("--report_to", "tensorbord")
    err = capsys.readouterr().err
    assert "tensorbord" in err and all(f"'{c}'" in err for c in ("tensorboard", "wandb", "all", "none"))


def test_a_resumed_run_replaces_the_tensorboard_events_after_its_checkpoint(tmp_path):
    """The first attempt logged steps 1-4 and stopped; resumed from the step-2 checkpoint, steps 3-5 are logged
    again: TensorBoard shows one curve, 1-2 from the first attempt and 3-5 from the second."""
    from accelerate import Accelerator

    from src.training.trackers import start_trackers, tracker_accelerator_kwargs

    for start, values in ((0, {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}), (2, {3: 30.0, 4: 40.0, 5: 50.0})):
        reset_accelerate()
        accelerator = Accelerator(cpu=True, **tracker_accelerator_kwargs(flags("--report_to", "tensorboard"), tmp_path))
        start_trackers(accelerator, "run", None, tmp_path, {}, start_step=start)
        for step, value in values.items():
            accelerator.log({"loss": value}, step=step)
        accelerator.end_training()
    curve = [(e.step, e.value) for e in events(tmp_path, "run").Scalars("loss")]
    assert curve == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]


def test_a_run_started_again_at_step_0_replaces_the_events_of_an_attempt_with_no_checkpoint(tmp_path):
    """An attempt killed before its first checkpoint, run again from step 0: TensorBoard shows the new run only,
    as metrics.jsonl does, instead of a curve that doubles back to step 1."""
    from accelerate import Accelerator

    from src.training.trackers import start_trackers, tracker_accelerator_kwargs

    for values in ({1: 1.0, 2: 2.0, 3: 3.0}, {1: 10.0, 2: 20.0}):
        reset_accelerate()
        accelerator = Accelerator(cpu=True, **tracker_accelerator_kwargs(flags("--report_to", "tensorboard"), tmp_path))
        start_trackers(accelerator, "run", None, tmp_path, {}, start_step=0)
        for step, value in values.items():
            accelerator.log({"loss": value}, step=step)
        accelerator.end_training()
    assert [(e.step, e.value) for e in events(tmp_path, "run").Scalars("loss")] == [(1, 10.0), (2, 20.0)]


def log_attempts(tmp_path, report_to: str, attempts, configs=None) -> list[str]:
    """Start the trackers once per (start_step, {step: loss}) attempt in the same working directory, as each
    start of a resumed run does; returns the W&B run id of each attempt (none without W&B)."""
    from accelerate import Accelerator

    from src.training.trackers import start_trackers, tracker_accelerator_kwargs

    ids = []
    for attempt, (start, values) in enumerate(attempts):
        if attempt and report_to in ("tensorboard", "all"):
            # TensorBoard reads a run's event files in name order: time in whole seconds, host, pid, then a
            # per-process counter, which sorts "10" before "9". A resumed run is a new process, seconds later;
            # attempts made here in one process within one second could be read back out of order.
            time.sleep(1.0 - time.time() % 1.0 + 0.01)
        reset_accelerate()
        accelerator = Accelerator(cpu=True, **tracker_accelerator_kwargs(flags("--report_to", report_to), tmp_path))
        start_trackers(accelerator, "run", "name", tmp_path, configs or {}, start_step=start)
        for step, value in values.items():
            accelerator.log({"loss": value}, step=step)
        if report_to in ("wandb", "all"):
            ids.append(accelerator.get_tracker("wandb").run.id)
        accelerator.end_training()
    return ids


def test_tensorboard_hparams_go_into_the_run_itself_not_a_new_folder_per_start(tmp_path):
    """accelerate's add_hparams wrote two timestamped sub-folders per start (4 after one resume), each shown as a run
    of its own holding only the hparams; they now sit in the run's own event files, whose scalars stay one curve."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    log_attempts(tmp_path, "tensorboard", [(0, {1: 1.0, 2: 2.0, 3: 3.0}), (2, {3: 30.0})],
                 {"train": {"learning_rate": 0.001, "betas": [0.9, 0.99]}})
    run_dir = tmp_path / "tensorboard" / "run"
    assert [p.name for p in run_dir.iterdir() if p.is_dir()] == []
    acc = events(tmp_path, "run")
    start = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["train/learning_rate"].number_value == 0.001
    assert hparams["train/betas"].string_value == "[0.9, 0.99]"
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_a_resumed_run_continues_its_wandb_run_and_a_fresh_start_opens_a_new_one(tmp_path, monkeypatch, caplog):
    """Each start opened a new W&B run: a run stopped and resumed twice was three runs of a third of a curve each.
    A resume (start step > 0) continues the run recorded in wandb/run_id.txt; a start at step 0 is a new run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    caplog.set_level(logging.INFO, logger="ldm")
    first, resumed = log_attempts(tmp_path, "wandb", [(0, {1: 1.0, 2: 2.0}), (2, {3: 3.0})])
    assert resumed == first
    files = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")  # two offline folders, one run: run-<id>.wandb
    assert sorted(p.stem for p in files) == [f"run-{first}"] * 2
    assert (tmp_path / "wandb" / "run_id.txt").read_text().strip() == first
    assert f"upload with: wandb sync {tmp_path / 'wandb'}/offline-run-*-{first}*" in caplog.text
    from src.training.trackers import wandb_init_kwargs

    assert "id" not in wandb_init_kwargs("name", tmp_path, 0)  # started again at step 0: a new run
    assert wandb_init_kwargs("name", tmp_path, 2) == {"name": "name", "dir": str(tmp_path), "id": first,
                                                      "resume": "allow"}


def rates_used(name: str, base_lr: float, warmup: int, total: int) -> list[float]:
    """The rate of each of `total` optimizer steps under transformers' scheduler `name` (read before the step)."""
    import torch
    from transformers import get_scheduler

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)
    used = []
    for _ in range(total):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return used


def test_stage2_logs_the_learning_rate_each_step_used(tmp_path):
    """lr and ema_decay at step n are those of update n (lr 0 at the first warm-up step), not the next update's."""
    d = tmp_path
    vae = make_vae_file(d / "vae.safetensors")
    model_cfg = write_model_config(d / "ldm.yaml", tiny_unet(), {"celebahq": 0.8})
    train = write_train_config(d / "train.yaml", total_training_iterations=5, checkpoint_iterations=5, lr_warmup_steps=2,
                               lr_scheduler="linear", gradient_accumulation_steps=2, learning_rate=1e-3)
    work = d / "work"
    run_trainer(trainer_argv(work, train, model_cfg, vae, "celebahq", "--path_to_dataset", str(make_flat_folder(d / "faces")),
                             "--report_to", "none"))
    rows = read_jsonl(work)
    assert [row["lr"] for row in rows] == pytest.approx(rates_used("linear", 1e-3, 2, 5), abs=1e-9)  # 0, 5e-4, 1e-3, ...
    # the EMA's warm-up decay of update n (0-based count k = n - 1): min(0.99, (1 + k) / (10 + k))
    assert [row["ema_decay"] for row in rows] == pytest.approx([min(0.99, (1 + k) / (10 + k)) for k in range(5)])


def test_stage1_logs_the_learning_rates_each_step_used(tmp_path):
    """lr and disc_lr at step n are the rates of that step's updates (the discriminator's count from disc_start)."""
    cfgs = write_configs(tmp_path / "cfg", per_gpu_batch_size=2, total_training_iterations=6, checkpoint_iterations=6,
                         val_generation_freq=0, disc_start=2, num_val_random_samples=2, shapes_num_images=16,
                         lr_warmup_steps=2, lr_scheduler="linear", learning_rate=1e-3, disc_lr_warmup_steps=2,
                         disc_lr_scheduler="linear", disc_learning_rate=1e-4, log_every=1)
    model = yaml.safe_load(cfgs[1].read_text())
    model["vae"].update(vae_channels_per_block=[8, 8], attention_layers=0)
    cfgs[1].write_text(yaml.safe_dump(model))
    work = tmp_path / "work"
    run_stage1(stage1_args(work, cfgs) + ["--report_to", "none"])
    rows = read_jsonl(work)
    assert [r["lr"] for r in rows] == pytest.approx(rates_used("linear", 1e-3, 2, 6), abs=1e-9)
    # the discriminator trains from step 3 on: 4 updates under its own schedule
    assert [r["disc_lr"] for r in rows[2:]] == pytest.approx(rates_used("linear", 1e-4, 2, 4), abs=1e-10)


def test_wandb_asked_for_but_not_installed_is_an_error_not_a_silent_run_without_it(monkeypatch):
    """accelerate drops a tracker whose package is missing with a warning: the run went on logging to no W&B run."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # as on a machine without the package
    for argv in (["--report_to", "wandb"], ["--report_to", "all"], ["--log_wandb"]):
        with pytest.raises(TrackerChoiceError, match="needs the wandb package"):
            tracker_names(flags(*argv))
    assert tracker_names(flags("--report_to", "tensorboard")) == ["tensorboard"]
