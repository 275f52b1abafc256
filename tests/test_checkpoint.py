"""Checkpoints that survive partial copies and full disks, and a metrics.jsonl that a resume continues."""

import errno
import json
import logging
import types

import pytest
import torch
from safetensors.torch import save_file as real_save_file

from src.training import checkpoint as ckpt
from src.training.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    load_checkpoint,
    resolve_resume_path,
    save_checkpoint,
    saved_loader_position,
)
from src.training.metrics import truncate_metrics


@pytest.fixture
def saved(tmp_path):
    """checkpoint_1 and checkpoint_2 of a tiny model and its optimizer."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    weights = {}
    for step in (1, 2):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        save_checkpoint(accelerator, tmp_path, step, {"model": model}, {"optimizer": opt}, limit=3)
        weights[step] = model.weight.detach().clone()
    return accelerator, model, opt, weights


def test_another_trainers_checkpoint_is_named_not_a_bare_file_error(saved, tmp_path):
    """Stage 2 pointed at a stage-1 checkpoint: the missing weights file and what the folder holds instead."""
    accelerator, model, opt, _ = saved
    with pytest.raises(CheckpointError, match=r"unet.safetensors is missing \(the checkpoint holds model.safetensors\)"):
        load_checkpoint(accelerator, tmp_path / "checkpoint_2", {"unet": model}, {"optimizer": opt})


def test_latest_skips_a_truncated_checkpoint_and_an_explicit_path_names_the_file(saved, tmp_path, caplog):
    accelerator, model, opt, weights = saved
    assert json.loads((tmp_path / "checkpoint_2" / "manifest.json").read_text())["files"].keys() == {
        "model.safetensors", "optimizer.pt", "rng_0.pt", "state.json"}
    assert resolve_resume_path(tmp_path, "latest") == tmp_path / "checkpoint_2"
    broken = tmp_path / "checkpoint_2" / "model.safetensors"
    broken.write_bytes(broken.read_bytes()[:-7])  # a disk filled mid-write / a partial copy
    with caplog.at_level(logging.WARNING):
        assert resolve_resume_path(tmp_path, "latest") == tmp_path / "checkpoint_1"
    assert "skipping incomplete checkpoint checkpoint_2" in caplog.text and str(broken) in caplog.text
    with pytest.raises(CheckpointError, match=f"{broken} has .* bytes where the manifest records"):
        resolve_resume_path(tmp_path, str(tmp_path / "checkpoint_2"))
    info = load_checkpoint(accelerator, resolve_resume_path(tmp_path, "latest"), {"model": model}, {"optimizer": opt})
    assert info["step"] == 1 and torch.equal(model.weight, weights[1])
    # the same size but other bytes, and a missing manifest, are caught too
    (tmp_path / "checkpoint_1" / "state.json").write_text(json.dumps({"step": 9}).ljust(
        (tmp_path / "checkpoint_1" / "state.json").stat().st_size))
    with pytest.raises(CheckpointError, match="state.json does not match the sha256"):
        resolve_resume_path(tmp_path, str(tmp_path / "checkpoint_1"))
    (tmp_path / "checkpoint_1" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_resume_path(tmp_path, "latest")
    assert resolve_resume_path(tmp_path / "empty", "latest") is None  # nothing yet: a fresh start


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), PermissionError(13, "denied")])
def test_a_failed_write_stops_with_a_message_and_leaves_earlier_checkpoints_loadable(saved, tmp_path, monkeypatch,
                                                                                    failure):
    accelerator, model, opt, weights = saved

    def half_written(tensors, filename, *args, **kwargs):  # writes part of the file, then the disk is full
        real_save_file(tensors, filename, *args, **kwargs)
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise failure

    monkeypatch.setattr(ckpt, "save_file", half_written)
    with pytest.raises(CheckpointWriteError) as err:
        save_checkpoint(accelerator, tmp_path, 3, {"model": model}, {"optimizer": opt}, limit=2)
    message = str(err.value)
    assert "step 3" in message and str(failure.strerror) in message and "checkpoint_1, checkpoint_2" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_1", "checkpoint_2"]  # no rotation, no debris
    monkeypatch.undo()
    for step in (1, 2):
        assert ckpt.checkpoint_problem(tmp_path / f"checkpoint_{step}") is None
    load_checkpoint(accelerator, resolve_resume_path(tmp_path, "latest"), {"model": model}, {"optimizer": opt})
    assert torch.equal(model.weight, weights[2])


def test_truncate_metrics_keeps_steps_up_to_the_resume_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (10, 20, 30)) + '{"step": 4')
    assert truncate_metrics(path, 20) == 2  # step 30 and the line a kill cut short
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [10, 20]
    assert truncate_metrics(path, 20) == 0 and truncate_metrics(tmp_path / "none.jsonl", 0) == 0
    with open(path, "a") as f:  # lines edited by hand: a step that is not a number, a list instead of a mapping
        f.write('{"step": null}\n{"step": "30"}\n[1, 2]\n')
    assert truncate_metrics(path, 20) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [10, 20]


def test_saving_after_a_rollback_sets_later_checkpoints_aside_and_keeps_the_new_one(saved, tmp_path, caplog):
    """Resumed from checkpoint_1 while checkpoint_2 and _3 exist (an explicit rollback, or `latest` skipping a
    broken newer one): checkpoint_2 is written again in place and _3 is renamed, never deleted; with limit 1 the
    rotation keeps the checkpoint just written and `latest` is it."""
    accelerator, model, opt, _ = saved
    save_checkpoint(accelerator, tmp_path, 3, {"model": model}, {"optimizer": opt}, limit=3)
    (tmp_path / "superseded_checkpoint_3").mkdir()  # left by an earlier rollback: the name must not clash
    with caplog.at_level(logging.WARNING):
        new = save_checkpoint(accelerator, tmp_path, 2, {"model": model}, {"optimizer": opt}, limit=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint_2", "superseded_checkpoint_3", "superseded_checkpoint_3_1"]
    assert ckpt.checkpoint_problem(tmp_path / "superseded_checkpoint_3_1") is None  # moved whole
    assert "moved checkpoint_3 aside to superseded_checkpoint_3_1" in caplog.text
    assert resolve_resume_path(tmp_path, "latest") == new == tmp_path / "checkpoint_2"


def test_a_fresh_run_over_an_earlier_runs_checkpoints_is_refused_before_any_model_is_built(saved, tmp_path):
    """Without --resume_from_checkpoint every trainer stops at once: before it would fail on the missing VAE or
    dataset given here, and without touching the earlier run's metrics.jsonl or checkpoints."""
    import lpips_trainer
    import stage1_vae_trainer
    import stage2_diffusion_trainer
    from tests.helpers import reset_accelerate

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n')
    missing = str(tmp_path / "missing")
    common = ["--working_directory", str(tmp_path), "--path_to_dataset", missing, "--dataset", "celebahq"]
    runs = [
        lambda: stage1_vae_trainer.main(common + ["--training_config", "configs/stage1_vae_train.yaml"]),
        lambda: stage2_diffusion_trainer.main(common + ["--training_config", "configs/stage2_diffusion_train.yaml",
                                                        "--path_to_vae_backbone", missing]),
        lambda: lpips_trainer.main(lpips_trainer.parse_args(["--path_to_root", missing, "--work_dir", str(tmp_path)])),
        lambda: resolve_resume_path(tmp_path, None),
    ]
    for run in runs:
        reset_accelerate()
        with pytest.raises(CheckpointError, match=r"holds checkpoints of an earlier run \(checkpoint_1, checkpoint_2\)"
                                                  r": pass --resume_from_checkpoint latest to continue it"):
            run()
    assert log.read_text().count("step") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_1", "checkpoint_2", "metrics.jsonl"]
    assert resolve_resume_path(tmp_path / "new", None) is None  # an empty or new folder: a fresh start


def test_the_loader_position_is_saved_per_process_and_older_checkpoints_fall_back_to_the_step(saved, tmp_path):
    accelerator, model, opt, _ = saved
    path = save_checkpoint(accelerator, tmp_path, 3, {"model": model}, {"optimizer": opt}, loader_position=7)
    load = lambda acc, folder: load_checkpoint(acc, folder, {"model": model}, {"optimizer": opt})  # noqa: E731
    assert saved_loader_position(load(accelerator, path), default=3) == 7  # 4 batches were unreadable
    assert saved_loader_position(load(accelerator, tmp_path / "checkpoint_2"), default=2) == 2  # saved without one
    with torch.random.fork_rng():  # rank 1 seeds new streams
        info = load(types.SimpleNamespace(process_index=1), path)
    assert saved_loader_position(info, default=3) == 3  # no rng_1.pt


def test_a_process_the_checkpoint_holds_no_random_state_for_starts_its_own_reproducible_streams(tmp_path, caplog):
    """A checkpoint of a 1-process run resumed by 3 processes (faked through process_index): rank 0 continues the
    saved streams; ranks 1 and 2 draw other numbers than rank 0 and than each other, from the torch RNG too (whose
    fresh seed is alike on every rank here), and the same numbers again at a second resume."""
    single = types.SimpleNamespace(num_processes=1, process_index=0, is_main_process=True,
                                   device=torch.device("cpu"), wait_for_everyone=lambda: None)
    model = torch.nn.Linear(2, 2)
    fresh = lambda rank: {"noise": torch.Generator().manual_seed(rank)}  # noqa: E731 (the trainers' seed + rank)

    def resume_and_draw(rank: int, path) -> torch.Tensor:
        torch.manual_seed(0)
        generators = fresh(rank)
        load_checkpoint(types.SimpleNamespace(process_index=rank), path, {"model": model}, {}, generators)
        return torch.cat([torch.randn(4, generator=generators["noise"]), torch.randn(4)])  # (8,)

    with torch.random.fork_rng():
        generators = fresh(0)
        torch.manual_seed(0)
        path = save_checkpoint(single, tmp_path, 10, {"model": model}, {}, generators)
        continued = torch.cat([torch.randn(4, generator=generators["noise"]), torch.randn(4)])
        with caplog.at_level(logging.WARNING):
            draws = [resume_and_draw(rank, path) for rank in (0, 1, 2)]
        again = resume_and_draw(1, path)
    assert torch.equal(draws[0], continued)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert not torch.isclose(draws[a], draws[b]).any(), (a, b)
    assert torch.equal(again, draws[1])
    assert "written by 1 process(es) and holds no random state for process 2" in caplog.text
