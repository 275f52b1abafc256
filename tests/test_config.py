import dataclasses

import pytest

from src.config import (
    ConfigError,
    ModelConfig,
    Stage1TrainConfig,
    Stage2TrainConfig,
    from_dict,
    load_config,
    load_model_config,
    update_yaml_value,
)
from tests.conftest import ROOT


@pytest.mark.parametrize(
    "name,cls",
    [
        ("stage1_vae_train.yaml", Stage1TrainConfig),
        ("stage1_vae_train_cc.yaml", Stage1TrainConfig),
        ("stage1_vqvae_train.yaml", Stage1TrainConfig),
        ("stage2_diffusion_train.yaml", Stage2TrainConfig),
    ],
)
def test_shipped_training_configs_load(name, cls):
    cfg = load_config(ROOT / "configs" / name, cls)
    assert cfg.total_training_iterations >= 400000


def test_design_values():
    m = load_model_config(ROOT / "configs" / "ldm.yaml")
    assert m.vae.vae_channels_per_block == [128, 256, 512, 512]
    assert m.vae.latent_size == 32 and m.vae.latent_channels == 4
    assert m.scaling_constants["celebahq"] == pytest.approx(0.8924759)
    s1 = load_config(ROOT / "configs" / "stage1_vae_train.yaml", Stage1TrainConfig)
    assert (s1.learning_rate, s1.kl_weight, s1.disc_start, s1.per_gpu_batch_size) == (5e-5, 1e-6, 50000, 12)
    cc = load_config(ROOT / "configs" / "stage1_vae_train_cc.yaml", Stage1TrainConfig)
    assert (cc.total_training_iterations, cc.per_gpu_batch_size) == (500000, 16)
    vq = load_config(ROOT / "configs" / "stage1_vqvae_train.yaml", Stage1TrainConfig)
    assert vq.quantize is True


def test_misspelt_key_names_file_key_and_closest(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("learning_rat: 1.0e-4\nkl_weight: 1.0e-6\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, Stage1TrainConfig)
    msg = str(err.value)
    assert str(path) in msg and "'learning_rat'" in msg and "'learning_rate'" in msg


def test_misspelt_nested_key(tmp_path):
    path = tmp_path / "ldm.yaml"
    path.write_text("vae:\n  latent_chanels: 4\n")
    with pytest.raises(ConfigError, match="latent_channels"):
        load_model_config(path)


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("per_gpu_batch_size: 1.5\n", "integer"),
        ("use_patchgan: 'yes'\n", "true/false"),
        ("learning_rate: fast\n", "number"),
        ("disc_loss: wasserstein\n", "not one of"),
        ("log_every: 0\n", "key 'log_every' must be >= 1, got 0"),
        ("checkpoint_iterations: -5\n", "key 'checkpoint_iterations' must be >= 0, got -5"),
        ("val_generation_freq: -1\n", "key 'val_generation_freq' must be >= 0"),
        ("max_nonfinite_steps: 0\n", "key 'max_nonfinite_steps' must be >= 1"),
        ("disc_adam_bet1: 0.5\n", "closest valid key: 'disc_adam_beta1'"),
        # values no run can use stop at load, naming file and key, instead of deep inside the run
        ("per_gpu_batch_size: 0\n", "key 'per_gpu_batch_size' must be >= 1, got 0"),
        ("gradient_accumulation_steps: 0\n", "key 'gradient_accumulation_steps' must be >= 1"),
        ("total_training_iterations: 0\n", "key 'total_training_iterations' must be >= 1"),
        ("learning_rate: -1.0e-4\n", "key 'learning_rate' must be >= 0"),
        ("disc_adam_beta2: 1.0\n", "key 'disc_adam_beta2' must be < 1.0, got 1.0"),
        ("random_flip_p: 1.5\n", "key 'random_flip_p' must be <= 1.0"),
        ("learning_rate: .nan\n", "key 'learning_rate': expected a finite number"),
        ("kl_weight: .inf\n", "key 'kl_weight': expected a finite number"),
        ("kl_weight: 1.0e-6\nuse_lpips: false\nkl_weight: 1.0\n", r"key 'kl_weight' is given twice \(lines 1 and 3\)"),
        ("ema_decay: 1.5\n", "key 'ema_decay' must be <= 1.0"),  # stage 2's keys
        ("cfg_dropout_prob: -0.1\n", "key 'cfg_dropout_prob' must be >= 0"),
        ("val_sampler_steps: 0\n", "key 'val_sampler_steps' must be >= 1"),
    ],
)
def test_wrong_types_rejected(tmp_path, text, fragment):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    stage2 = text.split(":")[0] in {f.name for f in dataclasses.fields(Stage2TrainConfig)} - {
        f.name for f in dataclasses.fields(Stage1TrainConfig)}
    with pytest.raises(ConfigError, match=fragment):
        load_config(path, Stage2TrainConfig if stage2 else Stage1TrainConfig)


def test_yaml11_exponent_without_dot_is_a_number(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("learning_rate: 5e-5\n")  # PyYAML reads this as a string
    assert load_config(path, Stage1TrainConfig).learning_rate == 5e-5


def test_round_trip_through_dict():
    m = ModelConfig()
    from src.config import to_dict

    assert from_dict(ModelConfig, to_dict(m)) == m


def test_update_yaml_value_rewrites_one_line(tmp_path):
    path = tmp_path / "ldm.yaml"
    original = (ROOT / "configs" / "ldm.yaml").read_text()
    path.write_text(original)
    update_yaml_value(path, "scaling_constants", "celebahq", 1.2345678)
    new = path.read_text().splitlines()
    old = original.splitlines()
    changed = [(a, b) for a, b in zip(old, new) if a != b]
    assert len(new) == len(old) and len(changed) == 1
    assert changed[0][1].strip() == "celebahq: 1.234568"
    update_yaml_value(path, "scaling_constants", "shapes", 0.5)
    assert load_model_config(path).scaling_constants == {
        "celebahq": pytest.approx(1.234568),
        "imagenet": pytest.approx(0.9515730),
        "conceptual_captions": pytest.approx(0.9091397),
        "shapes": 0.5,
    }


@pytest.mark.parametrize("header", ["scaling_constants:  # per dataset\n  celebahq: 0.5\n",
                                    "scaling_constants:\n  celebahq: 0.5  # measured\n"])
def test_update_yaml_value_finds_a_section_header_with_a_comment(tmp_path, header):
    """A comment after `scaling_constants:` made the writer add a second section, and every script then refused
    the file (a key given twice)."""
    path = tmp_path / "ldm.yaml"
    path.write_text("vae:\n  latent_channels: 4\n" + header)
    update_yaml_value(path, "scaling_constants", "shapes", 0.25)
    assert load_model_config(path).scaling_constants == {"celebahq": 0.5, "shapes": 0.25}


def test_update_yaml_value_refuses_a_flow_style_section_and_leaves_the_file_alone(tmp_path):
    path = tmp_path / "ldm.yaml"
    path.write_text("scaling_constants: {celebahq: 0.5}\n")
    with pytest.raises(ConfigError, match="flow style"):
        update_yaml_value(path, "scaling_constants", "shapes", 0.25)
    assert path.read_text() == "scaling_constants: {celebahq: 0.5}\n" and list(tmp_path.iterdir()) == [path]


def test_zero_intervals_mean_never_and_load(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("checkpoint_iterations: 0\nval_generation_freq: 0\nlog_every: 3\ndisc_adam_beta2: 0.99\n")
    cfg = load_config(path, Stage1TrainConfig)
    assert (cfg.checkpoint_iterations, cfg.val_generation_freq, cfg.log_every, cfg.disc_adam_beta2) == (0, 0, 3, 0.99)
    from src.training.setup import every

    assert not any(every(step, 0) for step in range(1, 10)) and [s for s in range(1, 10) if every(s, 3)] == [3, 6, 9]


@pytest.mark.parametrize("section", ["vae", "unet"])
def test_an_even_up_down_kernel_is_rejected_at_load(tmp_path, section):
    """Padding k // 2 keeps sizes only for odd kernels: an even one made the UNet fail deep in its forward pass and
    the VAE return 17x17 reconstructions of 16x16 images."""
    path = tmp_path / "ldm.yaml"
    path.write_text(f"{section}:\n  {section}_up_down_kernel_size: 4\n")
    with pytest.raises(ConfigError, match=f"key '{section}_up_down_kernel_size' must be odd"):
        load_model_config(path)
    path.write_text(f"{section}:\n  {section}_up_down_kernel_size: 5\n")
    assert getattr(getattr(load_model_config(path), section), f"{section}_up_down_kernel_size") == 5


@pytest.mark.parametrize("text,fragment", [
    ("codebook_size: 0", "key 'codebook_size' must be >= 1, got 0"),
    ("vq_embed_dim: 0", "key 'vq_embed_dim' must be >= 1, got 0"),
    ("commitment_beta: -0.25", "key 'commitment_beta' must be >= 0"),
    ("codebook_reset_steps: -1", "key 'codebook_reset_steps' must be >= 0"),
])
def test_unusable_vq_settings_are_rejected_at_load(tmp_path, text, fragment):
    """codebook_size 0 crashed building the model (ZeroDivisionError in the codebook's init); vq_embed_dim 0 built a
    model with 0-channel latents; a negative commitment_beta trained the encoder away from its codes, and a negative
    codebook_reset_steps switched re-seeding off, both without a word."""
    path = tmp_path / "ldm.yaml"
    path.write_text(f"vae:\n  quantize: true\n  {text}\n")
    with pytest.raises(ConfigError, match=fragment):
        load_model_config(path)
    path.write_text("vae:\n  codebook_size: 1\n  commitment_beta: 0.0\n  codebook_reset_steps: 0\n")
    vae = load_model_config(path).vae
    assert (vae.codebook_size, vae.commitment_beta, vae.codebook_reset_steps) == (1, 0.0, 0)


@pytest.mark.parametrize("section,text,fragment", [
    ("vae", "latent_channels: 0", "key 'latent_channels' must be >= 1"),
    ("vae", "img_size: -32", "key 'img_size' must be >= 1"),
    ("vae", "residual_layers_per_block: 0", "key 'residual_layers_per_block' must be >= 1"),
    ("vae", "groupnorm_groups: 0", "key 'groupnorm_groups' must be >= 1"),
    ("unet", "attention_head_dim: 0", "key 'attention_head_dim' must be >= 1"),
    ("unet", "num_classes: 0", "key 'num_classes' must be >= 1"),
    ("unet", "text_embed_dim: 0", "key 'text_embed_dim' must be >= 1"),
    ("unet", "dropout: 1.5", "key 'dropout' must be"),
    ("vae", "vae_channels_per_block: [128, 0]", "key 'vae_channels_per_block' must be >= 1, got 0"),
    ("vae", "vae_channels_per_block: []", "key 'vae_channels_per_block' must not be empty"),
    ("unet", "unet_channels_per_block: [320, -640, 1280, 1280]", "key 'unet_channels_per_block' must be >= 1"),
    ("unet", "down_block_types: [AttnDown, Attndown, AttnDown, Down]", r"'Attndown' is not one of \['AttnDown'"),
    ("unet", "mid_block_types: CrossAttnMid", "'CrossAttnMid' is not one of"),
    ("unet", "unet_channels_per_block: [32, 64]", r"up_block_types \(4\) need one entry per .* \(2\)"),
    ("vae", "img_size: 100", "img_size 100 is not divisible by the downsampling factor 8"),
    ("unet", "unet_channels_per_block: [224, 448, 896, 896]", r"\[224\] with attention do not split into"),
])
def test_unusable_model_sizes_are_rejected_at_load(tmp_path, section, text, fragment):
    """A 0-channel latent, a negative image size or no residual layer built a model without a word; groupnorm_groups
    0 crashed building it (ZeroDivisionError), attention_head_dim 0 or num_classes 0 in the UNet's constructor. So
    did a 0-wide level (ZeroDivisionError), no level (IndexError), and block types or an image size that don't fit
    the levels (a ValueError with a traceback when the trainer built the model, after loading everything else)."""
    path = tmp_path / "ldm.yaml"
    path.write_text(f"{section}:\n  {text}\n")
    with pytest.raises(ConfigError, match=fragment):
        load_model_config(path)


def test_a_key_given_twice_in_a_nested_section_is_rejected(tmp_path):
    path = tmp_path / "ldm.yaml"
    path.write_text("vae:\n  latent_channels: 4\n  latent_channels: 8\n")
    with pytest.raises(ConfigError, match="'latent_channels' is given twice"):
        load_model_config(path)


def test_bounds_hold_at_their_edges(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("learning_rate: 0.0\nrandom_flip_p: 1.0\nadam_beta1: 0.0\ncfg_dropout_prob: 1.0\nema_decay: 1.0\n")
    cfg = load_config(path, Stage2TrainConfig)
    assert (cfg.learning_rate, cfg.random_flip_p, cfg.adam_beta1, cfg.cfg_dropout_prob) == (0.0, 1.0, 0.0, 1.0)


@pytest.mark.parametrize("key,cls", [("lr_scheduler", Stage2TrainConfig), ("disc_lr_scheduler", Stage1TrainConfig)])
def test_a_misspelt_lr_scheduler_stops_at_load_naming_file_and_key(tmp_path, key, cls):
    """A schedule name used to be checked only when the optimiser was built, after the models, with an error
    naming neither the file nor the key."""
    path = tmp_path / "train.yaml"
    path.write_text(f"{key}: cosin\n")
    with pytest.raises(ConfigError, match=rf"{path}: key '{key}': 'cosin' is not one of \[.*'cosine'"):
        load_config(path, cls)


def test_every_lr_scheduler_the_config_accepts_builds_a_schedule():
    import typing

    from src.config import LRScheduler
    from src.training.optim import schedule_factors

    for name in typing.get_args(LRScheduler):
        factors = schedule_factors(name, warmup_steps=2, total_steps=10)
        assert len(factors) == 11 and all(0.0 <= f <= 1.0 for f in factors), name
