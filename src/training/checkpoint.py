"""Training checkpoints: atomic, verified, rotated, resumable, and loadable without unpickling.

A checkpoint is a folder `working_directory/checkpoint_<step>` holding
    <module>.safetensors      one per model (and the EMA)
    <name>.pt                 optimizer / schedule / loss-scaler / guard state dicts (torch.load(weights_only=True))
    rng_<rank>.pt             torch (and CUDA) RNG states, extra generators and the data loader's position, per
                              process (a batch whose every file was unreadable moves it without making a step); a
                              run resumed with more processes seeds new streams for the ranks without one
    state.json                step and any other counters the trainer passes
    manifest.json             size and sha256 of every file above, written last
It is written under a temporary name and renamed when complete, so a run killed mid-save leaves the previous
checkpoints intact; only the newest `limit` are kept, and only once the new one is complete. A failed write
(a full disk, a permission error) stops the run with CheckpointWriteError and leaves earlier checkpoints alone.
Checkpoints of later steps than the one saved (left by a run this one resumed before their step) are renamed
superseded_checkpoint_<step> first, so the rotation keeps the new checkpoint and `latest` finds it.

At resume the manifest is checked: `latest` takes the newest checkpoint whose files all match it (saying
which newer ones it skipped and why); an explicit path to a broken checkpoint is an error naming the file. A run
started without --resume_from_checkpoint in a working directory that holds checkpoints is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)$")
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: incomplete, truncated or corrupted."""


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed; the run stops and the checkpoints already on disk are untouched."""


# --------------------------------------------------------------------------------------------------- manifest


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """manifest.json: {file name: {"bytes", "sha256"}} of every file in `folder`, read back from the disk."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    entries = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": entries}, indent=1))
    os.replace(tmp, folder / MANIFEST)


def checkpoint_problem(folder) -> Optional[str]:
    """None when every file of the checkpoint matches its manifest; otherwise what is wrong, naming the file."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing (the checkpoint was not completely written or copied)"
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{manifest} is unreadable"
    for name, entry in entries.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != entry["bytes"]:
            return f"{path} has {size} bytes where the manifest records {entry['bytes']} (truncated or partly copied)"
        if file_sha256(path) != entry["sha256"]:
            return f"{path} does not match the sha256 in its manifest (corrupted)"
    return None


# --------------------------------------------------------------------------------------------------- finding


def list_checkpoints(working_dir) -> list[Path]:
    """checkpoint_N folders in `working_dir`, oldest first (complete or not)."""
    working_dir = Path(working_dir)
    if not working_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in working_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def check_fresh_start(working_dir, resume: Optional[str]) -> None:
    """Without --resume_from_checkpoint, refuse a working directory holding checkpoints of an earlier run: starting
    again from step 0 there would erase its metrics.jsonl and rotate its checkpoints away. Cheap (a directory
    listing), so the scripts call it before building any model; resolve_resume_path calls it too."""
    found = [] if resume else list_checkpoints(working_dir)
    if found:
        raise CheckpointError(
            f"{working_dir} holds checkpoints of an earlier run ({', '.join(p.name for p in found)}): pass "
            "--resume_from_checkpoint latest to continue it, or choose another working directory (or remove "
            "them) to start over"
        )


def resolve_resume_path(working_dir, resume: Optional[str], accelerator=None) -> Optional[Path]:
    """`--resume_from_checkpoint`: None, 'latest' (the newest complete checkpoint; None when there is none
    yet) or a checkpoint folder, which must be complete. With several processes (`accelerator`), the main
    process reads and hashes the files and tells the others its answer."""
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        answer: list = [None]
        if accelerator.is_main_process:
            try:
                answer = [("path", resolve_resume_path(working_dir, resume))]
            except CheckpointError as err:
                answer = [("error", str(err))]
        broadcast_object_list(answer, from_process=0)
        kind, value = answer[0]
        if kind == "error":
            raise CheckpointError(value)
        return value
    if not resume:
        check_fresh_start(working_dir, resume)
        return None
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"--resume_from_checkpoint {path}: no such checkpoint folder")
        problem = checkpoint_problem(path)
        if problem:
            raise CheckpointError(f"cannot resume from {path}: {problem}")
        return path
    candidates = list_checkpoints(working_dir)
    for path in reversed(candidates):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("skipping incomplete checkpoint %s: %s", path.name, problem)
    if candidates:
        raise CheckpointError(
            f"no complete checkpoint in {working_dir} ({len(candidates)} incomplete; see the warnings above): "
            "refusing to start again from step 0 over them"
        )
    return None


# --------------------------------------------------------------------------------------------------- saving


def _state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def _all_succeeded(accelerator, ok: bool) -> bool:
    """True when the step succeeded on every process (a collective: all processes must call it)."""
    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=accelerator.device)
    return float(accelerator.reduce(flag, reduction="sum").item()) == 0.0


def _write_error(step: int, folder: Path, err: Optional[BaseException], working_dir: Path) -> CheckpointWriteError:
    kept = ", ".join(p.name for p in list_checkpoints(working_dir)) or "none yet"
    cause = f"{type(err).__name__}: {err}" if err is not None else "it failed on another process (see its log)"
    return CheckpointWriteError(
        f"could not write the checkpoint of step {step} to {folder} ({cause}). The run stops here; the "
        f"checkpoints already on disk are untouched ({kept}): free space or fix permissions, then resume with "
        "--resume_from_checkpoint latest."
    )


def save_checkpoint(
    accelerator,
    working_dir,
    step: int,
    modules: dict[str, torch.nn.Module],
    states: dict[str, object],
    generators: Optional[dict[str, torch.Generator]] = None,
    extra: Optional[dict] = None,
    limit: int = 3,
    loader_position: Optional[int] = None,
) -> Path:
    """Save everything needed to resume at `step`. Call on every process (each saves its own RNG state).

    `modules` are unwrapped nn.Modules (and objects with state_dict of tensors, like the EMA); `states` are
    objects with state_dict()/load_state_dict() (optimizers, schedules, the loss scaler, the guard);
    `generators` are extra torch.Generators (data augmentation) to restore; `loader_position` is this process's
    InfiniteLoader.batches_seen (see saved_loader_position). Raises CheckpointWriteError on every process when any
    write fails.
    """
    working_dir = Path(working_dir)
    final = working_dir / f"checkpoint_{step}"
    tmp = working_dir / f".checkpoint_{step}.tmp"
    error: Optional[BaseException] = None

    def attempt(fn) -> None:
        nonlocal error
        if error is None:
            try:
                fn()
            except OSError as err:
                error = err

    def check() -> None:
        if not _all_succeeded(accelerator, error is None):
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise _write_error(step, tmp, error, working_dir) from error

    if accelerator.is_main_process:
        attempt(lambda: (shutil.rmtree(tmp, ignore_errors=True), tmp.mkdir(parents=True)))
    check()
    if accelerator.is_main_process:
        attempt(lambda: _write_training_files(tmp, step, modules, states, extra))
    per_process = {**_rng_state(generators), "loader_position": loader_position}
    attempt(lambda: torch.save(per_process, tmp / f"rng_{accelerator.process_index}.pt"))
    check()
    if accelerator.is_main_process:
        attempt(lambda: (write_manifest(tmp), _publish(tmp, final)))
    check()
    if accelerator.is_main_process:
        set_aside_later_checkpoints(working_dir, step)
        for old in list_checkpoints(working_dir)[:-limit] if limit > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def set_aside_later_checkpoints(working_dir: Path, step: int) -> list[Path]:
    """Rename every checkpoint_M with M > `step` to superseded_checkpoint_M: they belong to a trajectory this run
    abandoned (it resumed from an older checkpoint, or `latest` skipped a broken newer one). Left in place, the
    rotation would keep them and delete the checkpoint just written, and `latest` would return to them. Renamed,
    not deleted: nothing already written is lost. Returns the new paths."""
    later = [p for p in list_checkpoints(working_dir) if int(CHECKPOINT_RE.match(p.name).group(1)) > step]
    moved = [p.rename(_unused_name(working_dir, f"superseded_{p.name}")) for p in later]
    if moved:
        logger.warning(
            "checkpoint_%d written: moved %s aside to %s (they are later steps of a run this one does not continue; "
            "rotation and `latest` ignore them, delete them once no longer needed)",
            step, ", ".join(p.name for p in later), ", ".join(p.name for p in moved),
        )
    return moved


def _unused_name(folder: Path, name: str) -> Path:
    path, n = folder / name, 1
    while path.exists():
        path, n = folder / f"{name}_{n}", n + 1
    return path


def _write_training_files(folder: Path, step: int, modules: dict, states: dict, extra: Optional[dict]) -> None:
    for name, module in modules.items():
        save_file(_state_dict(module), str(folder / f"{name}.safetensors"))
    for name, obj in states.items():
        torch.save(obj.state_dict(), folder / f"{name}.pt")
    (folder / "state.json").write_text(json.dumps({"step": step, **(extra or {})}, indent=2))


def _rng_state(generators: Optional[dict[str, torch.Generator]]) -> dict:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    for name, g in (generators or {}).items():
        rng[f"gen_{name}"] = g.get_state()
    return rng


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished folder into place; an older folder of the same step is removed only afterwards."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------- loading


def load_checkpoint(
    accelerator,
    path,
    modules: dict[str, torch.nn.Module],
    states: dict[str, object],
    generators: Optional[dict[str, torch.Generator]] = None,
) -> dict:
    """Restore what `save_checkpoint` wrote into the given objects, in order; returns state.json's contents plus
    this process's "loader_position" (None where none was saved; see saved_loader_position). A process the
    checkpoint has no rng_<rank>.pt for (it was written by fewer processes) starts new random streams of its own
    instead (see _new_random_streams)."""
    path = Path(path)
    for name, module in modules.items():
        file = path / f"{name}.safetensors"
        if not file.is_file():  # e.g. a stage-1 checkpoint given to stage 2
            found = ", ".join(sorted(p.name for p in path.glob("*.safetensors"))) or "none"
            raise CheckpointError(f"{file} is missing (the checkpoint holds {found}): it was written by another "
                                  "trainer or a run with other settings")
        module.load_state_dict(load_file(str(file)))
    for name, obj in states.items():
        file = path / f"{name}.pt"
        if not file.is_file():
            raise CheckpointError(f"{file} is missing: the checkpoint was written by a run with other settings")
        obj.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
    info = json.loads((path / "state.json").read_text())
    rng_file = path / f"rng_{accelerator.process_index}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        _restore_rng(rng, generators)
        info["loader_position"] = rng.get("loader_position")
    else:
        _new_random_streams(path, accelerator.process_index, int(info["step"]), generators)
        info["loader_position"] = None
    return info


def _restore_rng(rng: dict, generators: Optional[dict[str, torch.Generator]]) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    for name, g in (generators or {}).items():
        if f"gen_{name}" in rng:
            g.set_state(rng[f"gen_{name}"])


def _new_random_streams(path: Path, rank: int, step: int, generators: Optional[dict[str, torch.Generator]]) -> None:
    """Re-seed the torch RNG and every generator from its fresh seed, the checkpoint's step and the rank. Another
    rank's saved states would make this process draw the same noise, flips and timesteps as that rank; these
    seeds differ across ranks (even where the fresh seeds do not) and are the same at every resume from `path`."""
    written_by = len(list(path.glob("rng_*.pt")))
    logger.warning(
        "%s was written by %d process(es) and holds no random state for process %d: it starts new random streams "
        "(reproducible, but not those of an uninterrupted run with this many processes)", path, written_by, rank,
    )
    torch.manual_seed(_stream_seed(torch.initial_seed(), step, rank))  # the CUDA generators too
    for g in (generators or {}).values():
        g.manual_seed(_stream_seed(g.initial_seed(), step, rank))


def _stream_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed mixing the three (a hash: seed + rank alone would collide across ranks and seeds)."""
    digest = hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def data_layout(accelerator, per_gpu_batch_size: int, gradient_accumulation_steps: int = 1) -> dict:
    """How a run cuts its data into steps; the trainers keep it in state.json (see check_data_layout)."""
    return {"num_processes": accelerator.num_processes, "per_gpu_batch_size": per_gpu_batch_size,
            "gradient_accumulation_steps": gradient_accumulation_steps}


def check_data_layout(info: dict, layout: dict, path) -> None:
    """Warn when a run resumes with another data layout than its checkpoint's (older checkpoints record none).
    It still runs, but the loader's position counts batches of the old size and the data is sharded anew, so
    the rest of the epoch repeats or skips images and the batches are not an uninterrupted run's."""
    saved = info.get("data_layout")
    if saved is None or saved == layout:
        return
    changes = ", ".join(f"{key} {saved.get(key)} -> {new}" for key, new in layout.items() if saved.get(key) != new)
    logger.warning("%s was written with another data layout (%s): this epoch's remaining images are repeated or "
                   "skipped, and the batches differ from an uninterrupted run's", path, changes)


def saved_loader_position(info: dict, default: int) -> int:
    """The batches this process's loader had handed out at the checkpoint `load_checkpoint` returned `info` for,
    where a resumed loader starts. `default` (step x gradient accumulation) for a checkpoint that does not record
    it: written before positions were saved, or by fewer processes than this run has."""
    position = info.get("loader_position")
    return default if position is None else int(position)


def resumed_loader_position(accelerator, info: dict, cfg, path) -> int:
    """The trainers' resume of their data: where this process's loader starts, with a warning when the run cuts
    its data into steps otherwise than the checkpoint's run did (check_data_layout), or when the checkpoint is
    already past this run's total_training_iterations (nothing is trained; the final model is the checkpoint's)."""
    check_data_layout(info, data_layout(accelerator, cfg.per_gpu_batch_size, cfg.gradient_accumulation_steps), path)
    if int(info["step"]) > cfg.total_training_iterations:
        logger.warning("%s is at step %d, past total_training_iterations %d: no step is trained, and the final model "
                       "is the checkpoint's, at step %d", path, int(info["step"]), cfg.total_training_iterations,
                       int(info["step"]))
    return saved_loader_position(info, int(info["step"]) * cfg.gradient_accumulation_steps)
