"""Long runs: a real SIGTERM / SIGUSR1 stops a trainer after its step with a checkpoint, and
--resume_from_checkpoint latest then ends bit-identical to an uninterrupted run (every checkpoint file, the final
model and metrics.jsonl): stage 1 under fp16 with its loss scaler, stage 2 under fp16, the LPIPS trainer, and
stage 1 under bf16 with torchrun and 2 processes where only one process gets the signal. Also: mixed precision
matches fp32 within tolerance, zero intervals mean "never", and a failed checkpoint write stops stage 2, whose
resume continues metrics.jsonl without repeating a step.

The signal comes from the dataset: on its n-th item read it sends the signal to its own process, so that it
arrives at a known point in the middle of a step, as os.kill from outside would.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from src.models.serialization import load_models

from tests.conftest import ROOT
from tests.stage2_helpers import (
    make_flat_folder,
    make_image_folders,
    make_vae_file,
    tiny_unet,
    trainer_argv,
    write_model_config,
    write_train_config,
)
from tests.test_stage1_trainer import metrics, stage1_args, write_configs

SIGNAL_ON_READ = '''
import os, signal
from torch.utils.data import Dataset


class SignalOnRead(Dataset):
    """`dataset`, sending `sig` to this very process when its n-th item is read."""

    def __init__(self, dataset, n, sig):
        self.dataset, self.n, self.sig, self.reads = dataset, n, sig, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        self.reads += 1
        if self.reads == self.n:
            os.kill(os.getpid(), self.sig)
        return self.dataset[index]

    def __getattr__(self, name):  # .classes and the like
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
'''
exec(SIGNAL_ON_READ)  # defines SignalOnRead here; the torchrun script below gets the same text


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def signals_caught():
    """A stray signal must not kill pytest: a no-op handler under the trainers' own (which they restore)."""
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def run_main(module: str, argv) -> None:
    """A trainer's main in this process, with accelerate's process-wide state reset first."""
    from tests.helpers import reset_accelerate

    reset_accelerate()
    mod = importlib.import_module(module)
    mod.main(mod.parse_args(argv) if module == "lpips_trainer" else argv)


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())["files"]


def checkpoints(work: Path) -> list[str]:
    return sorted((p.name for p in work.glob("checkpoint_*")), key=lambda n: int(n.split("_")[1]))


def assert_same_run(a: Path, b: Path, final: str) -> None:
    """Every file of the final checkpoint (weights, optimizer moments, schedule, loss scaler, RNG) has the same
    sha256, the final model the same tensors, metrics.jsonl the same lines."""
    assert manifest(a / final) == manifest(b / final)
    if (a / "model.safetensors").is_file():
        ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()


def test_stage1_fp16_sigterm_then_resume_is_bit_identical(tmp_path, monkeypatch, signals_caught):
    import stage1_vae_trainer

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    cfgs = write_configs(tmp_path / "cfg", per_gpu_batch_size=4, gradient_accumulation_steps=2, num_val_random_samples=2,
                         total_training_iterations=6, checkpoint_iterations=0, val_generation_freq=0, disc_start=2,
                         log_every=1)
    model = yaml.safe_load(cfgs[1].read_text())
    model["vae"].update(vae_channels_per_block=[8, 16], residual_layers_per_block=1)  # fp16 convs are slow on CPUs
    cfgs[1].write_text(yaml.safe_dump(model))
    run_main("stage1_vae_trainer", stage1_args(tmp_path / "ref", cfgs))
    assert checkpoints(tmp_path / "ref") == ["checkpoint_6"]  # checkpoint_iterations 0: only at the end
    assert not (tmp_path / "ref" / "gens").exists()  # val_generation_freq 0: never
    scaler = torch.load(tmp_path / "ref" / "checkpoint_6" / "grad_scaler.pt", weights_only=True)
    assert scaler["scale"] > 0  # the fp16 loss scaler ran and is checkpointed

    real = stage1_vae_trainer.build_stage1_dataset
    read_mid_step_3 = 2 + 2 * 8 + 6  # validation images, 2 steps of 2 x 4 images, then into step 3
    with monkeypatch.context() as m:
        m.setattr(stage1_vae_trainer, "build_stage1_dataset",
                  lambda *a: SignalOnRead(real(*a), read_mid_step_3, signal.SIGTERM))
        run_main("stage1_vae_trainer", stage1_args(tmp_path / "cut", cfgs))
    assert checkpoints(tmp_path / "cut") == ["checkpoint_3"] and not (tmp_path / "cut" / "model.safetensors").exists()
    assert [row["step"] for row in metrics(tmp_path / "cut")] == [1, 2, 3]
    run_main("stage1_vae_trainer", stage1_args(tmp_path / "cut", cfgs) + ["--resume_from_checkpoint", "latest"])
    assert_same_run(tmp_path / "ref", tmp_path / "cut", "checkpoint_6")


def test_stage1_resumed_with_the_patchgan_turned_on_starts_a_fresh_discriminator(tmp_path, capfd):
    """A run trained without the PatchGAN, resumed with use_patchgan on, stopped on 'discriminator.safetensors is
    missing ... another trainer or a run with other settings', never naming the key. The PatchGAN now starts fresh
    at the resume, as it would at disc_start, and the autoencoder's own states still come from the checkpoint.
    A resume past a lowered total_training_iterations trained nothing without a word; it now warns."""
    kw = dict(per_gpu_batch_size=4, gradient_accumulation_steps=1, num_val_random_samples=2, checkpoint_iterations=2,
              val_generation_freq=0, disc_start=0, log_every=1)
    cfgs = write_configs(tmp_path / "cfg", use_patchgan=False, total_training_iterations=2, **kw)
    model = yaml.safe_load(cfgs[1].read_text())
    model["vae"].update(vae_channels_per_block=[8, 16], residual_layers_per_block=1)
    cfgs[1].write_text(yaml.safe_dump(model))
    work = tmp_path / "work"
    run_main("stage1_vae_trainer", stage1_args(work, cfgs))
    assert not (work / "checkpoint_2" / "discriminator.safetensors").exists()
    write_configs(tmp_path / "cfg", use_patchgan=True, total_training_iterations=4, **kw)
    cfgs[1].write_text(yaml.safe_dump(model))
    capfd.readouterr()
    run_main("stage1_vae_trainer", stage1_args(work, cfgs) + ["--resume_from_checkpoint", "latest"])
    assert "written without a PatchGAN (use_patchgan was False)" in "".join(capfd.readouterr())
    assert checkpoints(work) == ["checkpoint_2", "checkpoint_4"]
    assert (work / "checkpoint_4" / "discriminator.safetensors").is_file()
    rows = metrics(work)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert "disc_loss" not in rows[1] and "disc_loss" in rows[2] and "gen_loss" in rows[3]
    # total_training_iterations lowered below the checkpoint's step: nothing trains, and the log says so
    write_configs(tmp_path / "cfg", use_patchgan=True, total_training_iterations=3, **kw)
    cfgs[1].write_text(yaml.safe_dump(model))
    capfd.readouterr()
    run_main("stage1_vae_trainer", stage1_args(work, cfgs) + ["--resume_from_checkpoint", "latest"])
    assert "past total_training_iterations 3: no step is trained" in "".join(capfd.readouterr())
    assert [row["step"] for row in metrics(work)] == [1, 2, 3, 4]


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGINT])  # SLURM's --signal, and Ctrl-C at a terminal
def test_stage2_fp16_signal_then_resume_is_bit_identical(tmp_path, monkeypatch, signals_caught, sig):
    """Class-conditional (ImageNet layout), flips, condition dropout and gradient accumulation, under fp16; the
    EMA moves every other step, so the stop at step 3 leaves a step pending in the checkpoint."""
    from src.training import stage2

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    vae = make_vae_file(tmp_path / "vae.safetensors")
    model_cfg = write_model_config(tmp_path / "ldm.yaml", tiny_unet(class_conditioning=True), {"imagenet": 1.1})
    train = write_train_config(tmp_path / "train.yaml", total_training_iterations=5, checkpoint_iterations=2,
                               per_gpu_batch_size=2, gradient_accumulation_steps=2, random_flip_p=0.5,
                               cfg_dropout_prob=0.3, ema_update_every=2)
    argv = lambda work, *extra: trainer_argv(work, train, model_cfg, vae, "imagenet", "--path_to_dataset",  # noqa
                                             str(make_image_folders(tmp_path / "imagenet")), *extra)
    run_main("stage2_diffusion_trainer", argv(tmp_path / "ref"))
    real = stage2.build_training_dataset
    with monkeypatch.context() as m:  # 2 x 2 items per step: the 11th read is in step 3's second micro-batch
        m.setattr(stage2, "build_training_dataset", lambda *a: SignalOnRead(real(*a), 11, sig))
        run_main("stage2_diffusion_trainer", argv(tmp_path / "cut"))
    assert checkpoints(tmp_path / "cut") == ["checkpoint_2", "checkpoint_3"]  # the periodic one and the stop's
    run_main("stage2_diffusion_trainer", argv(tmp_path / "cut", "--resume_from_checkpoint", "latest"))
    assert checkpoints(tmp_path / "cut") == ["checkpoint_3", "checkpoint_4", "checkpoint_5"]  # the newest 3
    assert_same_run(tmp_path / "ref", tmp_path / "cut", "checkpoint_5")
    _, meta = load_models(tmp_path / "cut" / "model.safetensors")
    assert meta["conditioning"] == "class" and meta["class_names"] == ["class_0", "class_1", "class_2"]


def test_lpips_trainer_sigterm_then_resume_is_bit_identical(tmp_path, monkeypatch, signals_caught):
    from src.data.bapps_synth import generate_bapps
    from src.training import lpips_train

    data = generate_bapps(tmp_path / "bapps", num_train=16, num_val=4, patch_size=16, seed=0, num_jnd=0)
    flags = lambda work: ["--path_to_root", str(data), "--work_dir", str(work), "--img_size", "16",  # noqa: E731
                          "--batch_size", "8", "--num_workers", "0", "--num_epochs", "2", "--decay_epochs", "1",
                          "--use_dropout", "--initial_lr", "1e-3", "--train_sets", "cnn", "--val_sets", "cnn",
                          "--jnd_sets", "--logging_steps", "1"]
    run_main("lpips_trainer", flags(tmp_path / "ref"))
    real = lpips_train.TwoAFCDataset
    with monkeypatch.context() as m:  # 2 steps of 8 triplets per epoch: the 20th read is in step 3 (epoch 2)
        m.setattr(lpips_train, "TwoAFCDataset", lambda *a, **k: SignalOnRead(real(*a, **k), 20, signal.SIGTERM))
        run_main("lpips_trainer", flags(tmp_path / "cut"))
    assert checkpoints(tmp_path / "cut") == ["checkpoint_2", "checkpoint_3"]  # epoch 1's and the stop's
    assert not (tmp_path / "cut" / "eval.json").exists()
    run_main("lpips_trainer", flags(tmp_path / "cut") + ["--resume_from_checkpoint", "latest"])
    ref, cut = (torch.load(w / "lpips_64x64_vgg.pt", weights_only=True) for w in (tmp_path / "ref", tmp_path / "cut"))
    for part in ("lpips", "ranking_head"):
        assert all(torch.equal(ref[part][k], cut[part][k]) for k in ref[part])
    losses = [json.loads((w / "eval.json").read_text())["train_epoch_losses"] for w in (tmp_path / "ref", tmp_path / "cut")]
    assert losses[0] == losses[1] and len(losses[0]) == 2


def test_stage2_resume_after_an_all_unreadable_batch_is_bit_identical(tmp_path):
    """Batch size 1 and the file of the second batch unreadable: by the checkpoint at step 2 the loader has drawn 3
    batches. Resumed from that checkpoint, steps 3-4 must train on the batches the uninterrupted run used (the
    position is in the checkpoint), not one batch earlier (2 steps x 1 micro-batch)."""
    import shutil

    from src.data.loader import EpochBatchSampler

    faces = make_flat_folder(tmp_path / "faces")
    second_item = list(EpochBatchSampler(8, 1, seed=0))[1][0]  # the loader's order for seed 0 (the config's)
    (faces / f"face_{second_item:02d}.png").write_bytes(b"")  # sorted file names: item i is face_0i.png
    vae = make_vae_file(tmp_path / "vae.safetensors")
    model_cfg = write_model_config(tmp_path / "ldm.yaml", tiny_unet(), {"celebahq": 1.0})
    train = write_train_config(tmp_path / "train.yaml", per_gpu_batch_size=1, total_training_iterations=4,
                               checkpoint_iterations=2, checkpoints_total_limit=0, val_generation_freq=0, seed=0)
    argv = lambda work, *extra: trainer_argv(work, train, model_cfg, vae, "celebahq", "--path_to_dataset",  # noqa
                                             str(faces), "--report_to", "none", *extra)
    run_main("stage2_diffusion_trainer", argv(tmp_path / "ref"))
    (tmp_path / "cut").mkdir()
    shutil.copytree(tmp_path / "ref" / "checkpoint_2", tmp_path / "cut" / "checkpoint_2")
    run_main("stage2_diffusion_trainer", argv(tmp_path / "cut", "--resume_from_checkpoint", "latest"))
    assert manifest(tmp_path / "ref" / "checkpoint_4") == manifest(tmp_path / "cut" / "checkpoint_4")
    assert [row for row in metrics(tmp_path / "ref") if row["step"] > 2] == metrics(tmp_path / "cut")


def test_resuming_with_another_batch_size_warns_and_the_same_layout_does_not(tmp_path, capsys):
    """The checkpoint records how the run cut its data (processes, batch, accumulation); a resume with another cut
    still runs, but says that its batches are not an uninterrupted run's."""
    import shutil

    faces = make_flat_folder(tmp_path / "faces")
    vae = make_vae_file(tmp_path / "vae.safetensors")
    model_cfg = write_model_config(tmp_path / "ldm.yaml", tiny_unet(), {"celebahq": 1.0})
    keys = dict(total_training_iterations=3, checkpoint_iterations=2, val_generation_freq=0, seed=0)
    argv = lambda work, train, *extra: trainer_argv(work, train, model_cfg, vae, "celebahq", "--path_to_dataset",  # noqa
                                                    str(faces), "--report_to", "none", *extra)
    run_main("stage2_diffusion_trainer", argv(tmp_path / "ref", write_train_config(tmp_path / "a.yaml", per_gpu_batch_size=1,
                                                                                   **keys)))
    assert json.loads((tmp_path / "ref" / "checkpoint_2" / "state.json").read_text())["data_layout"] == {
        "num_processes": 1, "per_gpu_batch_size": 1, "gradient_accumulation_steps": 1}
    for name, batch in (("same", 1), ("other", 2)):
        (tmp_path / name).mkdir()
        shutil.copytree(tmp_path / "ref" / "checkpoint_2", tmp_path / name / "checkpoint_2")
        capsys.readouterr()
        train = write_train_config(tmp_path / f"{name}.yaml", per_gpu_batch_size=batch, **keys)
        run_main("stage2_diffusion_trainer", argv(tmp_path / name, train, "--resume_from_checkpoint", "latest"))
        log = capsys.readouterr().out  # the trainer's log handler writes to stdout
        assert ("written with another data layout (per_gpu_batch_size 1 -> 2)" in log) == (batch == 2), log
        assert (tmp_path / name / "checkpoint_3").is_dir()  # it ran on either way


TORCHRUN_SCRIPT = SIGNAL_ON_READ + '''
import json, sys
sys.path.insert(0, {root!r})
import torch.distributed as dist
from accelerate.state import AcceleratorState, GradientState, PartialState
import stage1_vae_trainer

# three trainings in one process group: end_training must not tear it down between them (gloo cannot re-join
# torchrun's rendezvous); it is destroyed once, at the end
PartialState.destroy_process_group = lambda self, group=None: None
legs = json.loads(sys.argv[1])
real = stage1_vae_trainer.build_stage1_dataset
for leg in legs:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    signalled = leg["signal_rank"] == int(os.environ["RANK"])
    stage1_vae_trainer.build_stage1_dataset = (
        (lambda *a: SignalOnRead(real(*a), leg["read"], signal.SIGTERM)) if signalled else real)
    stage1_vae_trainer.main(leg["argv"])
dist.destroy_process_group()
'''


def test_torchrun_two_processes_bf16_vq_gan_stop_on_one_rank_then_resume(tmp_path):
    """One torchrun launch runs three legs: uninterrupted; SIGTERM to rank 1 only (both ranks must stop after
    the same step); resume. VQ-VAE with the PatchGAN (SyncBatchNorm) under bf16, on a folder with two unreadable
    files, whose count over both processes the resumed run must report as the uninterrupted one does."""
    from tests.test_stage1_trainer import make_mixed_folder

    make_mixed_folder(tmp_path / "data")
    cfgs = write_configs(tmp_path / "cfg", quantize=True, per_gpu_batch_size=4, total_training_iterations=6,
                         checkpoint_iterations=0, val_generation_freq=6, disc_start=2, log_every=1)
    script = tmp_path / "legs.py"
    script.write_text(TORCHRUN_SCRIPT.format(root=str(ROOT)))
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    args = lambda work: stage1_args(work, cfgs, "celebahq", tmp_path / "data")  # noqa: E731
    legs = [{"argv": args(ref), "signal_rank": -1, "read": 0},
            {"argv": args(cut), "signal_rank": 1, "read": 2 * 4 + 2},  # rank 1, inside step 3
            {"argv": args(cut) + ["--resume_from_checkpoint", "latest"], "signal_rank": -1, "read": 0}]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_MIXED_PRECISION": "bf16", "WANDB_MODE": "offline"}
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", str(script),
           json.dumps(legs)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "SIGTERM: stopped after step 3/6" in out  # rank 1 got it
    assert "a stop signal on another process: stopped after step 3/6" in out  # rank 0 did not, and stopped too
    assert "mixed precision bf16" in out
    ckpt = ref / "checkpoint_6"
    assert (ckpt / "rng_0.pt").is_file() and (ckpt / "rng_1.pt").is_file()
    logged = metrics(ref)
    assert "perplexity" in logged[-1] and "disc_loss" in logged[-1]
    assert all(torch.isfinite(torch.tensor(row["rec_loss"])) for row in logged)
    assert_same_run(ref, cut, "checkpoint_6")
    reports = re.findall(r"skipped (\d+) unreadable image\(s\) during training", out)  # ref's, then the resumed run's
    assert len(set(reports)) == 1 and int(reports[0]) == json.loads((ref / "checkpoint_6" / "state.json").read_text())[
        "skipped_files"] > 0, reports


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_mixed_precision_step_matches_fp32(dtype):
    """One stage-1 step (VAE + LPIPS-free loss + PatchGAN) under CPU autocast: losses and gradient norms within
    5 % of fp32, not equal to them (autocast did run)."""
    from src.training.precision import MixedPrecision
    from src.training.stage1 import train_step
    from tests.stage1_helpers import images, tiny_stage1

    results = []
    for mode in ("no", "bf16" if dtype == torch.bfloat16 else "fp16"):
        torch.manual_seed(0)
        accelerator, state, loss_fn, cfg = tiny_stage1(accum=1)
        state.precision = MixedPrecision(mode, torch.device("cpu"))
        if state.precision.scaler is not None:  # a modest scale, so that the first step is not an overflow
            state.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        logs, skipped = train_step(accelerator, state, loss_fn, iter([images(0, n=4)]), cfg)
        assert not bool(skipped)
        results.append({k: float(logs[k]) for k in ("rec_loss", "disc_loss", "grad_norm", "disc_grad_norm")})
    fp32, mixed = results
    for key in fp32:
        assert mixed[key] == pytest.approx(fp32[key], rel=0.05), key
    assert mixed["rec_loss"] != fp32["rec_loss"]


def test_stage2_write_failure_stops_the_run_and_the_resume_continues_the_log(tmp_path, monkeypatch):
    """PermissionError while writing checkpoint_4: the run stops with CheckpointWriteError, checkpoint_2 stays
    loadable; the resume drops the log lines of steps 3-4 and writes them again, once."""
    from safetensors.torch import save_file as real_save_file

    from src.training import checkpoint
    from src.training.checkpoint import CheckpointWriteError

    vae = make_vae_file(tmp_path / "vae.safetensors")
    model_cfg = write_model_config(tmp_path / "ldm.yaml", tiny_unet(class_conditioning=True), {"celebahq": 0.8})
    train = write_train_config(tmp_path / "train.yaml", total_training_iterations=6, checkpoint_iterations=2)
    argv = trainer_argv(tmp_path / "w", train, model_cfg, vae, "celebahq", "--path_to_dataset",
                        str(make_flat_folder(tmp_path / "faces")))

    def no_permission_at_step_4(tensors, filename, *a, **k):
        if ".checkpoint_4" in str(filename):
            raise PermissionError(13, "Permission denied", str(filename))
        return real_save_file(tensors, filename, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save_file", no_permission_at_step_4)
        with pytest.raises(CheckpointWriteError, match=r"step 4 .*Permission denied.*untouched \(checkpoint_2\)"):
            run_main("stage2_diffusion_trainer", argv)
    assert checkpoints(tmp_path / "w") == ["checkpoint_2"]
    assert [row["step"] for row in metrics(tmp_path / "w")] == [1, 2, 3, 4]
    run_main("stage2_diffusion_trainer", argv + ["--resume_from_checkpoint", "latest"])
    assert [row["step"] for row in metrics(tmp_path / "w")] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "w" / "model.safetensors").is_file()


def test_a_second_ctrl_c_aborts_at_once():
    """The first Ctrl-C asks for a stop after the step; a second one is the user's 'now', as without a handler."""
    from src.training.preemption import GracefulStop

    class Unhandled(Exception):
        pass

    def unhandled(*_):  # stands in for Python's KeyboardInterrupt, which would end the pytest session
        raise Unhandled("SIGINT reached the handler outside GracefulStop")

    before = signal.signal(signal.SIGINT, unhandled)
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: the loop finishes its step
        assert stop.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.signal(signal.SIGINT, before) is unhandled  # put back on exit


def test_stage2_resumed_at_its_last_step_writes_the_final_model_with_the_pending_ema_steps(tmp_path):
    """ema_update_every 2: checkpoint_3 of a 4-step run holds one EMA step pending. Resumed from it with
    total_training_iterations 3 (already reached: no step is trained), the final model must be the one a 3-step run
    writes, its EMA moved by that pending step, not the lagging shadow."""
    import shutil

    vae = make_vae_file(tmp_path / "vae.safetensors")
    model_cfg = write_model_config(tmp_path / "ldm.yaml", tiny_unet(), {"celebahq": 1.0})
    keys = dict(per_gpu_batch_size=2, checkpoint_iterations=3, checkpoints_total_limit=0, val_generation_freq=0,
                ema_update_every=2, log_every=3)
    argv = lambda work, total, *extra: trainer_argv(  # noqa: E731
        work, write_train_config(tmp_path / f"total_{total}.yaml", total_training_iterations=total, **keys), model_cfg,
        vae, "celebahq", "--path_to_dataset", str(make_flat_folder(tmp_path / "faces")), "--report_to", "none", *extra)
    run_main("stage2_diffusion_trainer", argv(tmp_path / "four", 4))  # its checkpoint_3: one EMA step pending
    run_main("stage2_diffusion_trainer", argv(tmp_path / "three", 3))
    (tmp_path / "cut").mkdir()
    shutil.copytree(tmp_path / "four" / "checkpoint_3", tmp_path / "cut" / "checkpoint_3")
    run_main("stage2_diffusion_trainer", argv(tmp_path / "cut", 3, "--resume_from_checkpoint", "latest"))
    ta, tb = (load_file(str(w / "model.safetensors")) for w in (tmp_path / "three", tmp_path / "cut"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
