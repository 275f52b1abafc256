"""evaluate_ldm.py, evaluate_vae.py and the periodic FID of stage-2 training, end to end on tiny models.

The standard Inception weights cannot be downloaded here: a randomly initialised InceptionV3 is saved in the same
format (a plain state dict) and loaded through the same path as the real file. A handful of images keeps the
299 x 299 Inception affordable on the CPU.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate_ldm
import evaluate_vae
from src.config import ConfigError, Stage2TrainConfig, load_config
from src.evaluation.fid import stats_from_features
from src.evaluation.inception import INCEPTION_FILE, INCEPTION_URL, InceptionWeightsError
from src.evaluation.reconstruction import psnr, ssim
from src.models.lpips import VGG16_IMAGENET_FILE, vgg16_trunk
from src.pipeline import PipelineError, load_pipeline
from tests.conftest import ROOT
from tests.eval_helpers import make_random_inception_file
from tests.helpers import make_tiny_clip, reset_accelerate
from tests.stage2_helpers import make_vae_file, run_trainer, tiny_unet, trainer_argv, write_model_config, write_train_config

STEPS = 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny text-conditional model trained on shapes for a few steps, with periodic FID on at the last step."""
    d = tmp_path_factory.mktemp("evaluate")
    inception = make_random_inception_file(d / "weights" / INCEPTION_FILE)
    clip = make_tiny_clip(d / "clip")
    vae = make_vae_file(d / "vae.safetensors")
    model_cfg = write_model_config(d / "ldm.yaml", tiny_unet(str(clip)), {"shapes": 0.9})
    train_cfg = write_train_config(
        d / "train.yaml", total_training_iterations=STEPS, checkpoint_iterations=STEPS, val_generation_freq=0,
        shapes_num_images=16, val_sampler_steps=2, fid_num_samples=2, fid_eval_freq=STEPS,
        fid_inception_weights=str(inception),
    )
    work = d / "work"
    run_trainer(trainer_argv(work, train_cfg, model_cfg, vae, "shapes"))
    return {"dir": d, "inception": inception, "work": work, "model": work / "model.safetensors", "vae": vae}


def test_training_logs_fid_and_kid_when_due(trained):
    rows = [json.loads(line) for line in (trained["work"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all("fid" not in r for r in rows[:-1])  # fid_eval_freq honoured
    last = rows[-1]
    assert math.isfinite(last["fid"]) and last["fid"] > 0 and math.isfinite(last["kid"]) and "loss" in last
    caches = list((trained["work"] / "fid_reference").glob("*.npz"))
    assert len(caches) == 1
    with __import__("numpy").load(caches[0]) as stats:
        assert int(stats["count"]) == 2  # fid_num_samples reference images


def test_fid_keys_are_typed_and_a_misspelt_one_is_rejected(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("fid_num_samples: 5000\nfid_eval_freq: 10000\n")
    cfg = load_config(path, Stage2TrainConfig)
    assert (cfg.fid_num_samples, cfg.fid_eval_freq, cfg.fid_inception_weights) == (5000, 10000, None)
    path.write_text("fid_num_sample: 5000\n")
    with pytest.raises(ConfigError, match="'fid_num_samples'"):
        load_config(path, Stage2TrainConfig)
    path.write_text("fid_eval_freq: often\n")
    with pytest.raises(ConfigError, match="integer"):
        load_config(path, Stage2TrainConfig)
    # one sample has no covariance: refused at setup, not by a ValueError at the first FID step, mid-run
    from src.training.stage2 import Stage2SetupError, build_process

    with pytest.raises(Stage2SetupError, match="fid_num_samples must be 0 .off. or at least 2"):
        build_process(Stage2TrainConfig(fid_num_samples=1, fid_eval_freq=10))
    build_process(Stage2TrainConfig(fid_num_samples=1, fid_eval_freq=0))  # FID off: nothing to refuse


def test_evaluate_ldm_writes_fid_kid_and_a_grid_reusing_the_reference_training_cached(trained, tmp_path):
    """Same images (2 shapes of the training seed) and same Inception as the training run's periodic FID: the
    reference statistics are read back from its cache, so this run only samples."""
    reset_accelerate()
    result = evaluate_ldm.main([
        "--path_to_weights", str(trained["model"]), "--num_samples", "2", "--num_reference", "2",
        "--batch_size", "2", "--num_steps", "2", "--guidance_scale", "2", "--seed", "5",
        "--inception_weights", str(trained["inception"]), "--stats_cache", str(trained["work"] / "fid_reference"),
        "--num_workers", "0", "--output", str(tmp_path / "out"),
    ])
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == pytest.approx(result)
    assert math.isfinite(result["fid"]) and result["fid"] > 0 and math.isfinite(result["kid"])
    assert (result["num_samples"], result["num_reference"], result["reference_statistics"]) == (2, 2, "cached")
    assert (result["sampler"], result["num_steps"], result["guidance_scale"], result["seed"]) == ("ddim", 2, 2.0, 5)
    assert result["conditioning"] == "text" and result["reference"] == "shapes"
    assert Image.open(tmp_path / "out" / "grid.png").size == (2 + 2 * 18, 2 + 18)  # 2 samples of 16 px


def test_evaluate_ldm_refuses_more_steps_than_timesteps_before_reading_the_reference(trained, tmp_path):
    """--num_steps above the model's T is refused once the model is loaded: before the reference (here a folder
    that does not exist, whose error would come first otherwise) and hours of statistics."""
    reset_accelerate()
    T = load_pipeline(trained["model"]).process.num_timesteps
    with pytest.raises(PipelineError, match=f"--num_steps {T + 1}: this model has {T} training timesteps"):
        evaluate_ldm.main(["--path_to_weights", str(trained["model"]), "--num_steps", str(T + 1),
                           "--reference", str(tmp_path / "no_such_folder"),
                           "--inception_weights", str(trained["inception"]), "--output", str(tmp_path / "out")])


def test_evaluate_ldm_on_two_processes_gives_one_process_numbers_and_grid(trained, tmp_path):
    """torchrun with 2 CPU processes (gloo): 3 samples in batches of 1 (process 0 draws samples 0 and 2, process 1
    sample 1) give the single process's FID, KID and grid.png, which holds the first samples in order."""
    flags = ["--path_to_weights", str(trained["model"]), "--num_samples", "3", "--num_reference", "2",
             "--batch_size", "1", "--num_steps", "2", "--seed", "5", "--inception_weights", str(trained["inception"]),
             "--stats_cache", str(trained["work"] / "fid_reference"), "--num_workers", "0", "--kid_subset_size", "2"]
    reset_accelerate()
    single = evaluate_ldm.main(flags + ["--output", str(tmp_path / "one")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "evaluate_ldm.py", *flags, "--output", str(tmp_path / "two")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["num_processes"] == 2 and two["num_samples"] == 3
    for key in ("fid", "kid", "kid_std"):
        assert two[key] == pytest.approx(single[key], rel=1e-5), key
    grids = [np.asarray(Image.open(tmp_path / name / "grid.png")) for name in ("one", "two")]
    assert grids[0].shape == (2 + 18, 2 + 3 * 18, 3) and np.array_equal(grids[0], grids[1])


@pytest.mark.usefixtures("one_thread")
def test_evaluate_ldm_samples_depend_on_the_seed_alone_and_nearby_seeds_share_none(tmp_path):
    """Sample i's noise is seeded by (seed, i): --batch_size does not change the samples, and --seed 1 does not
    redraw --seed 0's samples shifted by one batch (with seed + batch index it redrew 4 of 6)."""
    from tests.stage2_helpers import make_stage2_file, tiny_unet

    pipe = load_pipeline(make_stage2_file(tmp_path / "none.safetensors", "none", tiny_unet(), "celebahq"))

    def samples(seed: int, batch_size: int) -> torch.Tensor:  # (6, 3 * 16 * 16): the pixels as features
        args = evaluate_ldm.parse_args(["--path_to_weights", "x", "--num_samples", "6", "--num_steps", "2",
                                        "--batch_size", str(batch_size), "--seed", str(seed)])
        return evaluate_ldm.sample_features(args, pipe, lambda images: images.flatten(1), None, None, None)[0]

    seed0 = samples(0, 2)
    torch.testing.assert_close(samples(0, 3), seed0, atol=1e-5, rtol=0)
    distance = torch.cdist(samples(1, 2), seed0)  # (6, 6)
    assert distance.min() > 1.0, distance.min()


def test_evaluate_ldm_takes_the_guidance_rescale_of_training_and_records_it(trained, tmp_path, capsys):
    """Training's periodic FID samples with val_guidance_rescale; evaluate_ldm.py had no such flag, so a periodic
    FID with it on could not be reproduced. The flag reaches the sampler, results.json records it, and a value
    outside [0, 1] is refused before sampling (as in inference_ldm.py and evaluate_shapes.py)."""
    import evaluate_shapes

    flags = ["--path_to_weights", str(trained["model"]), "--num_samples", "2", "--num_reference", "2",
             "--batch_size", "2", "--num_steps", "2", "--guidance_scale", "3", "--num_workers", "0",
             "--inception_weights", str(trained["inception"]), "--stats_cache", str(trained["work"] / "fid_reference")]
    results = {}
    for rescale in ("0", "0.7"):
        reset_accelerate()
        results[rescale] = evaluate_ldm.main(flags + ["--guidance_rescale", rescale, "--output", str(tmp_path / rescale)])
    assert (results["0"]["guidance_rescale"], results["0.7"]["guidance_rescale"]) == (0.0, 0.7)
    assert results["0"]["fid"] != results["0.7"]["fid"]  # other samples
    for parse in (evaluate_ldm.parse_args, evaluate_shapes.parse_args):
        with pytest.raises(SystemExit):
            parse(["--path_to_weights", "m.safetensors", "--guidance_rescale", "1.5"])
        assert "--guidance_rescale must be in [0, 1]" in capsys.readouterr().err


def test_evaluate_ldm_records_the_guidance_an_unconditional_model_was_sampled_with(trained, tmp_path):
    """Sampling an unconditional model ignores --guidance_scale (nothing to guide towards): results.json must say
    1, the scale the samples were drawn with, not the flag's value."""
    from tests.stage2_helpers import make_flat_folder, make_stage2_file

    model = make_stage2_file(tmp_path / "none.safetensors", "none", tiny_unet(), "celebahq")
    reset_accelerate()
    result = evaluate_ldm.main([
        "--path_to_weights", str(model), "--reference", str(make_flat_folder(tmp_path / "faces", count=2)),
        "--num_samples", "2", "--num_reference", "2", "--batch_size", "2", "--num_steps", "2",
        "--guidance_scale", "3", "--inception_weights", str(trained["inception"]),
        "--stats_cache", str(tmp_path / "cache"), "--num_workers", "0", "--output", str(tmp_path / "out"),
    ])
    assert result["conditioning"] == "none" and result["guidance_scale"] == 1.0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["guidance_scale"] == 1.0



def test_class_samples_follow_the_class_proportions_of_the_reference_folder(tmp_path, caplog):
    """FID compares marginals: balanced labels (4:4) against a 6:2 reference cost a perfect model FID ~3 in a
    two-Gaussian toy (0.02 with 6:2). The labels follow a class-folder reference's counts, else are balanced."""
    import shutil

    from tests.stage2_helpers import make_image_folders, make_stage2_file

    data = make_image_folders(tmp_path / "data", num_classes=2, per_class=2)
    for i in range(2, 6):
        shutil.copy(data / "class_0" / "img_0.png", data / "class_0" / f"img_{i}.png")
    model = make_stage2_file(tmp_path / "class.safetensors", "class", tiny_unet(class_conditioning=True), "imagenet",
                             extra={"class_names": ["class_0", "class_1"]})  # 3 embeddings, 2 trained classes
    pipe = load_pipeline(model)

    def labels(*flags):
        args = evaluate_ldm.parse_args(["--path_to_weights", str(model), "--num_samples", "8", *flags])
        return evaluate_ldm.sample_conditions(args, pipe, evaluate_ldm.reference_source(args, pipe))[1]

    assert labels("--path_to_dataset", str(data)) == [0, 0, 1, 0, 0, 0, 1, 0]  # 6:2, both classes in any half
    assert np.bincount(labels("--path_to_dataset", str(data), "--num_reference", "4")).sum() == 8
    assert labels("--path_to_dataset", str(data), "--balanced_labels") == [0, 1] * 4
    assert labels("--reference", str(data)) == [0, 1] * 4  # a plain folder: labels unknown
    (data / "class_1").rename(data / "zebra")
    with caplog.at_level("WARNING"):
        assert labels("--path_to_dataset", str(data)) == [0, 1] * 4
    assert "not the model's" in caplog.text


def test_kid_flags_are_checked_before_sampling_and_results_name_the_subset_size_used():
    """--kid_subset_size 1 used to fail in the MMD after all the sampling, --kid_subsets 0 to give a NaN KID; and
    with fewer samples than --kid_subset_size the subsets were smaller than results.json said (1000)."""
    base = ["--path_to_weights", "model.safetensors"]
    for flags in (["--kid_subset_size", "1"], ["--kid_subsets", "0"]):
        with pytest.raises(SystemExit):
            evaluate_ldm.parse_args(base + flags)
    rng = np.random.default_rng(0)
    reference = stats_from_features(rng.normal(size=(20, 8)))
    fake = torch.from_numpy(rng.normal(size=(10, 8)))
    assert evaluate_ldm.metrics(fake, reference, evaluate_ldm.parse_args(base))["kid_subset_size"] == 10
    result = evaluate_ldm.metrics(fake, reference, evaluate_ldm.parse_args(base + ["--kid_subset_size", "4"]))
    assert result["kid_subset_size"] == 4 and math.isfinite(result["kid"])


def test_evaluate_ldm_decodes_in_fp32_whatever_the_dtype(tmp_path):
    """--dtype is the UNet's and text encoder's precision: the images FID sees were decoded by a bf16 VAE under
    --dtype bfloat16 (36 % of a tiny VAE's uint8 values off, by up to 3 levels), unlike training's periodic FID."""
    from src.evaluation.inception import to_uint8
    from tests.stage2_helpers import make_stage2_file

    model = make_stage2_file(tmp_path / "none.safetensors", "none", tiny_unet(), "celebahq")
    pipe = evaluate_ldm.load_model(evaluate_ldm.parse_args(["--path_to_weights", str(model), "--dtype", "bfloat16"]),
                                   "cpu")
    assert pipe.unet.conv_in.weight.dtype == torch.bfloat16
    z = torch.randn(2, *pipe.latent_shape(1)[1:], generator=torch.Generator().manual_seed(0))
    full = load_pipeline(model, "cpu", torch.float32)
    assert torch.equal(to_uint8(pipe.decode(z)), to_uint8(full.decode(z)))


def test_evaluate_ldm_rejects_an_unknown_sampler(trained, capsys):
    with pytest.raises(SystemExit):
        evaluate_ldm.parse_args(["--path_to_weights", str(trained["model"]), "--sampler", "euler_a"])
    assert "invalid choice" in capsys.readouterr().err


def test_missing_inception_weights_stop_evaluate_ldm_with_the_file_and_url(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    reset_accelerate()
    with pytest.raises(InceptionWeightsError) as err:
        evaluate_ldm.main(["--path_to_weights", str(trained["model"]), "--output", str(tmp_path / "out")])
    msg = str(err.value)
    assert INCEPTION_FILE in msg and INCEPTION_URL in msg
    assert str(tmp_path / "empty_torch_home" / "hub" / "checkpoints") in msg
    assert not (tmp_path / "out").exists()


def test_psnr_and_ssim_on_known_pairs():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.8
    assert torch.allclose(psnr(x + 0.1, x), torch.full((2,), 20.0), atol=1e-4)  # MSE 0.01 -> 20 dB
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)
    assert (ssim(x.flip(-1), x) < 0.5).all()


def test_evaluate_vae_reports_rfid_psnr_ssim_lpips_with_weights_from_torch_home(trained, tmp_path, monkeypatch):
    """Weights are found in $TORCH_HOME/hub/checkpoints: the Inception file, and (standing in for ImageNet VGG16)
    a random trunk under torchvision's file name, under our LPIPS with the official linear layers."""
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / INCEPTION_FILE).symlink_to(trained["inception"])
    torch.manual_seed(0)
    torch.save({f"features.{k}": v for k, v in vgg16_trunk().state_dict().items()}, hub / VGG16_IMAGENET_FILE)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    reset_accelerate()
    result = evaluate_vae.main([
        "--path_to_weights", str(trained["vae"]), "--dataset", "shapes", "--num_images", "2", "--batch_size", "2",
        "--num_workers", "0", "--stats_cache", str(tmp_path / "cache"), "--output", str(tmp_path / "out"),
    ])
    assert result["num_images"] == 2 and result["reference_statistics"] == "computed"
    assert math.isfinite(result["rfid"]) and result["rfid"] > 0  # a random VAE reconstructs badly
    assert 0 < result["psnr"] < 40 and -1 <= result["ssim"] < 0.99 and result["lpips"] > 0
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == pytest.approx(result)
    assert Image.open(tmp_path / "out" / "grid.png").size == (2 + 2 * 18, 2 + 2 * 18)  # originals over recons


def test_evaluate_vae_takes_a_diffusers_autoencoderkl_folder(tmp_path, monkeypatch):
    """README: every script that takes an autoencoder takes a diffusers AutoencoderKL (converted on load, as
    test_diffusers_compat checks); evaluate_vae.py scores it at its config's sample_size."""
    from diffusers import AutoencoderKL

    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save({f"features.{k}": v for k, v in vgg16_trunk().state_dict().items()}, hub / VGG16_IMAGENET_FILE)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, latent_channels=4, norm_num_groups=4,
                  sample_size=16).save_pretrained(tmp_path / "sd_vae")
    reset_accelerate()
    result = evaluate_vae.main(["--path_to_weights", str(tmp_path / "sd_vae"), "--dataset", "shapes",
                                "--num_images", "2", "--batch_size", "2", "--num_workers", "0", "--skip_rfid",
                                "--output", str(tmp_path / "out")])
    assert result["image_size"] == 16 and result["num_images"] == 2
    assert 0 < result["psnr"] < 40 and result["lpips"] > 0
    assert Image.open(tmp_path / "out" / "grid.png").size == (2 + 2 * 18, 2 + 2 * 18)


def test_evaluate_vae_skip_rfid_needs_no_inception_and_gives_the_same_scores(trained, tmp_path, monkeypatch):
    """--skip_rfid: no Inception file anywhere, no reference statistics; PSNR, SSIM and LPIPS as in a full run."""
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save({f"features.{k}": v for k, v in vgg16_trunk().state_dict().items()}, hub / VGG16_IMAGENET_FILE)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    argv = ["--path_to_weights", str(trained["vae"]), "--dataset", "shapes", "--num_images", "3", "--batch_size", "2",
            "--num_workers", "0", "--stats_cache", str(tmp_path / "cache")]
    reset_accelerate()
    with pytest.raises(InceptionWeightsError):
        evaluate_vae.main(argv + ["--output", str(tmp_path / "full")])
    reset_accelerate()
    result = evaluate_vae.main(argv + ["--output", str(tmp_path / "scores"), "--skip_rfid"])
    assert result["rfid"] is None and result["inception_weights"] is None and result["num_images"] == 3
    assert not (tmp_path / "cache").exists()  # no reference statistics were computed or stored
    (hub / INCEPTION_FILE).symlink_to(trained["inception"])
    reset_accelerate()
    full = evaluate_vae.main(argv + ["--output", str(tmp_path / "full")])
    assert math.isfinite(full["rfid"])
    for name in ("psnr", "ssim", "lpips", "psnr_std", "ssim_std", "lpips_std"):
        assert result[name] == pytest.approx(full[name], rel=1e-6, abs=1e-7), name



def test_periodic_fid_leaves_the_training_random_state_as_it_was(tmp_path, monkeypatch):
    """The first evaluation extracts the reference features through a DataLoader, whose iterator draws its seed from
    the global torch RNG, the one UNet dropout draws from: turning FID on must not change the training run.
    (The evaluation itself is the end-to-end test's above; here it is stood in for by that DataLoader pass.)"""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader

    import src.training.periodic_fid as periodic

    weights = tmp_path / INCEPTION_FILE
    weights.write_bytes(b"")  # looked up (exists), never read by the stand-in
    calls = []

    def evaluation(args, accelerator, ctx, ema_unet, step, found):
        calls.append(found)
        list(DataLoader(list(range(4)), batch_size=2))  # as reference_stats does: the iterator seeds itself
        return {"fid": 1.0}

    monkeypatch.setattr(periodic, "evaluate_fid", evaluation)
    cfg = Stage2TrainConfig(fid_num_samples=2, fid_eval_freq=2, fid_inception_weights=str(weights))
    ctx = SimpleNamespace(train_cfg=cfg, device=torch.device("cpu"))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    assert periodic.periodic_fid(None, None, ctx, None, 1) == {}  # not due
    assert periodic.periodic_fid(None, None, ctx, None, 2) == {"fid": 1.0} and len(calls) == 1
    assert torch.equal(torch.get_rng_state(), before)
