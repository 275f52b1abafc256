"""Stage 2 and compute_vae_scaling.py on a diffusers AutoencoderKL folder, and --init_unet from an export."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import compute_vae_scaling
from src.config import ModelConfig, to_dict
from src.diffusers_export import export_diffusers
from src.models.diffusers_compat import load_vae_backbone, vae_state_from_diffusers
from src.models.serialization import load_models, save_models
from src.pipeline import load_pipeline
from src.training.init_unet import InitUNetError, load_initial_unet
from src.training.stage2 import resolve_scaling_factor
from tests.helpers import make_tiny_clip
from tests.stage2_helpers import (
    make_stage2_file,
    run_trainer,
    tiny_unet,
    trainer_argv,
    write_model_config,
    write_train_config,
)


def _diffusers_vae(folder):
    """A random diffusers AutoencoderKL shaped like TINY_VAE, whose config says scaling_factor 0.5."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, latent_channels=4,
                        norm_num_groups=4, sample_size=64, scaling_factor=0.5)
    vae.save_pretrained(folder)
    return vae


def _scaling(vae_path, model_cfg) -> float:
    return compute_vae_scaling.main(["--path_to_pretrained_weights", str(vae_path), "--model_config", str(model_cfg),
                                     "--dataset", "shapes", "--batch_size", "8", "--num_batches", "1",
                                     "--num_workers", "0"])


def test_stage2_trains_on_a_diffusers_vae_from_an_exported_unet(tmp_path, capsys):
    clip = make_tiny_clip(tmp_path / "clip")
    theirs = _diffusers_vae(tmp_path / "sd_vae")
    narrow = dataclasses.replace(tiny_unet(str(clip)), unet_channels_per_block=[8, 16])  # replaced by --init_unet
    cfg = write_model_config(tmp_path / "ldm.yaml", narrow, {})  # no scaling constant: the VAE's config has one

    # compute_vae_scaling.py reads the folder (at the model config's 16 px) as it reads our own file of those weights
    vae, factor = load_vae_backbone(tmp_path / "sd_vae", img_size=16)
    assert factor == 0.5
    meta = {"model_config": to_dict(ModelConfig(vae=vae.config)), "training_config": {}, "stage": 1}
    ours_file = save_models(tmp_path / "vae.safetensors", {"vae": vae}, meta)
    assert _scaling(tmp_path / "sd_vae", cfg) == pytest.approx(_scaling(ours_file, cfg), rel=1e-6)
    assert "config.json says scaling_factor 0.5" in capsys.readouterr().out
    assert resolve_scaling_factor(ModelConfig(), "shapes", cfg, tmp_path / "sd_vae") == 0.5
    overridden = ModelConfig(scaling_constants={"shapes": 0.9})
    assert resolve_scaling_factor(overridden, "shapes", cfg, tmp_path / "sd_vae") == 0.9  # the model config wins

    source = make_stage2_file(tmp_path / "source.safetensors", "text", tiny_unet(str(clip)), "shapes", str(clip))
    export = export_diffusers(source, tmp_path / "export")
    train = write_train_config(tmp_path / "train.yaml", total_training_iterations=2, checkpoint_iterations=2,
                               per_gpu_batch_size=4, shapes_num_images=8, cfg_dropout_prob=0.0, weight_decay=0.0)
    work = tmp_path / "work"
    run_trainer(trainer_argv(work, train, cfg, tmp_path / "sd_vae", "shapes", "--init_unet", str(export)))

    tensors, meta = load_models(work / "model.safetensors")
    assert meta["scaling_factor"] == 0.5 and meta["init_unet"] == str(export)
    assert meta["model_config"]["unet"]["unet_channels_per_block"] == [16, 32]  # the initial UNet's architecture
    assert meta["model_config"]["vae"]["img_size"] == 16
    expected_vae = vae_state_from_diffusers(theirs.state_dict())
    assert all(torch.equal(tensors["vae"][k], expected_vae[k]) for k in expected_vae)
    start = load_pipeline(source, load_text_encoder=False).unet.state_dict()
    # never dropped and without weight decay, the null token stays the exported one; the rest moved a little
    torch.testing.assert_close(tensors["unet"]["null_text_embedding"], start["null_text_embedding"])
    moved = (tensors["unet"]["conv_in.weight"] - start["conv_in.weight"]).abs().max()
    assert 0 < moved < 0.02


def test_a_config_constant_that_differs_from_the_diffusers_vaes_is_used_with_a_warning(tmp_path, caplog):
    """configs/ldm.yaml ships scaling constants measured on its own VAE; README's Stable Diffusion VAE command uses
    that config, so a constant the SD VAE's own 0.18215 contradicts must not pass silently."""
    _diffusers_vae(tmp_path / "sd_vae")  # scaling_factor 0.5
    with caplog.at_level("WARNING", logger="ldm"):
        for measured in (0.5, 0.6, 0.4):  # the VAE's own, or one measured on the user's data for this VAE
            assert resolve_scaling_factor(ModelConfig(scaling_constants={"shapes": measured}), "shapes", "m.yaml",
                                          tmp_path / "sd_vae") == measured
    assert not caplog.records  # nothing to say
    with caplog.at_level("WARNING", logger="ldm"):
        assert resolve_scaling_factor(ModelConfig(scaling_constants={"shapes": 0.9}), "shapes", "m.yaml",
                                      tmp_path / "sd_vae") == 0.9  # the model config still wins
    assert "scaling_constants.shapes of m.yaml is used" in caplog.text and "config.json says 0.5" in caplog.text
    assert "compute_vae_scaling.py" in caplog.text


def test_init_unet_refuses_another_conditioning_or_latent_width(tmp_path):
    model = make_stage2_file(tmp_path / "class.safetensors", "class", tiny_unet(class_conditioning=True), "imagenet")
    with pytest.raises(InitUNetError, match="class-conditional model, but this run is text-conditional"):
        load_initial_unet(model, tiny_unet(), "text", 4)
    with pytest.raises(InitUNetError, match="denoises 4-channel latents, but the VAE's latents have 16"):
        load_initial_unet(model, tiny_unet(class_conditioning=True), "class", 16)
    export = export_diffusers(model, tmp_path / "export")
    with pytest.raises(InitUNetError, match=r"class-conditional UNet \(it has a class embedding"):
        load_initial_unet(export / "unet", tiny_unet(), "none", 4)
    unet, cfg = load_initial_unet(export, tiny_unet(), "class", 4)
    assert cfg.num_classes == 3 and unet.conditioning == "class"
    with pytest.raises(FileNotFoundError, match="--init_unet .*missing"):
        load_initial_unet(tmp_path / "missing", tiny_unet(), "text", 4)


def test_more_class_folders_than_an_init_unet_has_classes_blames_the_source_not_the_config(tmp_path):
    from src.training.stage2 import Stage2SetupError
    from tests.stage2_helpers import make_image_folders, make_vae_file

    model = make_stage2_file(tmp_path / "class.safetensors", "class", tiny_unet(class_conditioning=True), "imagenet")
    wide = dataclasses.replace(tiny_unet(class_conditioning=True), num_classes=10)  # replaced by the source's 3
    cfg = write_model_config(tmp_path / "ldm.yaml", wide, {"imagenet": 0.7})
    argv = trainer_argv(tmp_path / "work", write_train_config(tmp_path / "train.yaml"), cfg,
                        make_vae_file(tmp_path / "vae.safetensors"), "imagenet", "--path_to_dataset",
                        str(make_image_folders(tmp_path / "data", num_classes=4, per_class=1)), "--init_unet", str(model))
    with pytest.raises(Stage2SetupError, match="4 class folders but the --init_unet model .* has 3 classes"):
        run_trainer(argv)  # "raise num_classes" would send the user to a config that already says 10


def test_init_unet_from_a_model_of_other_class_folders_warns_naming_the_labels(tmp_path, caplog):
    """Label i is the i-th class folder: a source trained on other folders gives its embeddings to other classes."""
    from src.training.init_unet import warn_if_classes_differ

    model = make_stage2_file(tmp_path / "class.safetensors", "class", tiny_unet(class_conditioning=True), "imagenet",
                             extra={"class_names": ["cat", "dog", "fox"]})
    with caplog.at_level("WARNING", logger="ldm"):
        warn_if_classes_differ(model, ["cat", "dog", "fox"])
        assert not caplog.records
        warn_if_classes_differ(model, ["cat", "eel", "fox", "owl"])
    message = caplog.records[-1].getMessage()
    assert "2 of 4 labels mean another class here (1: dog there, eel here, 3: - there, owl here)" in message


def test_stage2_with_init_unet_checks_the_source_class_folders(tmp_path, capfd):
    from tests.stage2_helpers import make_image_folders, make_vae_file

    model = make_stage2_file(tmp_path / "class.safetensors", "class", tiny_unet(class_conditioning=True), "imagenet",
                             extra={"class_names": ["class_0", "class_2", "class_1"]})
    cfg = write_model_config(tmp_path / "ldm.yaml", tiny_unet(class_conditioning=True), {"imagenet": 0.7})
    argv = trainer_argv(tmp_path / "work", write_train_config(tmp_path / "train.yaml", total_training_iterations=1),
                        cfg, make_vae_file(tmp_path / "vae.safetensors"), "imagenet", "--path_to_dataset",
                        str(make_image_folders(tmp_path / "data", num_classes=3, per_class=2)), "--init_unet", str(model))
    run_trainer(argv)
    assert "2 of 3 labels mean another class here (1: class_2 there, class_1 here, 2: class_1 there" in capfd.readouterr().out
