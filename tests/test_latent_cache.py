"""--cache_latents: same losses as training from images, exact stored moments, refusal of foreign caches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.data.image_folder import ImageFolderDataset
from src.data.loader import InfiniteLoader
from src.data.shapes import ShapesDataset
from src.models.vae import load_autoencoder
from src.training.latent_cache import LatentCacheDataset, LatentCacheError
from tests.helpers import make_tiny_clip
from tests.stage2_helpers import (
    make_flat_folder,
    make_vae_file,
    read_losses,
    run_trainer,
    tiny_unet,
    trainer_argv,
    write_model_config,
    write_train_config,
)


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory):
    """Two steps of text-conditional training on shapes, once from images and once through a fresh cache."""
    d = tmp_path_factory.mktemp("latent_cache")
    clip = make_tiny_clip(d / "clip")
    vae = make_vae_file(d / "vae.safetensors")
    model_cfg = write_model_config(d / "ldm.yaml", tiny_unet(str(clip)), {"shapes": 0.8})
    train = write_train_config(d / "train.yaml", total_training_iterations=2, checkpoint_iterations=2,
                               shapes_num_images=12, random_flip_p=0.5, cfg_dropout_prob=0.25)
    run_trainer(trainer_argv(d / "images", train, model_cfg, vae, "shapes"))
    run_trainer(trainer_argv(d / "cached", train, model_cfg, vae, "shapes", "--cache_latents", str(d / "cache")))
    return {"dir": d, "clip": clip, "vae": vae, "model_cfg": model_cfg, "train": train}


def test_training_from_the_cache_gives_the_same_losses(cached_run):
    d = cached_run["dir"]
    from_images, from_cache = read_losses(d / "images"), read_losses(d / "cached")
    assert sorted(from_images) == sorted(from_cache) == [1, 2]
    for step in (1, 2):  # step 2 also checks the update made from step 1's cached batch
        assert from_cache[step] == pytest.approx(from_images[step], rel=1e-5, abs=1e-6)
    assert from_images[1] != from_images[2]


def test_cache_stores_both_views_text_and_dataset_order(cached_run):
    d = cached_run["dir"]
    meta = json.loads((d / "cache" / "cache.json").read_text())
    assert meta["complete"] and meta["identity"]["flipped_views"]
    cache = LatentCacheDataset(d / "cache", "text")
    dataset = ShapesDataset(12, 16, seed=0)
    assert len(cache) == len(dataset) and cache.dataset_indices == list(range(12))
    vae = load_autoencoder(cached_run["vae"])
    for i in (0, 7):
        image = dataset[i]["image"][None]
        item = cache[i]
        assert item["moments"].shape == (2, 2, 4, 8, 8)  # (views, mean/std, C, h, w)
        with torch.no_grad():
            mean, std = vae.latent_moments(image)
            mean_f, std_f = vae.latent_moments(image.flip(-1))
        torch.testing.assert_close(item["moments"][0, 0], mean[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(item["moments"][0, 1], std[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(item["moments"][1, 0], mean_f[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(item["moments"][1, 1], std_f[0], rtol=1e-5, atol=1e-6)
        assert item["text_embeds"].ndim == 2 and item["text_embeds"].shape[1] == 32  # real tokens only, 32-d


def test_a_cache_from_another_vae_is_refused_and_left_intact(cached_run, tmp_path):
    d = cached_run["dir"]
    before = {p.relative_to(d / "cache"): p.read_bytes() for p in (d / "cache").rglob("*") if p.is_file()}
    other_vae = make_vae_file(tmp_path / "other_vae.safetensors", seed=1)
    with pytest.raises(LatentCacheError, match="another VAE.*vae_weights differs"):
        run_trainer(trainer_argv(tmp_path / "w", cached_run["train"], cached_run["model_cfg"], other_vae, "shapes",
                                 "--cache_latents", str(d / "cache")))
    after = {p.relative_to(d / "cache"): p.read_bytes() for p in (d / "cache").rglob("*") if p.is_file()}
    assert after == before
    assert not (tmp_path / "w" / "metrics.jsonl").exists()


def test_a_cache_made_with_another_data_config_is_refused(cached_run, tmp_path):
    d = cached_run["dir"]
    train = write_train_config(tmp_path / "train.yaml", total_training_iterations=2, shapes_num_images=12,
                               random_flip_p=0.0)  # no mirrored views in this run: the cache does not fit
    with pytest.raises(LatentCacheError, match="flipped_views: cache has true, this run has false"):
        run_trainer(trainer_argv(tmp_path / "w", train, cached_run["model_cfg"], cached_run["vae"], "shapes",
                                 "--cache_latents", str(d / "cache")))


def test_a_folder_that_is_not_a_cache_is_not_touched(cached_run, tmp_path):
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(LatentCacheError, match="not empty and holds no cache.json"):
        run_trainer(trainer_argv(tmp_path / "w", cached_run["train"], cached_run["model_cfg"], cached_run["vae"],
                                 "shapes", "--cache_latents", str(folder)))
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_an_unreadable_image_gives_the_same_batches_and_losses_from_the_cache(tmp_path):
    """The cache keeps a (None) slot for the unreadable image, so the loader permutes the same 10 items."""
    faces = make_flat_folder(tmp_path / "faces", count=9)
    (faces / "face_04_broken.png").write_bytes(b"not a png")  # dataset index 5 of 10
    vae = make_vae_file(tmp_path / "vae.safetensors")
    model_cfg = write_model_config(tmp_path / "ldm.yaml", tiny_unet(), {"celebahq": 0.8})
    train = write_train_config(tmp_path / "train.yaml", total_training_iterations=4, checkpoint_iterations=4,
                               per_gpu_batch_size=4, random_flip_p=0.5)  # 2 batches an epoch: 2 epochs
    argv = ("--path_to_dataset", str(faces))
    run_trainer(trainer_argv(tmp_path / "images", train, model_cfg, vae, "celebahq", *argv))
    run_trainer(trainer_argv(tmp_path / "cached", train, model_cfg, vae, "celebahq", *argv,
                             "--cache_latents", str(tmp_path / "cache")))
    from_images, from_cache = read_losses(tmp_path / "images"), read_losses(tmp_path / "cached")
    assert sorted(from_cache) == [1, 2, 3, 4]
    for step in from_cache:
        assert from_cache[step] == pytest.approx(from_images[step], rel=1e-5, abs=1e-6)

    images, cache = ImageFolderDataset(faces, 16), LatentCacheDataset(tmp_path / "cache", "none")
    assert len(cache) == len(images) == 10 and cache[5] is None and 5 not in cache.dataset_indices
    loaders = InfiniteLoader(images, 4, seed=0), InfiniteLoader(cache, 4, seed=0)
    sizes = [[b["moments" if "moments" in b else "image"].shape[0] for _, b in zip(range(4), ld)] for ld in loaders]
    assert sizes[0] == sizes[1] and loaders[0].num_skipped == loaders[1].num_skipped == 2  # once an epoch each

    meta_file = tmp_path / "cache" / "cache.json"  # a cache written before cache.json recorded num_items
    meta = json.loads(meta_file.read_text())
    del meta["num_items"]
    meta_file.write_text(json.dumps(meta))
    assert LatentCacheDataset(tmp_path / "cache", "none").keys == cache.keys  # its identity has num_items


def test_two_processes_build_one_cache_in_dataset_order(tmp_path):
    """torchrun --nproc_per_node 2 (gloo on CPU): each process encodes its share; the cache reads back in order."""
    root = Path(__file__).resolve().parents[1]
    faces = make_flat_folder(tmp_path / "faces", count=9)
    vae = make_vae_file(tmp_path / "vae.safetensors")
    model_cfg = write_model_config(tmp_path / "ldm.yaml", tiny_unet(), {"celebahq": 0.8})
    train = write_train_config(tmp_path / "train.yaml", total_training_iterations=2, checkpoint_iterations=2,
                               per_gpu_batch_size=2, random_flip_p=0.0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "stage2_diffusion_trainer.py",
           *trainer_argv(tmp_path / "w", train, model_cfg, vae, "celebahq", "--path_to_dataset", str(faces),
                         "--cache_latents", str(tmp_path / "cache"))]
    env = {**os.environ, "PYTHONPATH": str(root), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "cache").glob("shard_*")) == ["shard_0", "shard_1"]
    cache = LatentCacheDataset(tmp_path / "cache", "none")
    assert cache.dataset_indices == list(range(9)) and cache[4]["moments"].shape == (1, 2, 4, 8, 8)
    assert sorted(read_losses(tmp_path / "w")) == [1, 2] and (tmp_path / "w" / "model.safetensors").is_file()


def test_a_vq_autoencoder_trains_stage_2_from_the_cache_as_from_images(tmp_path):
    """A VQ-VAE's state dict holds a 0-d step counter: the cache's VAE fingerprint must hash it, not crash on it.
    Stage 2 diffuses the pre-quantisation latent (zero std), so the cached run's losses equal the images' run."""
    import dataclasses

    from tests.stage2_helpers import TINY_VAE

    vq_cfg = dataclasses.replace(TINY_VAE, quantize=True, codebook_size=16, vq_embed_dim=4)
    faces = make_flat_folder(tmp_path / "faces", count=8)
    vae = make_vae_file(tmp_path / "vq.safetensors", vae_cfg=vq_cfg)
    model_cfg = write_model_config(tmp_path / "ldm.yaml", tiny_unet(), {"celebahq": 0.8}, vae_cfg=vq_cfg)
    train = write_train_config(tmp_path / "train.yaml", total_training_iterations=2, checkpoint_iterations=2,
                               random_flip_p=0.5)
    argv = ("--path_to_dataset", str(faces))
    run_trainer(trainer_argv(tmp_path / "images", train, model_cfg, vae, "celebahq", *argv))
    run_trainer(trainer_argv(tmp_path / "cached", train, model_cfg, vae, "celebahq", *argv,
                             "--cache_latents", str(tmp_path / "cache")))
    from_images, from_cache = read_losses(tmp_path / "images"), read_losses(tmp_path / "cached")
    assert sorted(from_cache) == [1, 2]
    for step in from_cache:
        assert from_cache[step] == pytest.approx(from_images[step], rel=1e-5, abs=1e-6)
    assert load_autoencoder(tmp_path / "cached" / "model.safetensors").config.quantize


def test_a_cache_of_other_images_at_the_same_path_is_refused(tmp_path):
    """Another set of images in the same folder, as many as before (a re-export, a resized copy): the cache's
    latents are of the old images, so it must be refused, not silently trained from."""
    from accelerate import Accelerator
    from PIL import Image

    from src.config import Stage2TrainConfig
    from src.training.latent_cache import check_cache_dir, open_or_build_latent_cache
    from src.training.stage2 import cache_identity

    faces = make_flat_folder(tmp_path / "faces", count=3)
    vae = load_autoencoder(make_vae_file(tmp_path / "vae.safetensors"))
    dataset = ImageFolderDataset(faces, 16)

    def identity():
        return cache_identity(vae, "celebahq", str(faces), len(dataset), Stage2TrainConfig(), "none", None, None)

    open_or_build_latent_cache(Accelerator(cpu=True), tmp_path / "cache", dataset, vae, identity(), False, "none",
                               None, batch_size=3)
    assert check_cache_dir(tmp_path / "cache", identity())  # unchanged folder: reused
    Image.new("RGB", (20, 20), (255, 255, 255)).save(faces / "face_01.png")  # same names, same count
    with pytest.raises(LatentCacheError, match="files differs"):
        check_cache_dir(tmp_path / "cache", identity())


def test_a_cache_from_before_an_identity_field_names_that_field(tmp_path):
    """A cache whose identity lacks a field this version adds (even one whose value here is null, as 'files' is
    for the built-in datasets) is refused by its fingerprint; the error names that field, not the format."""
    from src.training.latent_cache import CACHE_FORMAT, check_cache_dir, identity_fingerprint

    old = {"dataset": "shapes", "num_items": 64}
    new = {**old, "files": None}
    (tmp_path / "cache.json").write_text(json.dumps(
        {"format": CACHE_FORMAT, "fingerprint": identity_fingerprint(old), "identity": old, "complete": True}))
    with pytest.raises(LatentCacheError, match="files: this run has it, the cache does not") as err:
        check_cache_dir(tmp_path, new)
    assert "format" not in str(err.value)
    assert check_cache_dir(tmp_path, old)


def test_building_the_cache_leaves_the_global_rng_as_it_was(tmp_path):
    """The UNet's dropout draws from the global RNG: a run that builds its cache must draw the numbers a run from
    images (or from a cache already built) draws. The build's DataLoader took its worker seed from it (unet.dropout
    0.3: a different loss at step 1 than from images)."""
    from accelerate import Accelerator

    from src.config import Stage2TrainConfig
    from src.training.latent_cache import open_or_build_latent_cache
    from src.training.stage2 import cache_identity

    faces = make_flat_folder(tmp_path / "faces", count=3)
    vae = load_autoencoder(make_vae_file(tmp_path / "vae.safetensors"))
    dataset = ImageFolderDataset(faces, 16)
    identity = cache_identity(vae, "celebahq", str(faces), len(dataset), Stage2TrainConfig(), "none", None, None)
    before = torch.get_rng_state()
    open_or_build_latent_cache(Accelerator(cpu=True), tmp_path / "cache", dataset, vae, identity, True, "none", None,
                               batch_size=2)
    assert torch.equal(torch.get_rng_state(), before)
