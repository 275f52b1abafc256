"""Export a stage-2 model.safetensors as a diffusers folder (export_diffusers.py is its command line).

    export_diffusers("work_dir/diffusion/model.safetensors", "exports/shapes")

Text-conditional models become a StableDiffusionPipeline folder:

    model_index.json               StableDiffusionPipeline: unet, vae, scheduler, text_encoder, tokenizer
    unet/ vae/ scheduler/          UNet2DConditionModel, AutoencoderKL (scaling_factor = ours), DDIMScheduler
    text_encoder/ tokenizer/       the model's own text encoder (use_attention_mask: true, as ours masks padding)
    null_text_embeds.safetensors   the learned null token (1, 1, D): pass it, repeated, as negative_prompt_embeds
    export_info.json               conditioning, dataset, class names, the source file

Unconditional and class-conditional models get unet/, vae/, scheduler/ and export_info.json (no diffusers pipeline
drives them; examples/diffusers_sampling.py samples them in a few lines). Every conversion runs before anything is
written; the folder is assembled under a temporary name and renamed into place, so a failure leaves nothing behind,
and an existing folder is replaced only with `overwrite` and only when it is an earlier export.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import save_file

from .models.diffusers_compat import (
    DIFFUSERS_VERSION,
    NULL_TEXT_FILE,
    NULL_TEXT_KEY,
    DiffusersFormatError,
    scheduler_config_from_process,
    unet_config_to_diffusers,
    unet_state_to_diffusers,
    vae_config_to_diffusers,
    vae_state_to_diffusers,
    write_diffusers_model,
    write_scheduler,
)
from .pipeline import LatentDiffusion, load_pipeline

EXPORT_INFO = "export_info.json"


class ExportError(ValueError):
    """An export that can't be written: output folder in the way, or a model diffusers can't hold."""


@dataclass
class ExportPlan:
    """Everything to write, already converted: writing it can no longer fail on the model."""

    writers: dict[str, Callable[[Path], object]] = field(default_factory=dict)  # relative name -> writer(folder)


def plan_export(pipe: LatentDiffusion, source: str) -> ExportPlan:
    """Convert the UNet, VAE, schedule (and text encoder) of `pipe`; DiffusersFormatError for what can't be held."""
    vae_cfg = pipe.vae.config
    vae_config = vae_config_to_diffusers(vae_cfg, pipe.scaling_factor)
    vae_state = vae_state_to_diffusers(pipe.vae.float().state_dict())
    unet_config = unet_config_to_diffusers(pipe.unet, vae_cfg.latent_size)
    unet_state = unet_state_to_diffusers(pipe.unet.float())
    process = pipe.process.to_dict()
    scheduler_config_from_process(process)  # refuses an unmapped schedule now, not halfway through writing
    meta = pipe.metadata
    info = {"conditioning": pipe.conditioning, "dataset": meta.get("dataset"), "source": source,
            "scaling_factor": pipe.scaling_factor, "text_model": meta.get("text_model"),
            "class_names": meta.get("class_names"), "diffusers_version": DIFFUSERS_VERSION}
    plan = ExportPlan()
    plan.writers["vae"] = lambda d: write_diffusers_model(d, "AutoencoderKL", vae_config, vae_state)
    plan.writers["unet"] = lambda d: write_diffusers_model(d, "UNet2DConditionModel", unet_config, unet_state)
    plan.writers["scheduler"] = lambda d: write_scheduler(d, process)
    plan.writers[EXPORT_INFO] = lambda p: p.write_text(json.dumps(info, indent=2) + "\n")
    if pipe.conditioning == "text":
        add_text_components(plan, pipe)
    return plan


def add_text_components(plan: ExportPlan, pipe: LatentDiffusion) -> None:
    """text_encoder/, tokenizer/, the null token and model_index.json of a StableDiffusionPipeline."""
    encoder = pipe.text_encoder
    if encoder is None:
        raise ExportError("the text encoder is needed to export a text-conditional model (load it with the pipeline)")
    model, tokenizer = encoder.model, encoder.tokenizer
    null = pipe.unet.null_text_embedding.detach().float().cpu()[None].clone()  # (1, 1, D)

    def write_text_encoder(folder: Path) -> None:
        model.config.use_attention_mask = True  # StableDiffusionPipeline then masks padding, as TextEncoder does
        model.save_pretrained(folder, safe_serialization=True)

    def write_tokenizer(folder: Path) -> None:
        tokenizer.model_max_length = encoder.max_length  # our padding / truncation length
        tokenizer.save_pretrained(folder)

    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "vae": ["diffusers", "AutoencoderKL"], "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", type(model).__name__],
        "tokenizer": ["transformers", type(tokenizer).__name__], "safety_checker": [None, None],
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
    }
    plan.writers["text_encoder"] = write_text_encoder
    plan.writers["tokenizer"] = write_tokenizer
    plan.writers[NULL_TEXT_FILE] = lambda p: save_file({NULL_TEXT_KEY: null}, str(p))
    plan.writers["model_index.json"] = lambda p: p.write_text(json.dumps(index, indent=2) + "\n")


def is_export(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() or (folder / EXPORT_INFO).is_file()


def check_output(output: Path, overwrite: bool) -> None:
    """An existing non-empty folder is replaced only with `overwrite`, and only when it holds an earlier export."""
    if not output.exists():
        return
    if not output.is_dir():
        raise ExportError(f"--output {output} is a file; give a folder path")
    if not any(output.iterdir()):
        return
    if not overwrite:
        raise ExportError(f"--output {output} exists and is not empty; pass --overwrite to replace an earlier export")
    if not is_export(output):
        raise ExportError(f"--output {output} is not an earlier export (no model_index.json / {EXPORT_INFO}); "
                          "refusing to delete it, even with --overwrite")


def write_plan(plan: ExportPlan, output: Path, overwrite: bool) -> Path:
    """Write under a temporary sibling name, then move into place; a failure removes the partial folder."""
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, write in plan.writers.items():
            write(tmp / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if output.exists():
        shutil.rmtree(output)
    tmp.rename(output)
    return output


def export_diffusers(path, output, overwrite: bool = False, text_encoder: Optional[str] = None,
                     hf_cache_dir: Optional[str] = None) -> Path:
    """Export the stage-2 model file `path` to the diffusers folder `output`; returns `output`."""
    output = Path(output).resolve()  # '.' has no name to stage the export next to
    check_output(output, overwrite)  # before loading anything
    pipe = load_pipeline(path, "cpu", torch.float32, text_encoder, hf_cache_dir)
    try:
        plan = plan_export(pipe, str(path))
    except DiffusersFormatError as err:
        raise ExportError(f"{path} can't be exported to diffusers: {err}") from err
    return write_plan(plan, output, overwrite)
