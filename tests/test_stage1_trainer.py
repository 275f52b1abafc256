"""stage1_vae_trainer.py end to end on CPU: python and accelerate launch, exact resume, bad files and config typos.
Tiny models (16 px, channels [16, 32]) keep each run to seconds. torchrun with 2 processes, mixed precision,
stop signals and non-finite steps: tests/test_long_runs.py and tests/test_guard.py."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from src.config import ConfigError
from src.data.shapes import ShapesDataset
from src.models.serialization import load_models
from src.models.vae import build_autoencoder, load_autoencoder
from tests.conftest import ROOT

PY = sys.executable
BIN = Path(sys.executable).parent
SCRIPT = str(ROOT / "stage1_vae_trainer.py")


def write_configs(folder: Path, quantize: bool = False, **train) -> tuple[Path, Path]:
    """Tiny copies of the quickstart configs: 16 px, channels [16, 32] -> 4 x 8 x 8 latents."""
    folder.mkdir(parents=True, exist_ok=True)
    t = yaml.safe_load((ROOT / "configs/quickstart/stage1_vae_train.yaml").read_text())
    t.update(per_gpu_batch_size=8, disc_start_dim=8, disc_depth=2, num_val_random_samples=4, shapes_num_images=256,
             lr_warmup_steps=0, learning_rate=2e-3, total_training_iterations=40, checkpoint_iterations=20,
             val_generation_freq=20, disc_start=30)
    t.update(train)
    m = yaml.safe_load((ROOT / "configs/quickstart/ldm.yaml").read_text())
    m["vae"].update(img_size=16, vae_channels_per_block=[16, 32], groupnorm_groups=4, quantize=quantize,
                    codebook_size=32, codebook_reset_steps=2)
    (folder / "train.yaml").write_text(yaml.safe_dump(t))
    (folder / "ldm.yaml").write_text(yaml.safe_dump(m))
    return folder / "train.yaml", folder / "ldm.yaml"


def stage1_args(work: Path, cfgs: tuple[Path, Path], dataset: str = "shapes", data: Path | None = None) -> list[str]:
    args = [
        "--experiment_name", "VAETrainer", "--wandb_run_name", "vae_test",
        "--working_directory", str(work), "--training_config", str(cfgs[0]), "--model_config", str(cfgs[1]),
        "--dataset", dataset, "--path_to_save_gens", str(work / "gens"),
    ]
    return args + (["--path_to_dataset", str(data)] if data else [])


def run(cmd: list[str], timeout: int = 240, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", **env}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def metrics(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """40 steps of `python stage1_vae_trainer.py` on shapes; the GAN joins at step 30; checkpoints at 20 and 40."""
    root = tmp_path_factory.mktemp("stage1")
    cfgs = write_configs(root / "cfg")
    work = root / "work"
    proc = run([PY, SCRIPT, *stage1_args(work, cfgs)])
    return work, cfgs, proc


def test_python_run_lowers_reconstruction_loss_and_writes_grids_and_model(shapes_run):
    work, cfgs, proc = shapes_run
    logged = metrics(work)
    assert [m["step"] for m in logged] == [10, 20, 30, 40]
    assert logged[-1]["rec_loss"] < 0.8 * logged[0]["rec_loss"]
    assert "disc_loss" not in logged[1] and "disc_loss" in logged[-1]  # the PatchGAN starts at disc_start
    grids = sorted(p.name for p in (work / "gens").iterdir())
    assert grids == ["step_0000020.png", "step_0000040.png"]
    grid = Image.open(work / "gens" / grids[-1])
    assert grid.size == (2 + 4 * 18, 2 + 2 * 18)  # 4 originals above 4 reconstructions, 16 px + 2 px padding
    assert sorted(p.name for p in work.glob("checkpoint_*")) == ["checkpoint_20", "checkpoint_40"]
    # the saved autoencoder reconstructs shapes better than a freshly initialised one
    vae = load_autoencoder(work / "model.safetensors")
    _, meta = load_models(work / "model.safetensors")
    assert meta["stage"] == 1 and meta["dataset"] == "shapes" and meta["model_config"]["vae"]["img_size"] == 16
    torch.manual_seed(0)
    fresh = build_autoencoder(vae.config).eval()
    x = torch.stack([ShapesDataset(16, 16, seed=7)[i]["image"] for i in range(16)])
    with torch.no_grad():
        err_trained = (vae.decode_latent(vae.latent_moments(x)[0]) - x).abs().mean()
        err_fresh = (fresh.decode_latent(fresh.latent_moments(x)[0]) - x).abs().mean()
    assert err_trained < 0.7 * err_fresh
    assert "reconstruction grids" in proc.stdout and str(work / "gens") in proc.stdout


def test_resume_from_checkpoint_matches_uninterrupted_run(shapes_run, tmp_path):
    work, cfgs, _ = shapes_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(work / "checkpoint_20", resumed / "checkpoint_20")
    proc = run([PY, SCRIPT, *stage1_args(resumed, cfgs), "--resume_from_checkpoint", "latest"])
    assert "resumed from" in proc.stdout
    a = load_file(str(work / "model.safetensors"))
    b = load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the discriminator (trained from step 30) and the optimizer states agree too
    da = load_file(str(work / "checkpoint_40" / "discriminator.safetensors"))
    db = load_file(str(resumed / "checkpoint_40" / "discriminator.safetensors"))
    assert all(torch.equal(da[k], db[k]) for k in da)
    assert [m["step"] for m in metrics(resumed)] == [30, 40]


def make_mixed_folder(folder: Path) -> int:
    """Good images in awkward formats plus unreadable ones; returns the number of unreadable files."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"rgb_{i}.png")
    Image.fromarray(rng.integers(0, 255, (18, 18), dtype=np.uint8), mode="L").save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).convert("CMYK").save(folder / "cmyk.jpg")
    (folder / "sub").mkdir()
    Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)).save(folder / "sub" / "deep16.png")  # I;16
    (folder / "corrupt.jpg").write_bytes(b"not an image at all")
    good = folder / "rgb_0.png"
    (folder / "truncated.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    return 2


def test_design_command_under_accelerate_launch_with_bad_files_and_wandb_offline(tmp_path):
    data = tmp_path / "celebahq"
    n_bad = make_mixed_folder(data)
    cfgs = write_configs(tmp_path / "cfg", per_gpu_batch_size=4, total_training_iterations=6, checkpoint_iterations=3,
                         val_generation_freq=3, disc_start=100)
    work = tmp_path / "work"
    # the design document's command line (relative script path, its flags), pointed at tiny configs
    proc = run([str(BIN / "accelerate"), "launch", "stage1_vae_trainer.py", *stage1_args(work, cfgs, "celebahq", data),
                "--log_wandb"])
    out = proc.stdout + proc.stderr
    assert "skipping unreadable image" in out and "corrupt.jpg" in out
    assert "skipped" in out and "unreadable image(s) during training" in out
    assert metrics(work)[-1]["skipped_files"] >= n_bad
    assert (work / "model.safetensors").is_file() and (work / "gens" / "step_0000006.png").is_file()
    assert list((work / "wandb").glob("offline-run-*")), "W&B should log offline into the working directory"


def test_misspelt_key_stops_before_any_model(tmp_path):
    import stage1_vae_trainer

    cfgs = write_configs(tmp_path / "cfg")
    text = cfgs[0].read_text().replace("kl_weight:", "kl_wieght:")
    cfgs[0].write_text(text)
    work = tmp_path / "work"
    with pytest.raises(ConfigError) as err:
        stage1_vae_trainer.main(stage1_args(work, cfgs))
    assert str(cfgs[0]) in str(err.value) and "'kl_wieght'" in str(err.value) and "'kl_weight'" in str(err.value)
    assert not work.exists()


def test_a_discriminator_too_deep_for_the_images_stops_before_any_model(tmp_path):
    """16 px images through the default disc_depth 3: the PatchGAN's last conv sees a 3 x 3 map under its 4 x 4
    kernel. The run used to crash at disc_start, after all the steps before it."""
    import stage1_vae_trainer

    cfgs = write_configs(tmp_path / "cfg", disc_depth=3)
    work = tmp_path / "work"
    with pytest.raises(ConfigError) as err:
        stage1_vae_trainer.main(stage1_args(work, cfgs))
    message = str(err.value)
    assert str(cfgs[0]) in message and "'disc_depth' 3" in message and "disc_depth 2 fits" in message
    assert not work.exists()
    cfgs = write_configs(tmp_path / "cfg", disc_depth=3, use_patchgan=False)  # no discriminator: nothing to check
    assert stage1_vae_trainer.load_stage1_configs(str(cfgs[0]), str(cfgs[1]))[0].disc_depth == 3


def test_model_config_defaults_to_design_ldm_yaml():
    """The design's Conceptual Captions command passes no --model_config."""
    import stage1_vae_trainer

    args = stage1_vae_trainer.parse_args([
        "--experiment_name", "VAETrainer", "--wandb_run_name", "vae_cc", "--working_directory", "work_dir/vae_cc",
        "--training_config", "configs/stage1_vae_train_cc.yaml", "--dataset", "conceptual_captions",
        "--path_to_dataset", "<PATH_TO_CONCEPTUAL_CAPTIONS>", "--path_to_save_gens", "src/cc_gen",
    ])
    assert args.model_config == "configs/ldm.yaml" and args.resume_from_checkpoint is None and not args.log_wandb
