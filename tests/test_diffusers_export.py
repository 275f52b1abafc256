"""export_diffusers.py: exported models sample in diffusers exactly as inference_ldm.py samples them; bad input
and existing folders are refused without writing anything."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import export_diffusers
import inference_ldm
from examples.diffusers_sampling import sample_text, sample_unet
from src.config import VAEConfig
from src.diffusers_export import ExportError, ExportPlan, write_plan
from src.pipeline import load_pipeline
from tests.stage2_helpers import make_conditioning_models, make_stage2_file, tiny_unet

PROMPTS = ["a red circle on a blue background", "a white square"]  # different token counts


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("export_models")
    return {**make_conditioning_models(d), "dir": d}


def _export(model, out: Path, *extra) -> Path:
    export_diffusers.main(["--path_to_weights", str(model), "--output", str(out), *extra])
    return out


def test_text_export_is_a_stable_diffusion_pipeline_that_samples_like_inference_ldm(models, tmp_path):
    from diffusers import DiffusionPipeline

    out = _export(models["text"], tmp_path / "sd")
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.tokenizer.model_max_length == 77
    ours = load_pipeline(models["text"])
    null = load_file(str(out / "null_text_embeds.safetensors"))["null_text_embeds"]
    assert torch.equal(null[0], ours.unet.null_text_embedding)

    kw = dict(num_steps=4, guidance_scale=3.0)
    theirs = sample_text(out, PROMPTS, num_images=2, seed=3, **kw)  # (4, 3, 16, 16) in [0, 1]
    mine = ours.generate(prompts=PROMPTS, num_per_condition=2, seed=3, **kw) * 0.5 + 0.5
    assert mine.std() > 0.01
    torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-3)
    # below 1 StableDiffusionPipeline stops guiding while ours still does: refused rather than different images
    with pytest.raises(ValueError, match="guidance_scale 0.5 < 1"):
        sample_text(out, PROMPTS, num_images=2, seed=3, num_steps=4, guidance_scale=0.5)

    # inference_ldm.py itself, decoding with the exported VAE folder (--path_to_vae_backbone): the same PNGs
    inference_ldm.main(["--path_to_weights", str(models["text"]), "--text_conditional", "--prompt", PROMPTS[0],
                        "--prompt", PROMPTS[1], "--num_images", "2", "--seed", "3", "--num_steps", "4",
                        "--guidance_scale", "3", "--path_to_vae_backbone", str(out / "vae"),
                        "--output", str(tmp_path / "ours")])
    pngs = np.stack([np.asarray(Image.open(tmp_path / "ours" / f"{i:03d}.png")) for i in range(4)]).astype(int)
    theirs_8bit = (theirs.permute(0, 2, 3, 1).numpy() * 255).round().astype(int)
    assert np.abs(pngs - theirs_8bit).max() <= 1


@pytest.mark.parametrize("conditioning", ["class", "none"])
def test_unet_exports_sample_like_inference_ldm_through_the_documented_loop(models, tmp_path, conditioning):
    from diffusers import UNet2DConditionModel

    out = _export(models[conditioning], tmp_path / conditioning)
    assert sorted(p.name for p in out.iterdir()) == ["export_info.json", "scheduler", "unet", "vae"]
    assert json.loads((out / "export_info.json").read_text())["conditioning"] == conditioning
    assert UNet2DConditionModel.from_pretrained(out, subfolder="unet").config.sample_size == 8
    labels = [2, 0] if conditioning == "class" else None
    theirs = sample_unet(out, labels, num_images=2, seed=5, num_steps=4, guidance_scale=2.5)
    mine = load_pipeline(models[conditioning]).generate(labels=labels, num_per_condition=2, seed=5, num_steps=4,
                                                       guidance_scale=2.5) * 0.5 + 0.5
    assert theirs.shape == mine.shape == (len(labels or [0]) * 2, 3, 16, 16) and mine.std() > 0.01
    torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-3)


def test_export_into_the_current_empty_folder(models, tmp_path, monkeypatch):
    """`--output .` is an existing empty folder, which --help allows; it used to fail on '.' having no name."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert export_diffusers.main(["--path_to_weights", str(models["none"]), "--output", "."]) == (
        tmp_path / "here").resolve()
    assert (tmp_path / "here" / "unet" / "config.json").is_file()


def test_existing_folders_and_unexportable_models_are_refused_without_writing(models, tmp_path):
    out = _export(models["none"], tmp_path / "export")
    stamp = (out / "unet" / "config.json").stat().st_mtime_ns
    with pytest.raises(ExportError, match="exists and is not empty; pass --overwrite"):
        _export(models["class"], out)
    assert json.loads((out / "export_info.json").read_text())["conditioning"] == "none"
    _export(models["class"], out, "--overwrite")  # an earlier export is replaced
    assert json.loads((out / "export_info.json").read_text())["conditioning"] == "class"
    assert (out / "unet" / "config.json").stat().st_mtime_ns != stamp

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an earlier export"):
        _export(models["none"], precious, "--overwrite")
    assert [p.name for p in precious.iterdir()] == ["notes.txt"]

    vq_cfg = VAEConfig(img_size=16, vae_channels_per_block=[8, 16], residual_layers_per_block=1, groupnorm_groups=4,
                       quantize=True, codebook_size=16, vq_embed_dim=4)
    vq = make_stage2_file(models["dir"] / "vq.safetensors", "none", tiny_unet(), "celebahq", vae_cfg=vq_cfg)
    with pytest.raises(ExportError, match="VQ autoencoder"):
        _export(vq, tmp_path / "vq_export")
    assert not (tmp_path / "vq_export").exists()

    def failing(folder: Path):
        folder.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_plan(ExportPlan({"a.txt": lambda p: p.write_text("a"), "b.txt": failing}), tmp_path / "partial", False)
    assert not any(p.name.startswith((".partial", "partial")) for p in tmp_path.iterdir())


def test_the_sampling_example_refuses_an_untrained_class_and_a_folder_that_is_no_export(models, tmp_path):
    from examples.diffusers_sampling import main as sample_main

    out = _export(models["class"], tmp_path / "class")
    classes = load_pipeline(models["class"]).num_trained_classes
    with pytest.raises(SystemExit, match=f"--class_label must be in 0 .. {classes - 1}"):  # label `classes` is the null
        sample_main(["--model", str(out), "--class_label", str(classes), "--output", str(tmp_path / "s")])
    with pytest.raises(SystemExit, match="export_info.json not found: --model takes a folder written by"):
        sample_main(["--model", str(tmp_path / "nothing"), "--output", str(tmp_path / "s")])
    assert not (tmp_path / "s").exists()
