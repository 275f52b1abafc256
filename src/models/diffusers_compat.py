"""Our models <-> diffusers' AutoencoderKL, UNet2DConditionModel and DDIMScheduler: keys, configs and folders.

    vae, scaling = load_vae_backbone("sd/vae")                    # a diffusers folder or our stage-1 file
    unet, conditioning = unet_from_diffusers("sd/unet")            # ours, from a diffusers folder
    write_diffusers_model(folder, "AutoencoderKL", vae_config_to_diffusers(cfg, 0.18215), vae_state_to_diffusers(sd))
    scheduler_config_from_process(process.to_dict())             # DDIMScheduler config of the same schedule

This is the one module that knows diffusers' names. Our blocks mirror diffusers' parameter for parameter, so the
weights only change names:

    autoencoder   mid_block.attentions.N.attn.to_q  <->  mid_block.attentions.N.to_q      (also to_k, to_v)
                  ...attn.to_out.weight             <->  ...to_out.0.weight
    UNet          ...to_out.weight                  <->  ...to_out.0.weight
                  proj_in / proj_out (linear)        <-   1x1 conv weights (use_linear_projection=False) squeezed

What has no diffusers counterpart is handled exactly or refused:
- the learned null text token travels beside the pipeline (NULL_TEXT_FILE), not inside the UNet;
- class_embedding_proj is folded into the class embedding table (a linear map of an embedding is an embedding);
- our unconditional / class-conditional Transformer2D blocks have no cross-attention, which UNet2DConditionModel
  always has: it is exported with every weight zero (it then adds exactly 0), and dropped on import only when its
  output projection is zero;
- likewise a VAE mid block without attention: ours then has one resnet, AutoencoderKL's
  (mid_block_add_attention=False) two; the second is exported as the identity (conv2 zero, so it adds exactly 0)
  and dropped on import only when it is one;
- anything else (a VQ model, other block types, learnable time frequencies, a per-level head count our single
  head width can't express, ...) raises DiffusersFormatError naming the key.
Files are read with safetensors only; diffusers itself is not needed to convert.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..config import UNetConfig, VAEConfig
from .unet import BasicTransformerBlock, UNet, build_unet
from .vae import Autoencoder, build_autoencoder, load_autoencoder

DIFFUSERS_VERSION = "0.42.1"  # the diffusers release these mappings are checked against (tests load the output)
CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
NULL_TEXT_FILE = "null_text_embeds.safetensors"  # beside model_index.json: {"null_text_embeds": (1, 1, D)}
NULL_TEXT_KEY = "null_text_embeds"
ZEROED_CROSS_ATTENTION_DIM = 1  # width of the all-zero cross-attention of exported unconditional / class UNets

UNET_BLOCKS = {"AttnDown": "CrossAttnDownBlock2D", "Down": "DownBlock2D", "AttnUp": "CrossAttnUpBlock2D",
               "Up": "UpBlock2D", "AttnMid": "UNetMidBlock2DCrossAttn"}
# UNetConfig fields a converted UNet decides; the rest (text model, dropout, checkpointing, ...) are training choices
UNET_ARCHITECTURE = ("down_block_types", "mid_block_types", "up_block_types", "unet_channels_per_block",
                     "unet_residual_layers_per_block", "unet_up_down_factor", "unet_up_down_kernel_size",
                     "transformer_blocks_per_layer", "transformer_dim_mult", "attention_bias", "attention_head_dim",
                     "time_embed_start_dim", "time_embed_proj_dim", "time_embed_requires_grad", "groupnorm_groups",
                     "norm_eps")
UNET_TEXT_ARCHITECTURE = ("text_embed_dim",)
UNET_CLASS_ARCHITECTURE = ("class_embed_dim", "num_classes")


class DiffusersFormatError(ValueError):
    """A model that is not a diffusers model, or one whose layout has no counterpart here (or in diffusers)."""


# --------------------------------------------------------------------------------------------------------------
# Folders and files
# --------------------------------------------------------------------------------------------------------------


def is_diffusers_model(path) -> bool:
    """A folder holding config.json, model_index.json or unet/ or vae/ with a config.json (an export), or a
    .safetensors file with config.json beside it and without our own format tag."""
    path = Path(path)
    if path.is_dir():
        markers = (CONFIG_NAME, "model_index.json", f"unet/{CONFIG_NAME}", f"vae/{CONFIG_NAME}")
        return any((path / m).is_file() for m in markers)
    if path.is_file() and path.suffix == ".safetensors" and (path.parent / CONFIG_NAME).is_file():
        with safe_open(str(path), framework="pt") as f:
            return "ldm-toolkit" not in str((f.metadata() or {}).get("format", ""))
    return False


def diffusers_files(path, subfolder: str) -> tuple[dict, Path]:
    """(config dict, weights file) of a diffusers model: its folder, its .safetensors file beside config.json, or
    a pipeline folder (model_index.json) whose `subfolder` ("vae", "unet") holds it."""
    path = Path(path)
    if path.is_dir() and not (path / CONFIG_NAME).is_file() and (path / subfolder / CONFIG_NAME).is_file():
        path = path / subfolder
    folder = path if path.is_dir() else path.parent
    hint = (f"expected a diffusers model folder with {CONFIG_NAME} and {WEIGHTS_NAMES[0]} (e.g. the {subfolder}/ "
            f"folder of a Stable Diffusion download) or that .safetensors file beside its {CONFIG_NAME}; or this "
            "toolkit's own model.safetensors file")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: {hint}")
    if (folder / "state.json").is_file():  # a trainer's checkpoint_N/ folder (src/training/checkpoint.py)
        raise DiffusersFormatError(f"{path} is a training checkpoint folder, not a model: pass the run's "
                                   f"model.safetensors ({folder.parent / 'model.safetensors'}), which the trainer "
                                   "writes at the end; a checkpoint resumes with --resume_from_checkpoint")
    if not (folder / CONFIG_NAME).is_file():
        raise DiffusersFormatError(f"{path} is not a diffusers model: no {CONFIG_NAME} in {folder}; {hint}")
    config = json.loads((folder / CONFIG_NAME).read_text())
    if path.is_file():
        if path.suffix != ".safetensors":
            raise DiffusersFormatError(f"{path}: only .safetensors weights are read (pickled files are not loaded)")
        return config, path
    for name in WEIGHTS_NAMES:
        if (folder / name).is_file():
            return config, folder / name
    found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".ckpt", ".pt", ".safetensors"))
    raise DiffusersFormatError(
        f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAMES[0]}"
        + (f" (found {', '.join(found)}; only safetensors are read, pickled weights are not loaded)" if found else "")
    )


def read_weights(path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, as float32 (fp16 / bf16 downloads included)."""
    return {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(path)).items()}


def write_diffusers_model(folder, class_name: str, config: dict, state: dict[str, torch.Tensor]) -> Path:
    """folder/config.json (with _class_name) and folder/diffusion_pytorch_model.safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    full = {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION, **config}
    (folder / CONFIG_NAME).write_text(json.dumps(full, indent=2) + "\n")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / WEIGHTS_NAMES[0]),
              metadata={"format": "pt"})
    return folder


def _check_class(config: dict, expected: str, path) -> None:
    name = config.get("_class_name")
    if name == expected:
        return
    if name == "VQModel":
        raise DiffusersFormatError(
            f"{path} is a diffusers VQModel: only KL autoencoders (AutoencoderKL) are converted, as no diffusers "
            "pipeline drives a VQ latent diffusion model like ours"
        )
    raise DiffusersFormatError(f"{path} holds a diffusers {name or 'model of unknown class'}, expected {expected}")


def _check_keys(config: dict, expected: dict[str, Any], known: set[str], path, what: str) -> None:
    """Every key in `expected` must hold that value (or be absent); keys not known to the converter must be unset."""
    for key, value in expected.items():
        if key in config and config[key] != value and not (isinstance(value, tuple) and config[key] in value):
            allowed = " or ".join(map(repr, value)) if isinstance(value, tuple) else repr(value)
            raise DiffusersFormatError(
                f"{path}: {what} with {key}={config[key]!r} can't be expressed here (supported: {allowed})"
            )
    for key, value in config.items():
        if not key.startswith("_") and key not in known and key not in expected and value not in (None, False):
            raise DiffusersFormatError(f"{path}: {what} config key {key}={value!r} is not understood by this converter")


def _uniform(value, key: str, path) -> Any:
    """An int, or a list / tuple whose entries are all equal (we have one value for every level)."""
    if isinstance(value, (list, tuple)):
        if len(set(map(json.dumps, value))) != 1:
            raise DiffusersFormatError(f"{path}: {key}={list(value)} differs per level; this toolkit has one value")
        return value[0]
    return value


def _load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], path, optional=()) -> None:
    """load_state_dict with an error naming the keys and shapes that disagree (channel mismatches)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and k not in optional]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} here"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"missing {missing[:4]}" if missing else "", f"unexpected {unexpected[:4]}" if unexpected else "",
                 f"shape mismatch {shapes[:4]}" if shapes else ""]
        raise DiffusersFormatError(
            f"{path}: the weights do not match the model its config describes ({'; '.join(p for p in parts if p)})"
        )
    module.load_state_dict(state, strict=not optional)


# --------------------------------------------------------------------------------------------------------------
# Autoencoder (AutoencoderKL)
# --------------------------------------------------------------------------------------------------------------

_VAE_KNOWN = {"in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
              "layers_per_block", "latent_channels", "norm_num_groups", "sample_size", "scaling_factor",
              "force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"}
_VAE_MID_ATTN = re.compile(r"^((?:en|de)coder\.mid_block\.attentions\.\d+\.)")
_VAE_PARTS = ("encoder", "decoder")
_DEPRECATED_ATTN = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.", "proj_attn.": "to_out.0."}


def vae_config_from_diffusers(config: dict, img_size: Optional[int] = None, path="config") -> VAEConfig:
    """Our VAEConfig for an AutoencoderKL config. `img_size` overrides its sample_size (only a default there)."""
    _check_class(config, "AutoencoderKL", path)
    channels = list(config.get("block_out_channels", [64]))
    n = len(channels)
    _check_keys(config, {"act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None,
                         "down_block_types": (["DownEncoderBlock2D"] * n, ("DownEncoderBlock2D",) * n),
                         "up_block_types": (["UpDecoderBlock2D"] * n, ("UpDecoderBlock2D",) * n)},
                _VAE_KNOWN, path, "AutoencoderKL")
    return VAEConfig(
        img_size=int(img_size or config.get("sample_size", 32)),
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        latent_channels=config.get("latent_channels", 4),
        residual_layers_per_block=config.get("layers_per_block", 1),
        attention_layers=1 if config.get("mid_block_add_attention", True) else 0,
        attention_residual_connections=True,
        post_encoder_latent_proj=config.get("use_quant_conv", True),
        pre_decoder_latent_proj=config.get("use_post_quant_conv", True),
        vae_channels_per_block=channels,
        vae_up_down_factor=2,
        vae_up_down_kernel_size=3,
        groupnorm_groups=config.get("norm_num_groups", 32),
        norm_eps=1e-6,  # fixed in diffusers' Encoder / Decoder
        quantize=False,
    )


def vae_config_to_diffusers(cfg: VAEConfig, scaling_factor: float) -> dict:
    """AutoencoderKL config of our VAE; refuses what AutoencoderKL can't hold."""
    if cfg.quantize:
        raise DiffusersFormatError("a VQ autoencoder (quantize: True) has no diffusers pipeline for latent diffusion; "
                                   "only KL autoencoders are exported")
    fixed = {"vae_up_down_factor": 2, "vae_up_down_kernel_size": 3, "norm_eps": 1e-6,
             "attention_residual_connections": True}
    for key, value in fixed.items():
        if getattr(cfg, key) != value:
            raise DiffusersFormatError(f"vae.{key}: {getattr(cfg, key)} has no AutoencoderKL counterpart "
                                       f"(it fixes {value})")
    if cfg.attention_layers not in (0, 1):
        raise DiffusersFormatError(f"vae.attention_layers: {cfg.attention_layers}; AutoencoderKL's mid block has one "
                                   "attention (or none, mid_block_add_attention=False), never more")
    _check_groups(cfg.vae_channels_per_block, cfg.groupnorm_groups, "vae")
    n = len(cfg.vae_channels_per_block)
    return {
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(cfg.vae_channels_per_block), "layers_per_block": cfg.residual_layers_per_block,
        "act_fn": "silu", "latent_channels": cfg.latent_channels, "norm_num_groups": cfg.groupnorm_groups,
        "sample_size": cfg.img_size, "scaling_factor": float(scaling_factor), "shift_factor": None,
        "latents_mean": None, "latents_std": None, "force_upcast": True, "use_quant_conv": cfg.post_encoder_latent_proj,
        "use_post_quant_conv": cfg.pre_decoder_latent_proj, "mid_block_add_attention": cfg.attention_layers == 1,
    }


def _check_groups(channels: list[int], groups: int, section: str) -> None:
    """diffusers uses one GroupNorm group count everywhere; ours clips it per layer when it doesn't divide."""
    bad = [c for c in channels if c % groups]
    if bad:
        raise DiffusersFormatError(f"{section}.groupnorm_groups {groups} does not divide the channels {bad}: "
                                   "diffusers needs one group count that divides every width")


def vae_state_from_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """AutoencoderKL keys -> ours (older files' query/key/value/proj_attn names and 1x1-conv shapes included)."""
    out = {}
    for key, value in state.items():
        match = _VAE_MID_ATTN.match(key)
        if match:
            rest = key[match.end():]
            for old, new in _DEPRECATED_ATTN.items():
                rest = new + rest[len(old):] if rest.startswith(old) else rest
            if not rest.startswith("group_norm."):
                rest = "attn." + rest.replace("to_out.0.", "to_out.")
                if value.dim() == 4:  # (C, C, 1, 1) conv-shaped projection
                    value = value[:, :, 0, 0]
            key = match.group(1) + rest
        out[key] = value
    return out


def vae_state_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our autoencoder keys -> AutoencoderKL's (plus an identity second mid resnet where ours has one only)."""
    out = {}
    for key, value in state.items():
        match = _VAE_MID_ATTN.match(key)
        if match and key[match.end():].startswith("attn."):
            key = match.group(1) + key[match.end() + len("attn."):].replace("to_out.", "to_out.0.")
        out[key] = value
    for part in _VAE_PARTS:
        if f"{part}.mid_block.resnets.0.conv1.weight" in out and f"{part}.mid_block.resnets.1.conv1.weight" not in out:
            out.update(_identity_resnet(out, f"{part}.mid_block.resnets."))
    return out


def _identity_resnet(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """resnets.1 shaped like resnets.0 that returns its input exactly: (x + conv2(...)) / 1 with conv2 all zero.
    Ours has no second mid resnet when attention_layers is 0; AutoencoderKL always has two."""
    first = {k[len(prefix) + 2:]: v for k, v in state.items() if k.startswith(prefix + "0.")}
    return {f"{prefix}1.{name}": torch.ones_like(v) if name.startswith("norm") and name.endswith("weight")
            else torch.zeros_like(v) for name, v in first.items()}


def _drop_identity_resnets(state: dict[str, torch.Tensor], path) -> dict[str, torch.Tensor]:
    """A mid_block_add_attention=False state without its second mid resnets, which must be the identity (our
    export's): our mid block without attention has one resnet and can't hold a second one."""
    prefixes = tuple(f"{part}.mid_block.resnets.1." for part in _VAE_PARTS)
    for prefix in prefixes:
        weight, bias = state.get(prefix + "conv2.weight"), state.get(prefix + "conv2.bias")
        if weight is None or bias is None or weight.any() or bias.any():
            raise DiffusersFormatError(
                f"{path}: an AutoencoderKL with mid_block_add_attention=False can't be converted: its mid block has "
                "two resnets, and this toolkit's mid block without attention (attention_layers: 0) has one (only an "
                f"export of ours converts, whose second resnet is the identity; {prefix}conv2 is not zero here)"
            )
    return {k: v for k, v in state.items() if not k.startswith(prefixes)}


def autoencoder_from_diffusers(path, img_size: Optional[int] = None) -> tuple[Autoencoder, float]:
    """(our autoencoder in eval mode, the config's scaling_factor) from a diffusers AutoencoderKL."""
    config, weights = diffusers_files(path, "vae")
    cfg = vae_config_from_diffusers(config, img_size, path)
    vae = build_autoencoder(cfg)
    state = vae_state_from_diffusers(read_weights(weights))
    if cfg.attention_layers == 0:
        state = _drop_identity_resnets(state, weights)
    _load_state(vae, state, weights)
    return vae.eval(), float(config.get("scaling_factor", 0.18215))


def diffusers_vae_scaling_factor(path) -> Optional[float]:
    """The scaling_factor in a diffusers VAE's config (no weights are read); None for our own model files."""
    if not is_diffusers_model(path):
        return None
    config, _ = diffusers_files(path, "vae")
    _check_class(config, "AutoencoderKL", path)
    return float(config.get("scaling_factor", 0.18215))


def load_vae_backbone(path, img_size: Optional[int] = None, device="cpu") -> tuple[Autoencoder, Optional[float]]:
    """(autoencoder, scaling factor of its config or None) from our stage-1/2 model.safetensors or a diffusers
    AutoencoderKL. A diffusers VAE encodes images of `img_size` (default: its config's sample_size)."""
    if is_diffusers_model(path) or Path(path).is_dir():  # a folder that isn't one gets the diffusers error
        vae, factor = autoencoder_from_diffusers(path, img_size)
        return vae.to(device), factor
    return load_autoencoder(path, device), None


# --------------------------------------------------------------------------------------------------------------
# UNet (UNet2DConditionModel)
# --------------------------------------------------------------------------------------------------------------

_UNET_KNOWN = {"sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types", "mid_block_type",
               "block_out_channels", "layers_per_block", "dropout", "norm_num_groups", "norm_eps",
               "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim", "use_linear_projection",
               "num_class_embeds", "upcast_attention", "time_embedding_dim", "only_cross_attention",
               "addition_embed_type_num_heads"}
_UNET_FIXED = {"center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
               "mid_block_scale_factor": 1, "act_fn": "silu", "num_attention_heads": None,
               "dual_cross_attention": False, "class_embed_type": None, "addition_embed_type": None,
               "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1,
               "time_embedding_type": "positional", "time_embedding_act_fn": None, "timestep_post_act": None,
               "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
               "class_embeddings_concat": False, "mid_block_only_cross_attention": (None, False),
               "cross_attention_norm": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
               "reverse_transformer_layers_per_block": None, "projection_class_embeddings_input_dim": None,
               "addition_time_embed_dim": None}


def _head_width(channels: list[int], heads: list[int], attention_levels: list[int], preferred: int, path) -> int:
    """A single head width that gives diffusers' head count at every attention level (ours: max(1, c // width)),
    `preferred` (the model config's) when it does, or an error. Widths in (c / (h + 1), c / h] give h heads at c
    channels, and any width (> c / 2) gives one, so e.g. heads [2, 5] over [160, 320] come from width 64, not 80."""
    if any(channels[i] % heads[i] for i in attention_levels):
        bad = [channels[i] for i in attention_levels if channels[i] % heads[i]]
        raise DiffusersFormatError(f"{path}: attention heads {heads} do not divide the channels {bad}")
    lo = max((channels[i] // (heads[i] + 1) + 1 for i in attention_levels), default=1)
    hi = min((channels[i] // heads[i] for i in attention_levels if heads[i] > 1), default=None)
    if hi is not None and lo > hi:
        raise DiffusersFormatError(
            f"{path}: attention heads {heads} over channels {channels} give head widths "
            f"{[channels[i] // heads[i] for i in attention_levels]}; this UNet uses one head width for all levels "
            "(unet.attention_head_dim), so that layout can't be expressed (Stable Diffusion 2.x's can, 1.x's can't)"
        )
    candidates = [preferred] + [channels[i] // heads[i] for i in attention_levels]
    return next((w for w in candidates if lo <= w and (hi is None or w <= hi)), lo)


def unet_config_from_diffusers(config: dict, base: UNetConfig, path="config") -> tuple[UNetConfig, int]:
    """(UNetConfig, latent channels): the architecture from a UNet2DConditionModel config, the training choices
    (text model, dropout, checkpointing, ...) from `base`."""
    _check_class(config, "UNet2DConditionModel", path)
    _check_keys(config, _UNET_FIXED, _UNET_KNOWN, path, "UNet2DConditionModel")
    if _uniform(config.get("only_cross_attention", False), "only_cross_attention", path):
        raise DiffusersFormatError(f"{path}: only_cross_attention=True (no self-attention) can't be expressed here")
    if config.get("in_channels", 4) != config.get("out_channels", 4):
        raise DiffusersFormatError(f"{path}: in_channels {config.get('in_channels')} != out_channels "
                                   f"{config.get('out_channels')}; this UNet predicts a tensor of its input's shape")
    channels = list(config.get("block_out_channels", (320, 640, 1280, 1280)))
    names = {v: k for k, v in UNET_BLOCKS.items()}
    kinds = {}
    for key, default in (("down_block_types", ()), ("up_block_types", ())):
        types = list(config.get(key, default))
        unknown = [t for t in types if t not in names or names[t] == "AttnMid"]
        if unknown or len(types) != len(channels):
            raise DiffusersFormatError(f"{path}: {key} {types} can't be expressed (supported: one of "
                                       f"{sorted(v for v in UNET_BLOCKS.values() if 'Mid' not in v)} per level)")
        kinds[key] = [names[t] for t in types]
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise DiffusersFormatError(f"{path}: mid_block_type {config.get('mid_block_type')!r} can't be expressed "
                                   "(supported: 'UNetMidBlock2DCrossAttn')")
    heads = config.get("attention_head_dim", 8)  # diffusers' historical name: the number of heads per level
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(channels)
    n = len(channels)
    attention_levels = sorted({i for i, k in enumerate(kinds["down_block_types"]) if k == "AttnDown"}
                              | {n - 1 - i for i, k in enumerate(kinds["up_block_types"]) if k == "AttnUp"} | {n - 1})
    cross = _uniform(config.get("cross_attention_dim", 1280), "cross_attention_dim", path)
    class_embeds = config.get("num_class_embeds")
    arch = dict(
        down_block_types=kinds["down_block_types"], mid_block_types="AttnMid", up_block_types=kinds["up_block_types"],
        unet_channels_per_block=channels,
        unet_residual_layers_per_block=_uniform(config.get("layers_per_block", 2), "layers_per_block", path),
        unet_up_down_factor=2, unet_up_down_kernel_size=3,
        transformer_blocks_per_layer=_uniform(config.get("transformer_layers_per_block", 1),
                                              "transformer_layers_per_block", path),
        transformer_dim_mult=4, attention_bias=False,
        attention_head_dim=_head_width(channels, heads, attention_levels, base.attention_head_dim, path),
        time_embed_start_dim=channels[0], time_embed_proj_dim=config.get("time_embedding_dim") or channels[0] * 4,
        time_embed_requires_grad=False,
        groupnorm_groups=config.get("norm_num_groups", 32), norm_eps=config.get("norm_eps", 1e-5),
        text_embed_dim=cross,
    )
    if class_embeds:
        arch.update(class_embed_dim=arch["time_embed_proj_dim"], num_classes=class_embeds - 1)
    return dataclasses.replace(base, **arch), config.get("in_channels", 4)


def unet_config_to_diffusers(unet: UNet, sample_size: int) -> dict:
    """UNet2DConditionModel config of our UNet (latents of sample_size x sample_size); refuses what it can't hold."""
    cfg = unet.config
    fixed = {"unet_up_down_factor": 2, "unet_up_down_kernel_size": 3, "transformer_dim_mult": 4,
             "attention_bias": False, "time_embed_requires_grad": False, "mid_block_types": "AttnMid"}
    for key, value in fixed.items():
        if getattr(cfg, key) != value:
            raise DiffusersFormatError(f"unet.{key}: {getattr(cfg, key)!r} has no UNet2DConditionModel counterpart "
                                       f"(it fixes {value!r})")
    channels = list(cfg.unet_channels_per_block)
    if cfg.time_embed_start_dim != channels[0]:
        raise DiffusersFormatError(f"unet.time_embed_start_dim {cfg.time_embed_start_dim} != unet_channels_per_block[0] "
                                   f"{channels[0]}: UNet2DConditionModel's time embedding has block_out_channels[0] "
                                   "dimensions")
    _check_groups(channels, cfg.groupnorm_groups, "unet")
    heads = [max(1, c // cfg.attention_head_dim) for c in channels]
    return {
        "sample_size": sample_size, "in_channels": unet.in_channels, "out_channels": unet.in_channels,
        "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
        "down_block_types": [UNET_BLOCKS[b] for b in cfg.down_block_types],
        "mid_block_type": UNET_BLOCKS[cfg.mid_block_types],
        "up_block_types": [UNET_BLOCKS[b] for b in cfg.up_block_types],
        "only_cross_attention": False, "block_out_channels": channels,
        "layers_per_block": cfg.unet_residual_layers_per_block, "downsample_padding": 1, "mid_block_scale_factor": 1,
        "dropout": cfg.dropout, "act_fn": "silu", "norm_num_groups": cfg.groupnorm_groups, "norm_eps": cfg.norm_eps,
        "cross_attention_dim": cfg.text_embed_dim if unet.conditioning == "text" else ZEROED_CROSS_ATTENTION_DIM,
        "transformer_layers_per_block": cfg.transformer_blocks_per_layer, "attention_head_dim": heads,
        "use_linear_projection": True, "upcast_attention": False,
        "num_class_embeds": cfg.num_classes + 1 if unet.conditioning == "class" else None,
        "class_embed_type": None, "resnet_time_scale_shift": "default", "time_embedding_type": "positional",
        "time_embedding_dim": cfg.time_embed_proj_dim,
    }


def _transformer_blocks(unet: UNet) -> list[tuple[str, BasicTransformerBlock]]:
    return [(name, m) for name, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]


def unet_state_to_diffusers(unet: UNet) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel weights of our UNet (without the null text token, which is exported apart)."""
    state = {k.replace(".to_out.", ".to_out.0."): v for k, v in unet.state_dict().items()
             if k not in ("null_text_embedding", "class_embedding_proj.weight", "class_embedding_proj.bias")}
    if unet.class_embedding_proj is not None:  # fold: (E W^T + b) is again an embedding table
        proj = unet.class_embedding_proj
        state["class_embedding.weight"] = unet.class_embedding.weight @ proj.weight.T + proj.bias  # (K+1, T)
    if unet.conditioning != "text":  # UNet2DConditionModel always cross-attends: add one that adds exactly 0
        for name, block in _transformer_blocks(unet):
            dim, inner = block.norm1.normalized_shape[0], block.attn1.to_q.out_features
            state[f"{name}.norm2.weight"], state[f"{name}.norm2.bias"] = torch.ones(dim), torch.zeros(dim)
            state[f"{name}.attn2.to_q.weight"] = torch.zeros(inner, dim)
            for proj_name in ("to_k", "to_v"):
                state[f"{name}.attn2.{proj_name}.weight"] = torch.zeros(inner, ZEROED_CROSS_ATTENTION_DIM)
            state[f"{name}.attn2.to_out.0.weight"] = torch.zeros(dim, inner)
            state[f"{name}.attn2.to_out.0.bias"] = torch.zeros(dim)
    return state


def unet_state_from_diffusers(state: dict[str, torch.Tensor], conditioning: str,
                              path="weights") -> dict[str, torch.Tensor]:
    """UNet2DConditionModel weights -> ours. Without text conditioning the cross-attention is dropped, which is
    exact only when its output projection is zero (as in our exports); otherwise it is an error."""
    out = {}
    for key, value in state.items():
        key = key.replace(".to_out.0.", ".to_out.")
        if re.search(r"\.proj_(in|out)\.weight$", key) and value.dim() == 4:  # use_linear_projection=False
            value = value[:, :, 0, 0]  # (C, C, 1, 1) 1x1 conv == linear over tokens
        out[key] = value
    if conditioning == "text":
        return out
    cross = [k for k in out if re.search(r"transformer_blocks\.\d+\.(attn2\.|norm2\.)", k)]
    live = [k for k in cross if ".attn2.to_out." in k and out[k].abs().max() > 0]
    if live:
        raise DiffusersFormatError(
            f"{path}: this UNet's cross-attention is trained ({live[0]} is not zero), so it can't become a "
            f"{conditioning} model, which has no text input; train a text-conditional model from it instead"
        )
    return {k: v for k, v in out.items() if k not in cross}


def conditioning_of(config: dict, state: dict[str, torch.Tensor]) -> str:
    """class with num_class_embeds; none when the cross-attention's output is zero (our export); else text."""
    if config.get("num_class_embeds"):
        return "class"
    outs = [v for k, v in state.items() if ".attn2.to_out." in k]
    return "none" if outs and all(v.abs().max() == 0 for v in outs) else "text"


def unet_from_diffusers(path, base: Optional[UNetConfig] = None,
                        conditioning: Optional[str] = None) -> tuple[UNet, str]:
    """(our UNet in eval mode, its conditioning) from a diffusers UNet2DConditionModel. `conditioning`, when given,
    must be what the weights are (conditioning_of). The null text token, absent there, is left as built."""
    config, weights_path = diffusers_files(path, "unet")
    cfg, in_channels = unet_config_from_diffusers(config, base or UNetConfig(), path)
    state = read_weights(weights_path)
    found = conditioning_of(config, state)
    if conditioning is not None and conditioning != found:
        why = {"class": f"it has a class embedding (num_class_embeds={config.get('num_class_embeds')})",
               "none": "its cross-attention is all zeros (an export of an unconditional model)",
               "text": "its cross-attention is trained and it has no class embedding"}[found]
        raise DiffusersFormatError(f"{path} is a {found}-conditional UNet ({why}), "
                                   f"not a {conditioning}-conditional one")
    conditioning = found
    unet = build_unet(cfg, in_channels, conditioning)
    optional = ("null_text_embedding",) if conditioning == "text" else ()
    _load_state(unet, unet_state_from_diffusers(state, conditioning, weights_path), weights_path, optional)
    return unet.eval(), conditioning


def architecture_fields(conditioning: str) -> tuple[str, ...]:
    """The UNetConfig fields a model's weights fix, for this conditioning."""
    extra = {"text": UNET_TEXT_ARCHITECTURE, "class": UNET_CLASS_ARCHITECTURE}.get(conditioning, ())
    return UNET_ARCHITECTURE + extra


# --------------------------------------------------------------------------------------------------------------
# Scheduler (DDIMScheduler)
# --------------------------------------------------------------------------------------------------------------

BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
# DiffusionProcess.to_dict() field -> DDIMScheduler config entry. A new process field needs one row here; a field
# without a row stops the export (scheduler_config_from_process) instead of silently changing the schedule.
PROCESS_TO_SCHEDULER = {
    "num_timesteps": lambda v: {"num_train_timesteps": int(v)},
    "beta_schedule": lambda v: {"beta_schedule": BETA_SCHEDULES[v]},
    "beta_start": lambda v: {"beta_start": float(v)},
    "beta_end": lambda v: {"beta_end": float(v)},
    "prediction_type": lambda v: {"prediction_type": v},
    "rescale_betas_zero_snr": lambda v: {"rescale_betas_zero_snr": bool(v)},  # same formula (Lin et al. 2024, Alg. 1)
}
# How our DDIM sampler runs (src/diffusion/samplers.py): "trailing" timesteps from T - 1, the last step lands on
# alpha_bar = 1, latents are never clipped. steps_offset is unused by "trailing"; StableDiffusionPipeline rewrites
# any value but 1 (with a deprecation warning), so 1 is written.
DDIM_SAMPLING = {"timestep_spacing": "trailing", "set_alpha_to_one": True, "clip_sample": False, "steps_offset": 1,
                 "thresholding": False, "trained_betas": None, "rescale_betas_zero_snr": False}


def scheduler_config_from_process(process: dict) -> dict:
    """DDIMScheduler config reproducing the schedule of `DiffusionProcess.to_dict()` and our DDIM sampler."""
    unknown = sorted(set(process) - set(PROCESS_TO_SCHEDULER))
    if unknown:
        raise DiffusersFormatError(
            f"diffusion process field(s) {unknown} have no DDIMScheduler mapping: add them to PROCESS_TO_SCHEDULER "
            "in src/models/diffusers_compat.py"
        )
    if process.get("beta_schedule") not in BETA_SCHEDULES:
        raise DiffusersFormatError(f"beta_schedule {process.get('beta_schedule')!r} has no DDIMScheduler counterpart")
    config = dict(DDIM_SAMPLING)
    for key, value in process.items():
        config.update(PROCESS_TO_SCHEDULER[key](value))
    return config


def process_from_scheduler(config: dict, path="scheduler") -> dict:
    """The DiffusionProcess.to_dict() of a diffusers scheduler config (its training schedule only)."""
    names = {v: k for k, v in BETA_SCHEDULES.items()}
    if config.get("trained_betas") is not None or config.get("beta_schedule", "linear") not in names:
        raise DiffusersFormatError(f"{path}: beta_schedule {config.get('beta_schedule')!r} / trained_betas can't be "
                                   f"expressed (supported: {sorted(names)})")
    return {"num_timesteps": config.get("num_train_timesteps", 1000),
            "beta_schedule": names[config.get("beta_schedule", "linear")],
            "beta_start": config.get("beta_start", 1e-4), "beta_end": config.get("beta_end", 0.02),
            "prediction_type": config.get("prediction_type", "epsilon"),
            "rescale_betas_zero_snr": bool(config.get("rescale_betas_zero_snr", False))}


def write_scheduler(folder, process: dict) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
              **scheduler_config_from_process(process)}
    (folder / SCHEDULER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return folder
