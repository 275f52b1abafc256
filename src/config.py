"""Typed configuration: one dataclass per YAML section, strict loading.

Every key in a YAML file maps to a dataclass field. Loading rejects a key the code does not know (naming the
file, the key and the closest valid key) and a value of the wrong type, before any model is built.

    model_cfg = load_model_config("configs/ldm.yaml")           # ModelConfig(vae=..., unet=..., scaling_constants=...)
    train_cfg = load_config("configs/stage1_vae_train.yaml", Stage1TrainConfig)

Configs travel inside checkpoints as JSON (`to_dict` / `from_dict`), so a model can be rebuilt from its file.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration file or dict that does not match its schema."""


# --------------------------------------------------------------------------------------------------------------
# Value checks shared by the sections below (from_dict applies them at load)
# --------------------------------------------------------------------------------------------------------------


def bounded(default: Any, min: Any = None, max: Any = None, below: Any = None, odd: bool = False) -> Any:
    """A field whose YAML value must lie in [min, max] (or below `below`, exclusive), and be odd if `odd`;
    checked at load."""
    bounds = {k: v for k, v in (("min", min), ("max", max), ("below", below)) if v is not None}
    return field(default=default, metadata={**bounds, "odd": True} if odd else bounds)


def bounded_list(default_factory: Any, **bounds: Any) -> Any:
    """A list field that must not be empty and whose every entry lies within `bounds` (as `bounded`); checked at
    load."""
    return field(default_factory=default_factory, metadata={**bounds, "nonempty": True})


# the transformers.get_scheduler names that are a function of the step alone (src/training/optim.py builds a table
# of their factors); the others need extra arguments or a metric
LRScheduler = Literal[
    "constant_with_warmup", "constant", "linear", "cosine", "cosine_with_restarts", "polynomial", "inverse_sqrt"
]
COUNT = dict(min=1)  # a batch size, a number of steps or images: at least one
NONNEGATIVE = dict(min=0)
PROBABILITY = dict(min=0.0, max=1.0)
ADAM_BETA = dict(min=0.0, below=1.0)
KERNEL = dict(min=1, odd=True)  # padding k // 2 keeps H x factor / H / factor only for odd kernels


# --------------------------------------------------------------------------------------------------------------
# Model configuration (configs/ldm.yaml)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class VAEConfig:
    """The autoencoder (`vae:` section of ldm.yaml). Blocks mirror diffusers' AutoencoderKL / VQModel."""

    img_size: int = bounded(256, **COUNT)
    in_channels: int = bounded(3, **COUNT)
    out_channels: int = bounded(3, **COUNT)
    latent_channels: int = bounded(4, **COUNT)
    residual_layers_per_block: int = bounded(2, **COUNT)
    attention_layers: int = bounded(1, **NONNEGATIVE)  # self-attention layers in the encoder's and decoder's mid block
    attention_residual_connections: bool = True
    post_encoder_latent_proj: bool = True  # 1x1 conv after the encoder ("quant_conv")
    pre_decoder_latent_proj: bool = True  # 1x1 conv before the decoder ("post_quant_conv")
    vae_channels_per_block: list[int] = bounded_list(lambda: [128, 256, 512, 512], **COUNT)
    vae_up_down_factor: int = bounded(2, **COUNT)
    vae_up_down_kernel_size: int = bounded(3, **KERNEL)
    groupnorm_groups: int = bounded(32, **COUNT)
    norm_eps: float = bounded(1e-6, **NONNEGATIVE)
    # VQ-VAE
    quantize: bool = False
    codebook_size: int = bounded(16384, **COUNT)
    vq_embed_dim: int = bounded(4, **COUNT)
    commitment_beta: float = bounded(0.25, **NONNEGATIVE)
    # a code unused for this many training forward passes (micro-batches) is re-seeded from encoder outputs; 0: never
    codebook_reset_steps: int = bounded(1000, **NONNEGATIVE)

    @property
    def downsample_factor(self) -> int:
        return self.vae_up_down_factor ** (len(self.vae_channels_per_block) - 1)

    @property
    def latent_size(self) -> int:
        return self.img_size // self.downsample_factor

    @property
    def latent_dim(self) -> int:
        """Channels of the latent that stage 2 diffuses."""
        return self.vq_embed_dim if self.quantize else self.latent_channels

    def check(self, source: str = "vae") -> None:
        """What the keys allow one by one but not together: the image must halve evenly at every level."""
        if self.img_size % self.downsample_factor:
            raise ConfigError(
                f"{source}: img_size {self.img_size} is not divisible by the downsampling factor "
                f"{self.downsample_factor} (vae_up_down_factor ** (len(vae_channels_per_block) - 1))"
            )


@dataclass
class UNetConfig:
    """The latent denoiser (`unet:` section of ldm.yaml). Blocks mirror diffusers' UNet2DConditionModel."""

    down_block_types: list[Literal["AttnDown", "Down"]] = field(
        default_factory=lambda: ["AttnDown", "AttnDown", "AttnDown", "Down"])
    mid_block_types: Literal["AttnMid", "Mid"] = "AttnMid"
    up_block_types: list[Literal["AttnUp", "Up"]] = field(default_factory=lambda: ["Up", "AttnUp", "AttnUp", "AttnUp"])
    unet_channels_per_block: list[int] = bounded_list(lambda: [320, 640, 1280, 1280], **COUNT)
    unet_residual_layers_per_block: int = bounded(2, **COUNT)
    unet_up_down_factor: int = bounded(2, **COUNT)
    unet_up_down_kernel_size: int = bounded(3, **KERNEL)
    transformer_blocks_per_layer: int = bounded(1, **COUNT)
    transformer_dim_mult: int = bounded(4, **COUNT)
    attention_bias: bool = False
    attention_head_dim: int = bounded(64, **COUNT)  # width of ONE head; heads = channels // attention_head_dim
    time_embed_start_dim: int = bounded(320, **COUNT)
    time_embed_proj_dim: int = bounded(1280, **COUNT)
    time_embed_requires_grad: bool = False
    text_conditioning_hf_model: str = "openai/clip-vit-large-patch14"
    text_embed_dim: int = bounded(768, **COUNT)
    class_conditioning: bool = False
    class_embed_dim: int = bounded(1280, **COUNT)
    num_classes: int = bounded(1000, **COUNT)
    pre_encoded_text: bool = False
    groupnorm_groups: int = bounded(32, **COUNT)
    norm_eps: float = bounded(1e-5, **NONNEGATIVE)
    dropout: float = bounded(0.0, min=0.0, below=1.0)  # in the ResNet blocks (LDM's and diffusers' dropout)
    gradient_checkpointing: bool = False

    def check(self, source: str = "unet") -> None:
        """What the keys allow one by one but not together: one block type per level, and heads of equal width
        (max(1, channels // attention_head_dim) of them) at every level with attention."""
        channels = self.unet_channels_per_block
        levels = len(channels)
        if len(self.down_block_types) != levels or len(self.up_block_types) != levels:
            raise ConfigError(
                f"{source}: down_block_types ({len(self.down_block_types)}) and up_block_types "
                f"({len(self.up_block_types)}) need one entry per unet_channels_per_block entry ({levels})"
            )
        attention = ({i for i, t in enumerate(self.down_block_types) if t == "AttnDown"}
                     | {levels - 1 - i for i, t in enumerate(self.up_block_types) if t == "AttnUp"}
                     | ({levels - 1} if self.mid_block_types == "AttnMid" else set()))
        heads = [max(1, c // self.attention_head_dim) for c in channels]
        uneven = [channels[i] for i in sorted(attention) if channels[i] % heads[i]]
        if uneven:
            raise ConfigError(f"{source}: unet_channels_per_block {uneven} with attention do not split into "
                              f"channels // attention_head_dim ({self.attention_head_dim}) heads of equal width")


@dataclass
class ModelConfig:
    """configs/ldm.yaml as a whole."""

    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    scaling_constants: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# Training configuration (configs/stage*_train*.yaml)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Keys shared by both training stages: optimisation, checkpoints, validation and data."""

    # optimisation
    learning_rate: float = bounded(5e-5, **NONNEGATIVE)
    lr_scheduler: LRScheduler = "constant_with_warmup"  # a transformers.get_scheduler name (LRScheduler)
    lr_warmup_steps: int = bounded(1500, **NONNEGATIVE)
    total_training_iterations: int = bounded(400000, **COUNT)
    per_gpu_batch_size: int = bounded(12, **COUNT)
    gradient_accumulation_steps: int = bounded(1, **COUNT)
    max_grad_norm: float = 1.0
    adam_beta1: float = bounded(0.9, **ADAM_BETA)
    adam_beta2: float = bounded(0.999, **ADAM_BETA)
    adam_epsilon: float = bounded(1e-8, **NONNEGATIVE)
    # AdamW's decoupled decay; never applied to biases, norms and embeddings
    weight_decay: float = bounded(0.005, **NONNEGATIVE)
    seed: int = 0
    max_nonfinite_steps: int = bounded(5, **COUNT)  # this many skipped steps in a row stop the run
    # logging, checkpoints and validation
    log_every: int = bounded(10, **COUNT)  # metrics are read from the device every this many steps
    checkpoint_iterations: int = bounded(5000, **NONNEGATIVE)  # 0: only at the end and on a stop signal
    checkpoints_total_limit: int = bounded(3, **NONNEGATIVE)  # newest checkpoint_N kept; 0 keeps all
    num_val_random_samples: int = bounded(8, **COUNT)
    val_generation_freq: int = bounded(250, **NONNEGATIVE)  # 0: never
    # data
    num_workers: int = bounded(4, **NONNEGATIVE)
    pin_memory: bool = True
    random_flip_p: float = bounded(0.5, **PROBABILITY)
    interpolation: Literal["bilinear", "bicubic", "lanczos", "nearest"] = "bicubic"
    shapes_num_images: int = bounded(50000, **COUNT)  # size of the built-in `shapes` dataset (ignored by file datasets)
    # speed (src/training/performance.py); none of these changes what is computed beyond rounding
    compile: bool = False  # torch.compile the networks the step trains (stage 1 also its LPIPS)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    compile_cache: bool = True  # compiled kernels kept in working_directory/compile_cache: a resumed run reuses them
    channels_last: bool = False  # NHWC memory format for convolutions and their inputs
    allow_tf32: bool = True  # CUDA: TF32 tensor cores for fp32 matmuls and convolutions (cudnn.benchmark is always on)
    # the SDPA kernel the step's attention tries first (the others follow where it cannot run); auto: SDPA's choice
    attention_backend: Literal["auto", "cudnn", "flash", "efficient", "math"] = "auto"


@dataclass
class Stage1TrainConfig(TrainConfig):
    """Autoencoder training: reconstruction + LPIPS + KL/VQ + PatchGAN."""

    quantize: Optional[bool] = None  # overrides ldm.yaml's vae.quantize when set (the VQ-VAE config sets True)
    reconstruction_loss_fn: Literal["l1", "l2"] = "l1"
    kl_weight: float = bounded(1e-6, **NONNEGATIVE)
    codebook_weight: float = bounded(1.0, **NONNEGATIVE)
    # perceptual loss
    use_lpips: bool = True
    use_lpips_package: bool = False
    lpips_checkpoint: Optional[str] = None
    lpips_weight: float = bounded(0.5, **NONNEGATIVE)
    # PatchGAN discriminator
    use_patchgan: bool = True
    disc_start_dim: int = bounded(64, **COUNT)
    disc_depth: int = bounded(3, **COUNT)
    disc_kernel_size: int = bounded(4, **COUNT)
    disc_leaky_relu: float = bounded(0.2, **NONNEGATIVE)
    disc_learning_rate: float = bounded(5e-5, **NONNEGATIVE)
    # taming-transformers / LDM train the PatchGAN with Adam(0.5, 0.9), no decay
    disc_adam_beta1: float = bounded(0.5, **ADAM_BETA)
    disc_adam_beta2: float = bounded(0.9, **ADAM_BETA)
    disc_weight_decay: float = bounded(0.0, **NONNEGATIVE)
    disc_lr_scheduler: LRScheduler = "constant_with_warmup"
    disc_lr_warmup_steps: int = bounded(500, **NONNEGATIVE)
    disc_start: int = bounded(50000, **NONNEGATIVE)
    disc_weight: float = bounded(0.5, **NONNEGATIVE)
    disc_loss: Literal["hinge", "vanilla"] = "hinge"


@dataclass
class Stage2TrainConfig(TrainConfig):
    """Latent diffusion training."""

    learning_rate: float = bounded(1e-4, **NONNEGATIVE)
    per_gpu_batch_size: int = bounded(16, **COUNT)
    loss_fn: Literal["mse", "l1", "huber"] = "mse"
    num_diffusion_timesteps: int = bounded(1000, **COUNT)
    beta_schedule: Literal["linear", "scaled_linear", "cosine"] = "linear"
    beta_start: float = bounded(1e-4, **PROBABILITY)
    beta_end: float = bounded(0.02, **PROBABILITY)
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    rescale_betas_zero_snr: bool = False  # zero terminal SNR (Lin et al. 2024); needs v_prediction
    snr_gamma: Optional[float] = bounded(None, **NONNEGATIVE)  # min-SNR-gamma weights (Hang et al. 2023); null: uniform
    noise_offset: float = bounded(0.0, **NONNEGATIVE)  # offset noise (Guttenberg 2023); 0 = plain N(0, I)
    cfg_dropout_prob: float = bounded(0.1, **PROBABILITY)
    pre_encoded_text: Optional[bool] = None  # overrides ldm.yaml's unet.pre_encoded_text when set
    ema_decay: float = bounded(0.9999, **PROBABILITY)
    ema_warmup: bool = True  # decay ramps as min(ema_decay, (1 + n) / (10 + n))
    ema_update_every: int = bounded(1, **COUNT)  # the shadow moves every this many steps (ema.py)
    val_sampler: Literal["ddim", "dpmpp_2m", "ddpm"] = "ddim"
    val_sampler_steps: int = bounded(50, **COUNT)
    val_guidance_scale: float = 4.0
    val_guidance_rescale: float = bounded(0.0, **PROBABILITY)  # Lin et al. 2024 eq. 15-16; 0: plain guidance
    # periodic FID / KID of EMA samples against the training images (src/training/periodic_fid.py)
    fid_num_samples: int = bounded(0, **NONNEGATIVE)  # samples (and reference images) per evaluation; 0 = off
    fid_eval_freq: int = bounded(0, **NONNEGATIVE)  # every this many steps; 0 = off
    fid_inception_weights: Optional[str] = None  # the FID Inception file; None: $TORCH_HOME/hub/checkpoints


# --------------------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------------------


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    return match[0] if match else "?"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, returning it (ints widen to float; '5e-5' strings become float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: must not be null")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_coerce(k, args[0], where): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of keys, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got bool {value!r}")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "5e-5" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported annotation {_type_name(tp)}")


def from_dict(cls: type, data: dict, source: str = "<dict>") -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types. `source` names the origin."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(
                f"{source}: unknown key '{key}' (closest valid key: '{_closest(str(key), names)}')"
            )
        kwargs[key] = _coerce(value, hints[key], f"{source}: key '{key}'")
        _check_bounds(cls, key, kwargs[key], source)
    cfg = cls(**kwargs)
    if hasattr(cfg, "check"):  # keys that are valid alone but not together
        cfg.check(source)
    return cfg


def _check_bounds(cls: type, key: str, value: Any, source: str) -> None:
    """Fields declared with `bounded` reject values outside them (a negative interval, a zero batch size)."""
    bounds = next(f.metadata for f in dataclasses.fields(cls) if f.name == key)
    if value is None or not bounds:
        return
    if isinstance(value, list):  # bounded_list: every entry
        if not value and bounds.get("nonempty"):
            raise ConfigError(f"{source}: key '{key}' must not be empty")
        for entry in value:
            _check_bounds(cls, key, entry, source)
        return
    if "min" in bounds and value < bounds["min"]:
        raise ConfigError(f"{source}: key '{key}' must be >= {bounds['min']}, got {value!r}")
    if "max" in bounds and value > bounds["max"]:
        raise ConfigError(f"{source}: key '{key}' must be <= {bounds['max']}, got {value!r}")
    if "below" in bounds and value >= bounds["below"]:
        raise ConfigError(f"{source}: key '{key}' must be < {bounds['below']}, got {value!r}")
    if bounds.get("odd") and value % 2 == 0:
        raise ConfigError(f"{source}: key '{key}' must be odd (same-size padding), got {value!r}")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _check_unique_keys(node, source: str) -> None:
    """A key given twice in one mapping of the YAML node tree is an error: PyYAML keeps the last value silently,
    so an edited copy of a key would otherwise win without a word. (`<<: *anchor` merges override on purpose.)"""
    if isinstance(node, yaml.MappingNode):
        seen: dict = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    first, again = seen[key_node.value] + 1, key_node.start_mark.line + 1
                    raise ConfigError(f"{source}: key '{key_node.value}' is given twice (lines {first} and {again}); "
                                      "keep one")
                seen[key_node.value] = key_node.start_mark.line
            _check_unique_keys(value_node, source)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_unique_keys(item, source)


def read_yaml(path: str | Path) -> dict:
    """A YAML file's contents, read with yaml.safe_load (no Python objects), every key given once."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    _check_unique_keys(yaml.compose(text, Loader=yaml.SafeLoader), str(path))
    return yaml.safe_load(text) or {}


def load_config(path: str | Path, cls: type) -> Any:
    """Load a flat YAML file into dataclass `cls` (training configs)."""
    return from_dict(cls, read_yaml(path), str(path))


def load_model_config(path: str | Path) -> ModelConfig:
    """Load configs/ldm.yaml: sections `vae`, `unet` and `scaling_constants`."""
    return from_dict(ModelConfig, read_yaml(path), str(path))


def update_yaml_value(path: str | Path, section: str, key: str, value: float) -> None:
    """Set `section.key: value` in a YAML file, rewriting only that line (comments and order stay as they are).

    The section is appended when missing; the key is appended to the section when missing.
    """
    path = Path(path)
    lines = path.read_text().splitlines(keepends=True)
    rendered = f"{value:.7g}" if isinstance(value, float) else str(value)
    header = re.compile(rf"^{re.escape(section)}\s*:\s*(#.*)?$")
    sec_idx = next((i for i, ln in enumerate(lines) if header.match(ln.rstrip())), None)
    if sec_idx is None and any(re.match(rf"^{re.escape(section)}\s*:", ln) for ln in lines):
        raise ConfigError(f"{path}: '{section}:' is written in flow style on one line; write it as a block "
                          f"(one '  key: value' per line) so that {section}.{key} can be updated")
    if sec_idx is None:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines += [f"{section}:\n", f"  {key}: {rendered}\n"]
    else:
        end = len(lines)
        indent = "  "
        for i in range(sec_idx + 1, len(lines)):
            ln = lines[i]
            if ln.strip() and not ln.startswith((" ", "\t", "#")):
                end = i
                break
        for i in range(sec_idx + 1, end):
            stripped = lines[i].lstrip()
            if stripped.startswith(f"{key}:"):
                indent = lines[i][: len(lines[i]) - len(stripped)]
                comment = ""
                if "#" in stripped:
                    comment = "  " + stripped[stripped.index("#"):].rstrip("\n")
                lines[i] = f"{indent}{key}: {rendered}{comment}\n"
                break
            if stripped and not stripped.startswith("#"):
                indent = lines[i][: len(lines[i]) - len(stripped)]
        else:
            insert_at = end
            while insert_at > sec_idx + 1 and not lines[insert_at - 1].strip():
                insert_at -= 1
            lines.insert(insert_at, f"{indent}{key}: {rendered}\n")
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(lines))
    try:  # the rewrite must read back with the new value, or the original stays as it was
        written = read_yaml(tmp).get(section) or {}
        if not isinstance(written, dict) or written.get(key) != yaml.safe_load(rendered):
            raise ConfigError(f"{path}: could not set {section}.{key} by rewriting one line; set it by hand")
    except (ConfigError, yaml.YAMLError):
        tmp.unlink()
        raise
    tmp.replace(path)
