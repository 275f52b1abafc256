"""compute_vae_scaling.py: 1/std of the posterior samples, and --update_config rewriting one line only."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import compute_vae_scaling
from src.config import load_model_config
from src.models.serialization import load_models, save_models
from src.models.vae import load_autoencoder
from tests.stage2_helpers import make_flat_folder, make_vae_file

ROOT = Path(__file__).resolve().parents[1]


def _scaled_copy(src, dst, factor: float):
    """The same VAE with every latent multiplied by `factor`: quant_conv's mean rows x factor, log-variance + 2 ln f."""
    _, meta = load_models(src)
    vae = load_autoencoder(src)
    c = vae.quant_conv.weight.shape[0] // 2  # output rows [0, c) mean, [c, 2c) log-variance
    with torch.no_grad():
        vae.quant_conv.weight[:c] *= factor
        vae.quant_conv.bias[:c] *= factor
        vae.quant_conv.bias[c:] += 2 * math.log(factor)
    return save_models(dst, {"vae": vae}, meta)


def _run(vae, cfg, *extra):
    return compute_vae_scaling.main([
        "--path_to_pretrained_weights", str(vae), "--model_config", str(cfg), "--dataset", "shapes",
        "--batch_size", "8", "--num_batches", "2", "--num_workers", "0", *extra,
    ])


def test_factor_is_one_over_the_latent_std(tmp_path):
    vae = make_vae_file(tmp_path / "vae.safetensors")
    scaled = _scaled_copy(vae, tmp_path / "vae_x3.safetensors", 3.0)
    cfg = shutil.copy(ROOT / "configs" / "ldm.yaml", tmp_path / "ldm.yaml")
    f1, f3 = _run(vae, cfg), _run(scaled, cfg)
    assert 0 < f1 < 100
    assert f3 == pytest.approx(f1 / 3.0, rel=1e-4)  # latents three times wider -> a third of the factor
    assert (tmp_path / "ldm.yaml").read_text() == (ROOT / "configs" / "ldm.yaml").read_text()  # no --update_config


def test_update_config_rewrites_only_the_scaling_constant(tmp_path, capsys):
    vae = make_vae_file(tmp_path / "vae.safetensors")
    faces = make_flat_folder(tmp_path / "faces", count=6)
    cfg = shutil.copy(ROOT / "configs" / "ldm.yaml", tmp_path / "ldm.yaml")
    before = Path(cfg).read_text().splitlines()

    factor = compute_vae_scaling.main([
        "--path_to_pretrained_weights", str(vae), "--model_config", str(cfg), "--dataset", "celebahq",
        "--path_to_dataset", str(faces), "--batch_size", "4", "--num_batches", "5", "--num_workers", "0",
        "--update_config",
    ])
    out = capsys.readouterr().out
    assert "over 6 images" in out and f"{factor:.7f}" in out
    after = Path(cfg).read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and len(changed) == 1
    assert changed[0][0].strip().startswith("celebahq:") and changed[0][1] == f"  celebahq: {factor:.7g}"
    loaded = load_model_config(cfg)
    assert loaded.scaling_constants["celebahq"] == pytest.approx(factor, rel=1e-6)
    assert loaded.scaling_constants["imagenet"] == load_model_config(ROOT / "configs" / "ldm.yaml").scaling_constants["imagenet"]

    # a dataset without a constant yet gets one line added to scaling_constants, nothing else moves
    factor_shapes = _run(vae, cfg, "--update_config")
    final = Path(cfg).read_text().splitlines()
    assert [ln for ln in final if ln not in after] == [f"  shapes: {factor_shapes:.7g}"]
    assert load_model_config(cfg).scaling_constants["shapes"] == pytest.approx(factor_shapes, rel=1e-6)


def test_two_processes_report_and_write_the_factor_once(tmp_path, capsys):
    """torchrun with 2 CPU processes (gloo): the factor of one process, printed and written to the config by the
    main process alone (two processes rewriting one file at once collide: one's rename finds no file)."""
    vae = make_vae_file(tmp_path / "vae.safetensors")
    faces = make_flat_folder(tmp_path / "faces", count=6)
    cfg = shutil.copy(ROOT / "configs" / "ldm.yaml", tmp_path / "ldm.yaml")
    flags = ["--path_to_pretrained_weights", str(vae), "--model_config", str(cfg), "--dataset", "celebahq",
             "--path_to_dataset", str(faces), "--batch_size", "4", "--num_batches", "2", "--num_workers", "0"]
    single = compute_vae_scaling.main(flags)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "compute_vae_scaling.py", *flags, "--update_config"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("scaling factor (celebahq)") == 1 and done.stdout.count("wrote scaling_constants") == 1
    assert f"{single:.7f}" in done.stdout
    assert load_model_config(cfg).scaling_constants["celebahq"] == pytest.approx(single, rel=1e-6)
