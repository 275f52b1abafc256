"""lpips_trainer.py end to end on a generated BAPPS-format folder: the design's flags (sizes shrunk to 16 px),
launched with `accelerate launch`; then --evaluation_only on the checkpoint it wrote.

--pretrained_backbone and --eval_lpips_pkg need torchvision's ImageNet VGG16 file, which is not on this machine;
the test puts a random VGG16 trunk under that file name in a private $TORCH_HOME, so both code paths (our trunk
loader, the `lpips` package side by side) run for real on the same trunk.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.data.bapps_synth import generate_bapps
from src.models.lpips import VGG16_IMAGENET_FILE, load_lpips_checkpoint, vgg16_trunk

ROOT = Path(__file__).resolve().parents[1]
CKPT = "lpips_16x16_vgg.pt"


def fake_imagenet_vgg16(torch_home: Path) -> dict:
    """A random VGG16 trunk saved where torchvision keeps its ImageNet file (keys 'features.N.weight')."""
    torch.manual_seed(3)
    state = {f"features.{k}": v.half() for k, v in vgg16_trunk().state_dict().items()}
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(state, folder / VGG16_IMAGENET_FILE)
    return state


def run(cmd: list[str], env: dict) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def table(output: str, title: str) -> dict[str, float]:
    block = output.split(f"Evaluating: {title}")[1].split("Evaluating:")[0]
    return {m[0]: float(m[1]) for m in re.findall(r"(?:Dataset|JND): (\S+) -> (?:Accuracy|mAP): ([0-9.]+)", block)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lpips_run")
    data = generate_bapps(tmp / "bapps", num_train=24, num_val=16, patch_size=16, seed=0, num_jnd=16)
    trunk = fake_imagenet_vgg16(tmp / "torch_home")
    env = {**os.environ, "TORCH_HOME": str(tmp / "torch_home"), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2"}
    work = tmp / "work"
    flags = [
        "--path_to_root", str(data), "--work_dir", str(work), "--checkpoint_name", CKPT, "--img_size", "16",
        "--batch_size", "12", "--num_workers", "32", "--num_epochs", "3", "--decay_epochs", "1",
        "--logging_steps", "2", "--pretrained_backbone", "--use_dropout", "--img_range", "minus_one_to_one",
        "--middle_channels", "32", "--eval_lpips_pkg", "--mixed_precision", "--initial_lr", "1e-3",
        "--eval_batch_size", "32",
    ]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
    out = run(launch + ["lpips_trainer.py", *flags], env)
    return {"tmp": tmp, "data": data, "work": work, "env": env, "out": out, "trunk": trunk, "flags": flags}


def test_design_flags_train_and_print_both_tables(trained):
    out = trained["out"]
    ours, original = table(out, "LPIPS Reproduction"), table(out, "Original LPIPS")
    expected = {"CNN", "TRADITIONAL", "COLOR", "DEBLUR", "FRAMEINTERP", "SUPERRES"}
    assert expected <= set(ours) and expected <= set(original)
    assert re.search(r"step 2/18 .* loss [0-9.]+", out)  # a log line every --logging_steps
    assert "capped" in out  # --num_workers 32 on a small machine
    result = json.loads((trained["work"] / "eval.json").read_text())
    assert result["lpips_package"] == "evaluated"
    assert result["num_samples"]["2afc/cnn"] == 16 and result["num_samples"]["jnd/cnn"] == 16
    for name in ("LPIPS Reproduction", "Original LPIPS"):
        assert set(result["jnd"][name]) == {"traditional", "cnn", "mean"}
        assert all(0.0 <= v <= 1.0 for v in result["jnd"][name].values())


def test_short_training_beats_chance_on_held_out_triplets(trained):
    result = json.loads((trained["work"] / "eval.json").read_text())
    ours = result["2afc"]["LPIPS Reproduction"]
    assert ours["mean"] > 0.65, ours  # chance is 0.5
    losses = result["train_epoch_losses"]
    assert len(losses) == 3 and losses[-1] < losses[0], losses


def test_training_curves_reach_metrics_jsonl_and_tensorboard(trained):
    """The default tracker (TensorBoard) and metrics.jsonl get the same losses, accuracies and rates."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    work = trained["work"]
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    result = json.loads((work / "eval.json").read_text())
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == list(range(2, 19, 2))  # --logging_steps 2, 18 steps
    assert all(0 <= r["train_2afc"] <= 1 for r in logged) and logged[0]["lr"] > logged[-1]["lr"] >= 0  # decays to 0
    # the rate step n used: 1e-3 until the last epoch's 6 steps, then falling linearly (step 18 used 1e-3 / 6, not 0)
    assert [r["lr"] for r in logged] == pytest.approx([1e-3 * min(1.0, (19 - n) / 6) for n in range(2, 19, 2)])
    epochs = [r for r in rows if "epoch_loss" in r]
    assert [r["step"] for r in epochs] == [6, 12, 18]
    assert [r["epoch_loss"] for r in epochs] == pytest.approx(result["train_epoch_losses"])
    final = next(r for r in rows if "val_2afc/mean" in r)
    assert final["step"] == 18 and final["val_2afc/mean"] == pytest.approx(result["2afc"]["LPIPS Reproduction"]["mean"])
    assert final["lpips_pkg_val_2afc/mean"] == pytest.approx(result["2afc"]["Original LPIPS"]["mean"])

    events = EventAccumulator(str(work / "tensorboard" / "LPIPS"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(2, 19, 2))
    assert [e.value for e in events.Scalars("train_2afc")] == pytest.approx([r["train_2afc"] for r in logged])
    assert [(e.step, e.value) for e in events.Scalars("val_2afc/cnn")] == [
        (18, pytest.approx(result["2afc"]["LPIPS Reproduction"]["cnn"]))]


def test_checkpoint_holds_the_trunk_it_was_given_and_clamped_weights(trained):
    path = trained["work"] / CKPT
    raw = torch.load(path, weights_only=True)
    assert raw["config"]["pretrained_backbone"] is True and raw["config"]["epochs_done"] == 3
    model = load_lpips_checkpoint(path)  # stage 1's reader: no ImageNet file involved
    for key, value in trained["trunk"].items():
        assert torch.equal(model.trunk.state_dict()[key.removeprefix("features.")], value.float())  # frozen trunk
    assert all(float(lin.weight.min()) >= 0 for lin in model.lins)


def test_evaluation_only_reloads_the_checkpoint_and_prints_the_same_numbers(trained):
    flags = [f for f in trained["flags"] if f != "--eval_lpips_pkg"]
    before = json.loads((trained["work"] / "eval.json").read_text())
    out = run([sys.executable, "lpips_trainer.py", *flags, "--evaluation_only"], trained["env"])
    assert "step 2/18" not in out  # no training
    assert table(out, "LPIPS Reproduction") == table(trained["out"], "LPIPS Reproduction")
    after = json.loads((trained["work"] / "eval.json").read_text())
    assert after["2afc"]["LPIPS Reproduction"] == pytest.approx(before["2afc"]["LPIPS Reproduction"], abs=1e-9)
    assert after["jnd"]["LPIPS Reproduction"] == pytest.approx(before["jnd"]["LPIPS Reproduction"], abs=1e-9)
    assert "not requested" in after["lpips_package"]
    assert after["train_epoch_losses"] == before["train_epoch_losses"] and before["train_epoch_losses"]  # kept


@pytest.mark.parametrize("flag", ["--batch_size", "--num_epochs", "--logging_steps", "--img_size"])
def test_counts_below_one_are_usage_errors(flag, capsys):
    """--logging_steps 0 divided by zero after the first step; --num_epochs 0 reported a checkpoint it never wrote."""
    import lpips_trainer

    with pytest.raises(SystemExit) as exit_info:
        lpips_trainer.parse_args(["--path_to_root", "x", "--work_dir", "y", flag, "0"])
    assert exit_info.value.code == 2 and f"{flag} must be at least 1, got 0" in capsys.readouterr().err


def test_fp16_training_checkpoint_keeps_the_loss_scale(tmp_path):
    """Under fp16 (a GPU: accelerate gives no scaler on a CPU, so the test hands the Accelerator the CPU one) the
    training checkpoint holds accelerate's loss scaler and the resume restores its scale and growth tracker; a
    checkpoint of a run without one still resumes."""
    from accelerate import Accelerator

    from src.training.lpips_train import (LPIPSProgress, build_scheduler, resume_training_state,
                                          save_training_state)
    from tests.helpers import reset_accelerate

    def run(scaler):
        reset_accelerate()
        accelerator = Accelerator(cpu=True)
        accelerator.scaler = scaler  # what Accelerator(mixed_precision="fp16") holds on a GPU
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        return accelerator, model, optimizer, build_scheduler(optimizer, 10, 0)

    class Loader:
        batches_seen = 0
        batches_per_epoch = 10
        batch_size = 1

    trained = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    trained.load_state_dict({**trained.state_dict(), "scale": 256.0, "_growth_tracker": 7})
    accelerator, model, optimizer, scheduler = run(trained)
    save_training_state(accelerator, model, optimizer, scheduler, LPIPSProgress(step=3), tmp_path / "fp16", 3, 1)
    accelerator, model, optimizer, scheduler = run(torch.amp.GradScaler("cpu", init_scale=2.0**16))
    resume_training_state(accelerator, model, optimizer, scheduler, Loader(), tmp_path / "fp16", "latest")
    assert accelerator.scaler.get_scale() == 256.0 and accelerator.scaler.state_dict()["_growth_tracker"] == 7

    accelerator, model, optimizer, scheduler = run(None)  # fp32 run, resumed under fp16: a fresh scale
    save_training_state(accelerator, model, optimizer, scheduler, LPIPSProgress(step=3), tmp_path / "fp32", 3, 1)
    accelerator, model, optimizer, scheduler = run(torch.amp.GradScaler("cpu", init_scale=2.0**16))
    assert resume_training_state(accelerator, model, optimizer, scheduler, Loader(), tmp_path / "fp32",
                                 "latest").step == 3
    assert accelerator.scaler.get_scale() == 2.0**16



def test_a_resume_with_another_initial_lr_uses_it_where_the_schedule_is(tmp_path):
    """Saved at step 7 of 10 (decay over the last 5: factor 0.6) by a run at 1e-3, resumed with --initial_lr 1e-2:
    the next steps run at 1e-2 x 0.6, then 1e-2 x 0.4, as stage 1 and 2 take a new learning_rate. The checkpoint's
    base rate used to win, silently (and the LPIPS checkpoint recorded the new one)."""
    from accelerate import Accelerator

    from src.training.lpips_train import (LPIPSProgress, build_scheduler, rate_used, resume_training_state,
                                          save_training_state)
    from tests.helpers import reset_accelerate

    def run(lr):
        reset_accelerate()
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        return Accelerator(cpu=True), model, optimizer, build_scheduler(optimizer, 10, 5)

    class Loader:
        batches_seen = 0
        batches_per_epoch = 10
        batch_size = 1

    accelerator, model, optimizer, scheduler = run(1e-3)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    save_training_state(accelerator, model, optimizer, scheduler, LPIPSProgress(step=7), tmp_path, 7, 1)
    accelerator, model, optimizer, scheduler = run(1e-2)
    resume_training_state(accelerator, model, optimizer, scheduler, Loader(), tmp_path, "latest")
    assert optimizer.param_groups[0]["lr"] == pytest.approx(6e-3) and rate_used(scheduler, 8) == pytest.approx(6e-3)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(4e-3)



def test_a_resume_with_another_batch_size_says_so(tmp_path, caplog):
    """The LPIPS trainer counts epochs in steps of --batch_size triplets: resumed with another batch size, the rest
    of the epoch repeats or skips triplets. It went on without a word; now it warns as stage 1 and 2 do."""
    from accelerate import Accelerator

    from src.training.lpips_train import LPIPSProgress, build_scheduler, resume_training_state, save_training_state
    from tests.helpers import reset_accelerate

    reset_accelerate()
    accelerator, model = Accelerator(cpu=True), torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = build_scheduler(optimizer, 10, 0)
    save_training_state(accelerator, model, optimizer, scheduler, LPIPSProgress(step=3), tmp_path, 3, 8)

    class Loader:
        batches_seen = 0
        batches_per_epoch = 10
        batch_size = 4

    loader = Loader()
    with caplog.at_level("WARNING"):
        progress = resume_training_state(accelerator, model, optimizer, scheduler, loader, tmp_path, "latest")
    assert progress.step == 3 and loader.batches_seen == 3
    assert "written with another data layout (per_gpu_batch_size 8 -> 4)" in caplog.text


RECORDING_DRIVER = """
import os, runpy, sys
sys.path.insert(0, os.getcwd())
import src.training.lpips_train as lpips_train
ranking_loss = lpips_train.ranking_loss
record = os.path.join(sys.argv[1], "losses_%s.txt" % os.environ["RANK"])
def recorded(logits, judge):
    loss = ranking_loss(logits, judge)
    with open(record, "a") as f:
        f.write("%r\\n" % float(loss.detach()))
    return loss
lpips_train.ranking_loss = recorded
build_lpips = lpips_train.build_lpips
def build_recording(*args, **kwargs):  # each dropout's mask, drawn ahead on a fork of the RNG it is about to use
    import torch
    lpips = build_lpips(*args, **kwargs)
    def write_mask(module, inputs):
        if module.training:
            with torch.random.fork_rng(devices=[]):
                mask = torch.nn.functional.dropout(torch.ones_like(inputs[0]), module.p, True) > 0
            with open(record.replace("losses_", "masks_"), "a") as f:
                f.write("".join("01"[int(v)] for v in mask.flatten().tolist()) + "\\n")
    lpips.dropout.register_forward_pre_hook(write_mask)
    return lpips
lpips_train.build_lpips = build_recording
sys.argv = ["lpips_trainer.py"] + sys.argv[2:]
runpy.run_path("lpips_trainer.py", run_name="__main__")
"""


def test_two_processes_log_both_processes_losses_and_evaluate_to_the_one_process_numbers(tmp_path):
    """torchrun with 2 CPU processes: each step's logged loss (and the epoch loss) is the mean over both processes'
    batches, each loss read where it is computed (it was the first process's alone); each process draws its own
    dropout masks (both drew the same: one seed for every process); the evaluation, each process
    scoring half of every category, gathers the table one process computes from the same checkpoint. An unreadable
    validation patch is left out on both counts: it made the processes' batches unequal, so the gather aborted
    (JND sample 2, in one process's batch) or kept a padding duplicate in its place (2AFC sample 1, in both)."""
    import lpips_trainer
    from tests.helpers import reset_accelerate

    data = generate_bapps(tmp_path / "bapps", num_train=8, num_val=6, patch_size=16, seed=0, num_jnd=6)
    # eval batches of 4 over 6 samples: process 0 gets samples 0-3, process 1 gets 4, 5 and the padding 0, 1
    (data / "2afc/val/cnn/p0/000001.png").write_bytes(b"\x89PNG\r\n not a png")
    (data / "jnd/val/cnn/p1/000002.png").write_bytes(b"\x89PNG\r\n not a png")
    driver = tmp_path / "driver.py"
    driver.write_text(RECORDING_DRIVER)
    work = tmp_path / "work"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]
    flags = ["--path_to_root", str(data), "--work_dir", str(work), "--img_size", "16", "--batch_size", "4",
             "--num_workers", "0", "--num_epochs", "1", "--decay_epochs", "0", "--logging_steps", "1",
             "--middle_channels", "8", "--report_to", "none", "--val_sets", "cnn", "color", "--jnd_sets", "cnn",
             "--use_dropout"]
    run(torchrun + [str(driver), str(tmp_path), *flags], env)
    two = json.loads((work / "eval.json").read_text())
    reset_accelerate()
    lpips_trainer.main(lpips_trainer.parse_args(flags + ["--evaluation_only"]))
    one = json.loads((work / "eval.json").read_text())
    assert two["num_samples"] == one["num_samples"] == {"2afc/cnn": 5, "2afc/color": 6, "jnd/cnn": 5}  # scored
    for category in ("cnn", "color"):
        assert two["2afc"]["LPIPS Reproduction"][category] == pytest.approx(
            one["2afc"]["LPIPS Reproduction"][category], abs=1e-6)
    assert two["jnd"]["LPIPS Reproduction"]["cnn"] == pytest.approx(one["jnd"]["LPIPS Reproduction"]["cnn"], abs=1e-9)
    per_rank = [[float(x) for x in (tmp_path / f"losses_{r}.txt").read_text().split()] for r in (0, 1)]
    expected = [(a + b) / 2 for a, b in zip(*per_rank)]
    assert len(expected) >= 2 and per_rank[0] != per_rank[1]
    masks = [(tmp_path / f"masks_{r}.txt").read_text().split() for r in (0, 1)]
    assert len(masks[0]) == len(masks[1]) == 10 * len(expected)  # 5 layers x (d0, d1) per step
    assert all(a != b for a, b in zip(*masks))  # each process its own masks
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows if "loss" in r] == pytest.approx(expected, rel=1e-6)
    epoch = [r["epoch_loss"] for r in rows if "epoch_loss" in r]
    assert epoch == pytest.approx([sum(expected) / len(expected)], rel=1e-6)


def test_a_skipped_step_is_left_out_of_the_epoch_loss(tmp_path, monkeypatch):
    """A non-finite step adds nothing to the epoch's sum; the epoch loss divided by every step of the epoch, so
    one skipped step in six pulled it down by a sixth."""
    import math

    import lpips_trainer
    import src.training.lpips_train as lpips_train
    from tests.helpers import reset_accelerate

    data = generate_bapps(tmp_path / "bapps", num_train=8, num_val=4, patch_size=16, seed=0, num_jnd=4)
    ranking_loss, seen = lpips_train.ranking_loss, []

    def second_step_not_finite(logits, judge):
        loss = ranking_loss(logits, judge)
        seen.append(float(loss.detach()) if len(seen) != 1 else math.nan)
        return loss * math.nan if len(seen) == 2 else loss

    monkeypatch.setattr(lpips_train, "ranking_loss", second_step_not_finite)
    reset_accelerate()
    work = tmp_path / "work"
    lpips_trainer.main(lpips_trainer.parse_args([
        "--path_to_root", str(data), "--work_dir", str(work), "--img_size", "16", "--batch_size", "8",
        "--num_workers", "0", "--num_epochs", "1", "--decay_epochs", "0", "--logging_steps", "1",
        "--middle_channels", "8", "--report_to", "none", "--val_sets", "cnn", "--jnd_sets", "cnn"]))
    kept = [x for x in seen if math.isfinite(x)]
    assert len(seen) == 3 and len(kept) == 2
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows if "loss" in r] == [0, 1]  # step 2 had nothing to log
    assert [r["epoch_loss"] for r in rows if "epoch_loss" in r] == pytest.approx([sum(kept) / 2], rel=1e-6)
    assert json.loads((work / "eval.json").read_text())["train_epoch_losses"] == pytest.approx([sum(kept) / 2])
