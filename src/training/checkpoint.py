"""Training checkpoints: atomic, rotated, resumable, and loadable without unpickling.

A checkpoint is a folder `working_directory/checkpoint_<step>` holding
    <module>.safetensors      one per model (and the EMA)
    <name>.pt                 optimizer / scheduler state dicts (torch.load(weights_only=True) reads them)
    rng_<rank>.pt             torch (and CUDA) RNG states plus extra generators, per process
    state.json                step and any other counters the trainer passes
It is written under a temporary name and renamed when complete, so a run killed mid-save leaves the previous
checkpoints intact; only the newest `limit` are kept.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)$")


def list_checkpoints(working_dir) -> list[Path]:
    """Complete checkpoints in `working_dir`, oldest first."""
    working_dir = Path(working_dir)
    if not working_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in working_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_resume_path(working_dir, resume: Optional[str]) -> Optional[Path]:
    """`--resume_from_checkpoint`: None, 'latest' (None when there is no checkpoint yet) or a folder path."""
    if not resume:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(working_dir)
        return ckpts[-1] if ckpts else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint folder (no state.json)")
    return path


def _state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def save_checkpoint(
    accelerator,
    working_dir,
    step: int,
    modules: dict[str, torch.nn.Module],
    states: dict[str, object],
    generators: Optional[dict[str, torch.Generator]] = None,
    extra: Optional[dict] = None,
    limit: int = 3,
) -> Path:
    """Save everything needed to resume at `step`. Call on every process (each saves its own RNG state).

    `modules` are unwrapped nn.Modules (and objects with state_dict of tensors, like the EMA); `states` are
    optimizers and schedulers; `generators` are extra torch.Generators (data augmentation) to restore.
    """
    working_dir = Path(working_dir)
    final = working_dir / f"checkpoint_{step}"
    tmp = working_dir / f".checkpoint_{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, module in modules.items():
            save_file(_state_dict(module), str(tmp / f"{name}.safetensors"))
        for name, obj in states.items():
            torch.save(obj.state_dict(), tmp / f"{name}.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **(extra or {})}, indent=2))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    for name, g in (generators or {}).items():
        rng[f"gen_{name}"] = g.get_state()
    torch.save(rng, tmp / f"rng_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(working_dir)[:-limit] if limit > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    accelerator,
    path,
    modules: dict[str, torch.nn.Module],
    states: dict[str, object],
    generators: Optional[dict[str, torch.Generator]] = None,
) -> dict:
    """Restore what `save_checkpoint` wrote into the given objects; returns state.json's contents."""
    path = Path(path)
    for name, module in modules.items():
        module.load_state_dict(load_file(str(path / f"{name}.safetensors")))
    for name, obj in states.items():
        obj.load_state_dict(torch.load(path / f"{name}.pt", map_location="cpu", weights_only=True))
    rng_file = path / f"rng_{accelerator.process_index}.pt"
    if not rng_file.is_file():
        rng_file = path / "rng_0.pt"
    rng = torch.load(rng_file, weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    for name, g in (generators or {}).items():
        if f"gen_{name}" in rng:
            g.set_state(rng[f"gen_{name}"])
    return json.loads((path / "state.json").read_text())
