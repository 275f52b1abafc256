"""Self-describing model files: weights in safetensors, configs as JSON in the safetensors metadata.

    save_models("model.safetensors", {"vae": vae, "unet": unet}, {"model_config": to_dict(cfg), ...})
    tensors, meta = load_models("model.safetensors")   # tensors["vae"] is the VAE's state dict

Keys are stored as "<prefix>.<parameter name>"; metadata values are JSON. Writing goes through a temporary
file and a rename, so an interrupted save never leaves a half-written model file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT = "ldm-toolkit/1"


def save_models(path, modules: dict[str, torch.nn.Module], metadata: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for prefix, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"{prefix}.{key}"] = value.detach().contiguous().cpu()
    meta = {"format": FORMAT, "modules": json.dumps(sorted(modules))}
    meta.update({k: json.dumps(v) for k, v in metadata.items()})
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def _open(path, device: str | torch.device = "cpu"):
    """The safetensors handle of a toolkit model file, with clear errors for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        hint = (" (a folder: pass the model.safetensors in a run's working_directory, not a checkpoint_N or "
                "diffusers folder)") if path.is_dir() else ""
        raise FileNotFoundError(f"model file not found: {path}{hint}")
    try:
        f = safe_open(str(path), framework="pt", device=str(device))
    except SafetensorError as err:
        raise ValueError(f"{path} is not a safetensors file ({err}); expected the model.safetensors of "
                         "stage1_vae_trainer.py or stage2_diffusion_trainer.py") from err
    raw_meta = f.metadata() or {}
    if raw_meta.get("format") != FORMAT:
        raise ValueError(
            f"{path} was not written by this toolkit (no '{FORMAT}' metadata); "
            "expected the model.safetensors of stage1_vae_trainer.py or stage2_diffusion_trainer.py"
        )
    return f, {k: json.loads(v) for k, v in raw_meta.items() if k != "format"}


def load_metadata(path) -> dict[str, Any]:
    """The metadata of a file written by `save_models`, without reading its tensors."""
    f, meta = _open(path)
    with f:
        return meta


def load_models(path, device: str | torch.device = "cpu") -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Return ({prefix: state_dict}, metadata) of a file written by `save_models`."""
    f, meta = _open(path, device)
    with f:
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        for key in f.keys():
            prefix, name = key.split(".", 1)
            tensors.setdefault(prefix, {})[name] = f.get_tensor(key)
    return tensors, meta
