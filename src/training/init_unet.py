"""--init_unet: start stage 2 from existing UNet weights instead of a random initialisation.

    unet, cfg = load_initial_unet("sd2/unet", model_cfg.unet, "text", latent_channels=4, process=process.to_dict())

The source is a diffusers UNet2DConditionModel (its folder, its .safetensors beside config.json, or a pipeline
folder with unet/), for fine-tuning Stable-Diffusion-shaped UNets, or our own stage-2 model.safetensors. Its
architecture wins over the model config's unet section (a warning lists what differs); training choices (text
model, dropout, gradient checkpointing, pre-encoded text) stay the model config's. A diffusers source has no
learned null text token: an exported one (null_text_embeds.safetensors beside model_index.json) is used when
present, otherwise the token starts from the usual random initialisation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from ..config import ModelConfig, UNetConfig, from_dict
from ..models.diffusers_compat import (
    NULL_TEXT_FILE,
    NULL_TEXT_KEY,
    SCHEDULER_CONFIG_NAME,
    DiffusersFormatError,
    architecture_fields,
    is_diffusers_model,
    process_from_scheduler,
    unet_from_diffusers,
)
from ..models.serialization import load_metadata
from ..models.unet import UNet, build_unet
from ..pipeline import read_stage2_metadata

logger = logging.getLogger("ldm")


class InitUNetError(ValueError):
    """An --init_unet source that can't start this run (conditioning or latent channels differ)."""


def _beside(path: Path, name: str) -> Optional[Path]:
    """`name` in the pipeline folder around a UNet source: path itself, its parent, or (for a file) grandparent."""
    folders = [path] if path.is_dir() else []
    folders += [path.parent, path.parent.parent] if path.is_file() else [path.parent]
    return next((f / name for f in folders if (f / name).exists()), None)


def _diffusers_source(path: Path, base: UNetConfig, conditioning: str) -> tuple[UNet, Optional[dict]]:
    """The converted UNet (with an exported null token when one is beside it) and the scheduler's schedule."""
    try:
        unet, _ = unet_from_diffusers(path, base, conditioning)
    except DiffusersFormatError as err:
        raise InitUNetError(f"--init_unet {path}: {err}") from err
    if conditioning == "text":
        null_file = _beside(path, NULL_TEXT_FILE)
        if null_file is not None:
            null = load_file(str(null_file))[NULL_TEXT_KEY].float().reshape(1, -1)  # (1, D)
            with torch.no_grad():
                unet.null_text_embedding.copy_(null)
            logger.info("--init_unet: null text token from %s", null_file)
        else:
            logger.info("--init_unet: no %s beside %s; the null text token starts random", NULL_TEXT_FILE, path)
    scheduler = _beside(path, f"scheduler/{SCHEDULER_CONFIG_NAME}")
    process = process_from_scheduler(json.loads(scheduler.read_text()), scheduler) if scheduler else None
    return unet, process


def _toolkit_source(path: Path, base: UNetConfig, conditioning: str) -> tuple[UNet, dict]:
    """Our stage-2 model file: its stored UNet config's architecture, its EMA weights and schedule."""
    tensors, meta = read_stage2_metadata(path)
    if meta["conditioning"] != conditioning:
        raise InitUNetError(f"--init_unet {path} is a {meta['conditioning']}-conditional model, but this run is "
                            f"{conditioning}-conditional (the dataset decides)")
    stored = from_dict(ModelConfig, meta["model_config"], f"{path} metadata 'model_config'")
    arch = {k: getattr(stored.unet, k) for k in architecture_fields(conditioning)}
    unet = build_unet(dataclasses.replace(base, **arch), stored.vae.latent_dim, conditioning)
    unet.load_state_dict(tensors["unet"])
    return unet, meta["diffusion"]


def load_initial_unet(path, base: UNetConfig, conditioning: str, latent_channels: int,
                      process: Optional[dict] = None) -> tuple[UNet, UNetConfig]:
    """(UNet holding the source's weights, the config it was built from) for a run with `conditioning` on
    latents of `latent_channels`. Warns where the source's architecture or schedule differ from this run's."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--init_unet {path} not found: pass a diffusers UNet2DConditionModel folder (or a "
                                "pipeline folder with unet/) or a stage-2 model.safetensors")
    if is_diffusers_model(path):
        unet, source_process = _diffusers_source(path, base, conditioning)
    else:
        unet, source_process = _toolkit_source(path, base, conditioning)
    if unet.in_channels != latent_channels:
        raise InitUNetError(f"--init_unet {path} denoises {unet.in_channels}-channel latents, but the VAE's latents "
                            f"have {latent_channels} channels")
    changed = [f"{k}: {getattr(base, k)} -> {getattr(unet.config, k)}" for k in architecture_fields(conditioning)
               if getattr(base, k) != getattr(unet.config, k)]
    if changed:
        logger.warning("--init_unet %s: its architecture replaces the model config's unet section (%s)",
                       path, "; ".join(changed))
    if process is not None and source_process is not None:
        differ = [f"{k}: {source_process.get(k)} there, {process.get(k)} here" for k in process
                  if source_process.get(k) != process.get(k)]
        if differ:
            logger.warning("--init_unet %s was trained with another diffusion process (%s)", path, "; ".join(differ))
    return unet, unet.config


def warn_if_classes_differ(path, class_names: list[str]) -> None:
    """Label i is the i-th class folder: a class-conditional source trained on other folders hands its class
    embeddings to other classes here, by index. That can be what a fine-tune wants, so it is a warning, naming the
    first labels whose class changes. Diffusers sources and older files record no class names."""
    path = Path(path)
    if is_diffusers_model(path):
        return
    source = load_metadata(path).get("class_names")
    if not source or source == list(class_names):
        return
    changed = [i for i in range(max(len(source), len(class_names)))
               if i >= len(source) or i >= len(class_names) or source[i] != class_names[i]]
    shown = ", ".join(f"{i}: {source[i] if i < len(source) else '-'} there, "
                      f"{class_names[i] if i < len(class_names) else '-'} here" for i in changed[:3])
    logger.warning("--init_unet %s was trained on other class folders: %d of %d labels mean another class here "
                   "(%s%s); their embeddings start from the source's, by index", path, len(changed),
                   max(len(source), len(class_names)), shown, ", ..." if len(changed) > 3 else "")
