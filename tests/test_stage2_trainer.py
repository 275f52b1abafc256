"""stage2_diffusion_trainer.py: text / class / unconditional runs, resume, and clear set-up errors."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from src.models.serialization import load_models
from src.training.stage2 import Stage2SetupError, read_prompts, trained_classes, validation_labels
from tests.helpers import make_tiny_clip
from tests.stage2_helpers import (
    make_flat_folder,
    make_image_folders,
    make_vae_file,
    read_losses,
    run_trainer,
    tiny_unet,
    trainer_argv,
    write_model_config,
    write_train_config,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("stage2_assets")
    clip = make_tiny_clip(d / "clip")
    return {
        "dir": d,
        "clip": clip,
        "vae": make_vae_file(d / "vae.safetensors"),
        "text_cfg": write_model_config(d / "ldm_text.yaml", tiny_unet(str(clip)), {"shapes": 0.9}),
        "class_cfg": write_model_config(
            d / "ldm_class.yaml", tiny_unet(class_conditioning=True), {"imagenet": 1.1, "celebahq": 0.8}
        ),
        "imagenet": make_image_folders(d / "imagenet"),
        "faces": make_flat_folder(d / "faces"),
    }


def test_text_run_on_shapes_lowers_loss_and_inference_writes_images(assets, tmp_path, monkeypatch):
    """Under bf16 autocast (accelerate's --mixed_precision bf16)."""
    import inference_ldm

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    steps = 12
    train = write_train_config(
        tmp_path / "train.yaml", total_training_iterations=steps, checkpoint_iterations=steps,
        val_generation_freq=steps, per_gpu_batch_size=8, learning_rate=2e-3, shapes_num_images=64,
    )
    work = tmp_path / "work"
    run_trainer(trainer_argv(work, train, assets["text_cfg"], assets["vae"], "shapes",
                             "--path_to_save_gens", str(tmp_path / "gens")))

    losses = read_losses(work)
    assert sorted(losses) == list(range(1, steps + 1))  # stopped exactly at total_training_iterations
    first = sum(losses[s] for s in range(1, 5)) / 4
    last = sum(losses[s] for s in range(steps - 3, steps + 1)) / 4
    assert last < 0.9 * first, (first, last)

    # the final file holds the EMA UNet, the VAE and what inference needs
    tensors, meta = load_models(work / "model.safetensors")
    assert {"unet", "vae"} <= set(tensors)
    assert meta["stage"] == 2 and meta["conditioning"] == "text" and meta["dataset"] == "shapes"
    assert meta["scaling_factor"] == pytest.approx(0.9) and meta["text_model"] == str(assets["clip"])
    ema = load_file(str(work / f"checkpoint_{steps}" / "ema.safetensors"))
    assert torch.equal(tensors["unet"]["conv_out.weight"], ema["shadow.conv_out.weight"])

    # validation grid: one tile per prompt of sample_text_cond_prompts.txt, 8 per row, 16 px tiles, 2 px padding
    n = len(read_prompts())
    grid = Image.open(tmp_path / "gens" / f"step_{steps:07d}.png")
    rows = -(-n // 8)
    assert grid.size == (2 + 8 * 18, 2 + rows * 18)

    out = tmp_path / "samples"
    inference_ldm.main([
        "--model_config", str(assets["text_cfg"]), "--path_to_weights", str(work / "model.safetensors"),
        "--text_conditional", "--training_dataset", "shapes", "--prompt", "a red circle on a blue background",
        "--num_images", "3", "--num_steps", "4", "--output", str(out),
    ])
    files = sorted(p.name for p in out.iterdir())
    assert files == ["000.png", "001.png", "002.png", "grid.png"]
    for name in files[:3]:
        img = Image.open(out / name)
        assert img.size == (16, 16) and img.mode == "RGB"


def test_unconditional_flat_folder_with_the_design_commands(assets, tmp_path):
    """`accelerate launch stage2_diffusion_trainer.py ...` then inference_ldm's flags, as in the design."""
    import inference_ldm

    train = write_train_config(tmp_path / "train.yaml", total_training_iterations=2, checkpoint_iterations=2,
                               val_generation_freq=2)
    work, gens = tmp_path / "diffusion_celebahq", tmp_path / "gens"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "stage2_diffusion_trainer.py",
              *trainer_argv(work, train, assets["class_cfg"], assets["vae"], "celebahq",
                            "--path_to_dataset", str(assets["faces"]), "--path_to_save_gens", str(gens))]
    done = subprocess.run(launch, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _, meta = load_models(work / "model.safetensors")
    assert meta["conditioning"] == "none" and meta["scaling_factor"] == pytest.approx(0.8)
    assert Image.open(gens / "step_0000002.png").size == (2 + 2 * 18, 2 + 18)  # num_val_random_samples = 2

    out = tmp_path / "samples"
    inference_ldm.main(["--model_config", str(assets["class_cfg"]), "--path_to_weights", str(work / "model.safetensors"),
                        "--training_dataset", "celebahq", "--num_images", "2", "--num_steps", "3", "--output", str(out)])
    assert [Image.open(out / f"{i:03d}.png").size for i in range(2)] == [(16, 16), (16, 16)]


def test_missing_scaling_constant_names_the_key_and_the_script(assets, tmp_path):
    train = write_train_config(tmp_path / "train.yaml")
    cfg = write_model_config(tmp_path / "ldm.yaml", tiny_unet(str(assets["clip"])), {"celebahq": 1.0})
    with pytest.raises(Stage2SetupError, match=r"scaling_constants\.shapes.*compute_vae_scaling\.py"):
        run_trainer(trainer_argv(tmp_path / "w", train, cfg, assets["vae"], "shapes"))
    assert not (tmp_path / "w" / "checkpoint_1").exists()


def test_latents_the_unet_cannot_downsample_stop_the_run_before_caching(assets, tmp_path):
    """16 px images give 8x8 latents; a 5-level UNet halves them 4 times (8 -> 0.5)."""
    train = write_train_config(tmp_path / "train.yaml")
    unet = tiny_unet()
    unet = replace(unet, unet_channels_per_block=[16] * 5, down_block_types=["AttnDown"] + ["Down"] * 4,
                   up_block_types=["Up"] * 4 + ["AttnUp"])
    cfg = write_model_config(tmp_path / "ldm.yaml", unet, {"celebahq": 1.0})
    with pytest.raises(Stage2SetupError, match=r"latents are 8x8 .* UNet's 5 levels can't downsample by 16"):
        run_trainer(trainer_argv(tmp_path / "w", train, cfg, assets["vae"], "celebahq", "--path_to_dataset",
                                 str(assets["faces"]), "--cache_latents", str(tmp_path / "cache")))
    assert not (tmp_path / "cache").exists()


def test_missing_vae_file_is_a_clear_error(assets, tmp_path):
    train = write_train_config(tmp_path / "train.yaml")
    with pytest.raises(FileNotFoundError, match="path_to_vae_backbone"):
        run_trainer(trainer_argv(tmp_path / "w", train, assets["text_cfg"], tmp_path / "nope.safetensors", "shapes"))


def test_non_finite_losses_skip_updates_then_stop_the_run(assets, tmp_path):
    """A VAE whose latents are NaN: every update is skipped (the weights stay the initial ones), then the run stops."""
    from src.models.serialization import save_models
    from src.models.vae import load_autoencoder
    from src.training.guard import NonFiniteLossError

    _, meta = load_models(assets["vae"])
    vae = load_autoencoder(assets["vae"])
    with torch.no_grad():
        vae.quant_conv.bias[0] = float("nan")  # NaN posterior mean in one channel
    bad_vae = save_models(tmp_path / "nan_vae.safetensors", {"vae": vae}, meta)
    train = write_train_config(tmp_path / "train.yaml", total_training_iterations=6, checkpoint_iterations=2,
                               max_nonfinite_steps=3)
    work = tmp_path / "w"
    with pytest.raises(NonFiniteLossError, match="3 non-finite steps in a row, the last at step 3 .non-finite: loss"):
        run_trainer(trainer_argv(work, train, assets["class_cfg"], bad_vae, "celebahq",
                                 "--path_to_dataset", str(assets["faces"])))
    unet = load_file(str(work / "checkpoint_2" / "unet.safetensors"))
    ema = load_file(str(work / "checkpoint_2" / "ema.safetensors"))
    assert int(ema["num_updates"]) == 0
    assert all(torch.equal(unet[k], ema[f"shadow.{k}"]) for k in unet)
    assert not (work / "checkpoint_4").exists() and not (work / "model.safetensors").exists()


def test_class_validation_grids_use_the_datasets_classes_not_every_embedding():
    """ldm.yaml's UNet has 1000 class embeddings; trained on 10 class folders, only labels 0-9 ever get a gradient,
    so the grid's labels are spread over those."""
    names = {"class_names": [f"n{i:08d}" for i in range(10)]}
    assert validation_labels(8, trained_classes(names, 1000)) == [0, 1, 2, 3, 5, 6, 7, 8]
    assert validation_labels(8, trained_classes({}, 1000)) == [0, 125, 250, 375, 500, 625, 750, 875]  # no names


def test_class_validation_grids_name_the_class_of_each_image(assets, tmp_path):
    work = tmp_path / "work"
    train = write_train_config(tmp_path / "train.yaml", total_training_iterations=1, checkpoint_iterations=1,
                               val_generation_freq=1, num_val_random_samples=4)
    run_trainer(trainer_argv(work, train, assets["class_cfg"], assets["vae"], "imagenet",
                             "--path_to_dataset", str(assets["imagenet"])))
    assert (work / "gens" / "step_0000001.png").is_file()
    assert (work / "gens" / "step_0000001.txt").read_text().splitlines() == [
        "0 class_0", "0 class_0", "1 class_1", "2 class_2"]  # validation_labels(4, 3)



def test_resuming_after_the_class_folders_changed_is_refused(assets, tmp_path):
    """Label i is the i-th sorted folder: 'class_2' renamed 'ant' before resuming made 'class_0' label 1, silently."""
    import shutil

    from src.training.stage2 import Stage2SetupError

    data = shutil.copytree(assets["imagenet"], tmp_path / "data")
    work, train = tmp_path / "work", write_train_config(tmp_path / "train.yaml", total_training_iterations=1)
    argv = trainer_argv(work, train, assets["class_cfg"], assets["vae"], "imagenet", "--path_to_dataset", str(data))
    run_trainer(argv)
    (data / "class_2").rename(data / "ant")
    write_train_config(train, total_training_iterations=2)
    with pytest.raises(Stage2SetupError, match="added: ant; removed: class_2"):
        run_trainer(argv + ["--resume_from_checkpoint", "latest"])
    (data / "ant").rename(data / "class_2")
    run_trainer(argv + ["--resume_from_checkpoint", "latest"])  # the same folders resume
    assert (work / "checkpoint_2").is_dir()
