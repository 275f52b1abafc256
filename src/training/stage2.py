"""Stage 2 (latent diffusion) training, as named helpers that stage2_diffusion_trainer.py strings together.

One training step (DDPM Algorithm 1 in the VAE's latent space, LDM eq. 2):
    x (B, 3, H, W) --frozen VAE--> mean, std (B, C, h, w)       [or both straight from the latent cache]
    z0 = scaling_factor * (mean + std * eps')                    posterior sample, scaled to unit variance
    t ~ U{0..T-1}, eps ~ N(0, I), z_t = sqrt(ab_t) z0 + sqrt(1 - ab_t) eps
    cond -> null condition with probability cfg_dropout_prob     (classifier-free guidance training)
    loss = w_t || unet(z_t, t, cond) - target ||                 target eps or v; mse | l1 | huber;
                                                                 w_t = 1, or min-SNR-gamma (snr_gamma)

Every random draw of a step (flips, posterior sample, timesteps, noise, condition dropout) comes from two
generators that checkpoints save, so a resumed run takes exactly the steps the uninterrupted one would, and a run
from the latent cache draws exactly the numbers a run from images does. A step whose loss or gradient is not
finite on any process changes nothing, EMA included (guard.py, optim.py); SIGTERM / SIGUSR1 end the run after a
step and a checkpoint (preemption.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch

from ..config import ModelConfig, Stage2TrainConfig, UNetConfig, VAEConfig, to_dict
from ..data import CONDITIONING, build_dataset
from ..data.image_folder import DatasetError
from ..diffusion.schedule import DiffusionProcess, diffusion_loss, offset_noise
from ..evaluation.reference import folder_fingerprint
from ..models.diffusers_compat import diffusers_vae_scaling_factor, load_vae_backbone
from ..models.text_encoder import same_text_model
from ..models.unet import Condition, UNet
from ..models.vae import Autoencoder
from ..pipeline import LatentDiffusion, load_text_encoder_for, save_stage2_model, stage2_metadata, trained_classes
from .checkpoint import data_layout, load_checkpoint, resolve_resume_path, resumed_loader_position, save_checkpoint
from .ema import EMA
from .guard import NonFiniteGuard, any_process
from .images import save_image_grid
from .latent_cache import weights_fingerprint
from .metrics import MetricWindow
from .optim import Trainable, guarded_update
from .performance import attention_kernels, compile_module, mark_step, mark_text_dynamic, to_memory_format
from .precision import MixedPrecision
from .setup import every, gradient_sync, step_events
from .trackers import log_image

logger = logging.getLogger("ldm")

DEFAULT_PROMPTS_FILE = Path(__file__).resolve().parents[2] / "sample_text_cond_prompts.txt"


class Stage2SetupError(ValueError):
    """A stage-2 run that cannot start: missing scaling constant, mismatched text encoder, wrong dataset."""


# --------------------------------------------------------------------------------------------------- resolving


def resolve_conditioning(dataset: str, unet_cfg: UNetConfig) -> str:
    """The dataset decides: celebahq -> none, shapes / conceptual_captions -> text, imagenet -> class when
    unet.class_conditioning is True, otherwise unconditional (the labels are then ignored)."""
    kind = CONDITIONING[dataset]
    if kind == "class" and not unet_cfg.class_conditioning:
        logger.info("dataset %s has class labels but unet.class_conditioning is False: training unconditionally", dataset)
        return "none"
    if kind != "class" and unet_cfg.class_conditioning:
        logger.warning("unet.class_conditioning is True but dataset %s has no class labels: ignored", dataset)
    return kind


SCALING_MISMATCH = 1.5  # a ratio between a config constant and a diffusers VAE's own factor worth a warning


def resolve_scaling_factor(model_cfg: ModelConfig, dataset: str, model_config_path, vae_path=None) -> float:
    """scaling_constants[dataset] of the model config; else a diffusers VAE's own scaling_factor (config.json);
    else an error saying how to compute it. A config constant that differs from the diffusers VAE's own is used,
    with a warning when they are more than SCALING_MISMATCH apart: it was probably computed for another VAE
    (configs/ldm.yaml ships constants for its own, ~5x Stable Diffusion's), while the constant measured on the
    user's own data for this VAE stays close to its config.json's."""
    from_vae = diffusers_vae_scaling_factor(vae_path) if vae_path is not None and Path(vae_path).exists() else None
    if dataset not in model_cfg.scaling_constants:
        if from_vae is not None:
            logger.info("scaling factor %.6g from %s's config.json (set scaling_constants.%s to override it)",
                        from_vae, vae_path, dataset)
            return from_vae
        raise Stage2SetupError(
            f"{model_config_path} has no scaling constant for dataset '{dataset}' (key scaling_constants.{dataset}). "
            f"Compute it with: python compute_vae_scaling.py --path_to_pretrained_weights <stage-1 model.safetensors> "
            f"--model_config {model_config_path} --dataset {dataset} --update_config"
        )
    value = model_cfg.scaling_constants[dataset]
    if not (math.isfinite(value) and value > 0):
        raise Stage2SetupError(f"{model_config_path}: scaling_constants.{dataset} must be a positive number, got {value}")
    if from_vae is not None and not 1 / SCALING_MISMATCH < value / from_vae < SCALING_MISMATCH:
        logger.warning(
            "scaling factor %.7g from scaling_constants.%s of %s is used, but %s's config.json says %.7g. If that "
            "constant was computed for another VAE, the latents will not have unit variance: run "
            "compute_vae_scaling.py --path_to_pretrained_weights %s --model_config %s --dataset %s --update_config, "
            "or delete the line to use the config.json's", value, dataset, model_config_path, vae_path, from_vae,
            vae_path, model_config_path, dataset)
    return value


def resolve_pre_encoded(train_cfg: Stage2TrainConfig, model_cfg: ModelConfig) -> bool:
    return train_cfg.pre_encoded_text if train_cfg.pre_encoded_text is not None else model_cfg.unet.pre_encoded_text


def build_process(train_cfg: Stage2TrainConfig) -> DiffusionProcess:
    """The diffusion process of the training config, after checking the keys no type can check."""
    if not 0.0 <= train_cfg.cfg_dropout_prob <= 1.0:
        raise Stage2SetupError(f"cfg_dropout_prob must be in [0, 1], got {train_cfg.cfg_dropout_prob}")
    if train_cfg.snr_gamma is not None and not train_cfg.snr_gamma > 0:
        raise Stage2SetupError(f"snr_gamma must be a positive number (5 in Hang et al. 2023) or null, got {train_cfg.snr_gamma}")
    if train_cfg.noise_offset < 0:
        raise Stage2SetupError(f"noise_offset must be >= 0 (0.1 is typical), got {train_cfg.noise_offset}")
    if train_cfg.val_guidance_rescale < 0 or train_cfg.val_guidance_rescale > 1:
        raise Stage2SetupError(f"val_guidance_rescale must be in [0, 1], got {train_cfg.val_guidance_rescale}")
    if train_cfg.fid_num_samples == 1 and train_cfg.fid_eval_freq > 0:  # else the first FID step fails, mid-run
        raise Stage2SetupError("fid_num_samples must be 0 (off) or at least 2 (FID needs a covariance), got 1")
    try:
        return DiffusionProcess.from_config(train_cfg)
    except ValueError as err:
        raise Stage2SetupError(str(err)) from None


def load_frozen_vae(path, model_cfg: ModelConfig, device) -> Autoencoder:
    """The stage-1 autoencoder, frozen, fp32, eval: our model.safetensors (its stored config wins over the model
    config's vae section) or a diffusers AutoencoderKL (converted; images of the model config's vae.img_size)."""
    if not Path(path).exists():
        raise FileNotFoundError(
            f"--path_to_vae_backbone {path} not found: pass the model.safetensors written by stage1_vae_trainer.py, "
            "or a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors)"
        )
    vae, _ = load_vae_backbone(path, img_size=model_cfg.vae.img_size)  # safetensors rejects "cpu:0": load on cpu
    vae = vae.to(device).float().requires_grad_(False).eval()
    if to_dict(vae.config) != to_dict(model_cfg.vae):
        diffs = [k for k, v in to_dict(vae.config).items() if to_dict(model_cfg.vae).get(k) != v]
        logger.warning(
            "the VAE in %s has a different vae config than --model_config (%s); using the VAE's own",
            path, ", ".join(diffs),
        )
    return vae


def check_latent_size(vae_cfg, unet_cfg: UNetConfig) -> None:
    """The UNet halves its input len(unet_channels_per_block) - 1 times and concatenates each skip with its upsampled
    path: the latent's side must divide by unet_up_down_factor ** that (checked before any latent is cached)."""
    factor = unet_cfg.unet_up_down_factor ** (len(unet_cfg.unet_channels_per_block) - 1)
    if vae_cfg.latent_size % factor:
        raise Stage2SetupError(
            f"the VAE's latents are {vae_cfg.latent_size}x{vae_cfg.latent_size} (img_size {vae_cfg.img_size} / "
            f"{vae_cfg.downsample_factor}), which the UNet's {len(unet_cfg.unet_channels_per_block)} levels can't "
            f"downsample by {factor}: use fewer unet levels or an img_size whose latent side divides by {factor}"
        )


def check_class_count(dataset, conditioning: str, unet_cfg: UNetConfig, init_unet=None) -> None:
    """Every class folder needs an embedding. With --init_unet the source's num_classes replaces the config's,
    so raising the config's would change nothing: the error says so."""
    if conditioning != "class":
        return
    classes = len(dataset.classes)  # imagenet: ClassFolderDataset
    if classes > unet_cfg.num_classes and init_unet:
        raise Stage2SetupError(
            f"the dataset has {classes} class folders but the --init_unet model {init_unet} has "
            f"{unet_cfg.num_classes} classes (its num_classes replaces the model config's): start from a model with "
            "as many classes, or train without --init_unet"
        )
    if classes > unet_cfg.num_classes:
        raise Stage2SetupError(
            f"the dataset has {classes} class folders but unet.num_classes is {unet_cfg.num_classes}: raise num_classes"
        )


def check_text_source(dataset, pre_encoded: bool, unet_cfg: UNetConfig) -> None:
    """With pre_encoded_text the dataset must yield 'text_embeds' of unet.text_embed_dim; otherwise captions."""
    item = next((dataset[i] for i in range(min(len(dataset), 16)) if dataset[i] is not None), None)
    if item is None:
        raise DatasetError("the first 16 items of the dataset are all unreadable")
    if pre_encoded:
        if "text_embeds" not in item:
            raise Stage2SetupError(
                "pre_encoded_text is True but the dataset yields no 'text_embeds': prepare it with "
                "prep_cc.py --pre_encode_text, or set pre_encoded_text: False"
            )
        encoded_with = getattr(dataset, "prep_info", {}).get("text_model")
        if encoded_with and not same_text_model(encoded_with, unet_cfg.text_conditioning_hf_model):
            raise Stage2SetupError(
                f"the dataset's text was pre-encoded with '{encoded_with}' (prep_cc.py --hf_clip_model_name), but "
                f"unet.text_conditioning_hf_model is '{unet_cfg.text_conditioning_hf_model}', the model sampling "
                "will encode prompts with: set it to the prep's model, or prepare the dataset again with this one"
            )
        dim = item["text_embeds"].shape[-1]
        if dim != unet_cfg.text_embed_dim:
            raise Stage2SetupError(
                f"the dataset's pre-encoded text is {dim}-d but unet.text_embed_dim is {unet_cfg.text_embed_dim}"
            )
    elif "caption" not in item:
        raise Stage2SetupError("a text-conditional run needs captions, and the dataset yields none")


def cache_identity(
    vae: Autoencoder,
    dataset_name: str,
    path_to_dataset: Optional[str],
    num_items: int,
    train_cfg: Stage2TrainConfig,
    conditioning: str,
    text_source: Optional[str],
    text_encoder: Optional[torch.nn.Module],
) -> dict:
    """What a latent cache depends on; a cache with another identity is refused. 'files' (relative path, size and
    modification time of every file under the dataset folder) tells other images at the same path and count apart."""
    identity = {
        "vae_weights": weights_fingerprint(vae),
        "vae_config": to_dict(vae.config),
        "dataset": dataset_name,
        "path_to_dataset": str(Path(path_to_dataset).resolve()) if path_to_dataset else None,
        "files": folder_fingerprint(path_to_dataset) if path_to_dataset else None,
        "num_items": num_items,
        "img_size": vae.config.img_size,
        "interpolation": train_cfg.interpolation,
        "flipped_views": train_cfg.random_flip_p > 0,
        "conditioning": conditioning,
        "text_source": text_source,
    }
    if dataset_name == "shapes":
        identity["shapes"] = {"num_images": train_cfg.shapes_num_images, "seed": train_cfg.seed}
    if text_encoder is not None:
        identity["text_encoder_weights"] = weights_fingerprint(text_encoder)
    return identity


# --------------------------------------------------------------------------------------------------- one step


@dataclass
class StepRandomness:
    """The generators of the training step, both on the training device (no host round trip per step)."""

    flip: torch.Generator
    noise: torch.Generator

    @classmethod
    def create(cls, seed: int, rank: int, device) -> "StepRandomness":
        base = seed * 1_000_003 + rank * 7919
        return cls(
            flip=torch.Generator(device=device).manual_seed(base + 1),
            noise=torch.Generator(device=device).manual_seed(base + 2),
        )

    def as_dict(self) -> dict[str, torch.Generator]:
        return {"flip": self.flip, "noise": self.noise}


def flip_mask(batch_size: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """(B,) bool on the generator's device: which images of the batch are mirrored (as
    src.data.transforms.random_flip draws them)."""
    if p <= 0:
        return torch.zeros(batch_size, dtype=torch.bool, device=generator.device)
    return torch.rand(batch_size, generator=generator, device=generator.device) < p


def latent_moments(batch: dict, vae: Autoencoder, flip_p: float, generator: torch.Generator, device,
                   autocast=contextlib.nullcontext):
    """(mean, std), each (B, C, h, w), of the batch's (randomly mirrored) images, encoded now (the frozen VAE under
    `autocast()`) or read from the cache's 'moments' (B, V, 2, C, h, w), V = 2 holding the mirrored image's
    moments at index 1."""
    if "moments" in batch:
        moments = batch["moments"].to(device, non_blocking=True)  # (B, V, 2, C, h, w)
        flip = flip_mask(moments.shape[0], flip_p, generator).to(device)
        view = flip.long() if moments.shape[1] == 2 else torch.zeros_like(flip, dtype=torch.long)
        chosen = moments[torch.arange(moments.shape[0], device=device), view]  # (B, 2, C, h, w)
        return chosen[:, 0], chosen[:, 1]
    images = batch["image"].to(device, non_blocking=True)  # (B, 3, H, W)
    flip = flip_mask(images.shape[0], flip_p, generator).to(device)[:, None, None, None]
    images = torch.where(flip, images.flip(-1), images)
    with torch.no_grad(), autocast():
        mean, std = vae.latent_moments(images)
    return mean.float(), std.float()


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """z = mean + std * eps (the VAE's reparameterised posterior sample), (B, C, h, w)."""
    eps = torch.randn(mean.shape, generator=generator, device=generator.device).to(mean.device)
    return mean + std * eps


def batch_condition(batch: dict, conditioning: str, text_encoder, device,
                    autocast=contextlib.nullcontext) -> Optional[Condition]:
    """The batch's condition: captions encoded by the frozen text encoder (under `autocast()`), pre-encoded /
    cached text embeddings (padded by the loader, with 'text_embeds_mask'), class labels, or None.

    Text is cut on the CPU to the longest caption of the batch (Condition.trimmed): the UNet's output is the same,
    its cross-attention runs over ~16 positions instead of 77, and without padding left it takes no mask."""
    if conditioning == "none":
        return None
    if conditioning == "class":
        return Condition(labels=batch["label"].to(device, non_blocking=True))
    if "text_embeds" in batch:
        cond = Condition(text=batch["text_embeds"], text_mask=batch.get("text_embeds_mask"))  # (B, L, D) on the CPU
        cond = cond.trimmed(device=device)  # cut on the CPU, copied without blocking
        return Condition(text=cond.text.float(), text_mask=cond.text_mask)
    ids, mask, padded = text_encoder.tokenize_trimmed(list(batch["caption"]))  # (B, L') on the CPU
    with torch.no_grad(), autocast():
        hidden, mask = text_encoder.encode_tokens(ids, mask)  # (B, L', D): real tokens' states as at full length
    return Condition(text=hidden.float(), text_mask=mask if padded else None)


def diffusion_step_loss(
    unet, unet_module: UNet, process: DiffusionProcess, z0: torch.Tensor, cond: Optional[Condition],
    cfg: Stage2TrainConfig, generator: torch.Generator, autocast=contextlib.nullcontext,
) -> torch.Tensor:
    """DDPM's training loss on scaled latents z0 (B, C, h, w). `unet` may be wrapped (DDP); `unet_module` not.
    The UNet runs under `autocast()` (the mixed-precision context); the loss is taken in fp32."""
    t = process.sample_timesteps(z0.shape[0], z0.device, generator)  # (B,)
    noise = offset_noise(z0.shape, cfg.noise_offset, generator).to(z0)  # (B, C, h, w)
    z_t = process.add_noise(z0, noise, t)
    cond = unet_module.drop_condition(cond, cfg.cfg_dropout_prob, generator)
    if cfg.compile and cond is not None:
        mark_text_dynamic(cond.text, cond.text_mask)  # one compiled graph for every caption length
    with autocast(), attention_kernels(cfg.attention_backend):
        pred = unet(z_t, t, cond)
    weights = process.min_snr_weights(t, cfg.snr_gamma) if cfg.snr_gamma is not None else None  # (B,)
    return diffusion_loss(pred, process.training_target(z0, noise, t), cfg.loss_fn, weights)


def batch_loss(batch: dict, ctx: "Stage2Context", unet, randomness: StepRandomness,
               autocast=contextlib.nullcontext, frozen_autocast=contextlib.nullcontext) -> torch.Tensor:
    """The loss of one batch, from images or from the latent cache: the same draws in the same order.
    `autocast`: the UNet's mixed precision; `frozen_autocast`: the frozen VAE's and text encoder's."""
    device = ctx.device
    mean, std = latent_moments(batch, ctx.vae, ctx.train_cfg.random_flip_p, randomness.flip, device, frozen_autocast)
    z0 = sample_latents(mean, std, randomness.noise) * ctx.scaling_factor  # (B, C, h, w), ~unit variance
    cond = batch_condition(batch, ctx.conditioning, ctx.text_encoder, device, frozen_autocast)
    return diffusion_step_loss(unet, ctx.unet_module, ctx.process, z0, cond, ctx.train_cfg, randomness.noise, autocast)


# --------------------------------------------------------------------------------------------------- context


@dataclass
class Stage2Context:
    """The frozen parts and settings every step and every validation grid uses."""

    train_cfg: Stage2TrainConfig
    model_cfg: ModelConfig  # its vae section is the loaded VAE's own config
    dataset_name: str
    conditioning: str
    scaling_factor: float
    vae: Autoencoder
    process: DiffusionProcess
    unet_module: UNet  # unwrapped
    text_encoder: Optional[torch.nn.Module]
    text_model: Optional[str]  # name stored for inference
    device: torch.device
    extra_metadata: dict = field(default_factory=dict)
    val_prompts: list[str] = field(default_factory=list)
    val_text: Optional[Condition] = None  # the validation prompts, encoded once

    def metadata(self) -> dict:
        return stage2_metadata(
            self.model_cfg, self.train_cfg, self.process, self.dataset_name, self.conditioning,
            self.scaling_factor, self.text_model, self.extra_metadata,
        )


def build_text_encoder(conditioning: str, pre_encoded: bool, unet_cfg: UNetConfig, device):
    """The frozen text encoder (unet.text_conditioning_hf_model), unless there is no text or it is pre-encoded."""
    if conditioning != "text" or pre_encoded:
        return None
    return load_text_encoder_for(unet_cfg.text_conditioning_hf_model, unet_cfg.text_embed_dim).to(device)


def build_training_dataset(args, train_cfg: Stage2TrainConfig, vae_cfg: VAEConfig, conditioning: str, pre_encoded: bool,
                           unet_cfg: UNetConfig):
    dataset = build_dataset(args.dataset, args.path_to_dataset, vae_cfg.img_size, train_cfg)
    check_class_count(dataset, conditioning, unet_cfg, args.init_unet)
    if conditioning == "text":
        check_text_source(dataset, pre_encoded, unet_cfg)
    return dataset


# --------------------------------------------------------------------------------------------------- validation


def read_prompts(path=DEFAULT_PROMPTS_FILE) -> list[str]:
    """Non-blank lines of the prompts file (sample_text_cond_prompts.txt at the repository root)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"validation prompts file not found: {path} (one prompt per line)")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts (one prompt per line; blank lines are ignored)")
    return prompts


def validation_labels(num_samples: int, num_classes: int) -> list[int]:
    """Fixed class labels spread evenly over the classes, the same at every validation."""
    return [int(i * num_classes / num_samples) % num_classes for i in range(num_samples)]


def encode_validation_prompts(prompts: list[str], text_encoder, unet_cfg: UNetConfig, device) -> Optional[Condition]:
    """The validation prompts' Condition, encoded once. Pre-encoded runs have no text encoder at hand: it is
    loaded for this and released; when it is not available offline the text grids are skipped with a warning."""
    encoder = text_encoder
    if encoder is None:
        try:
            encoder = load_text_encoder_for(unet_cfg.text_conditioning_hf_model, unet_cfg.text_embed_dim).to(device)
        except FileNotFoundError as err:
            logger.warning("validation grids are skipped: the text encoder for the prompts is unavailable (%s)", err)
            return None
    with torch.no_grad():
        hidden, mask = encoder.encode(prompts)  # (N, L, D), (N, L)
    return Condition(text=hidden.float().to(device), text_mask=mask.to(device))


@torch.no_grad()
def validation_grid(ctx: Stage2Context, ema_unet: UNet, step: int, out_dir) -> Optional[Path]:
    """Sample with the EMA weights (val_sampler, val_sampler_steps, val_guidance_scale, fixed seed), save a grid:
    one image per validation prompt, num_val_random_samples fixed class labels, or as many unconditional samples.
    A .txt beside it names each image's prompt or class ("label class_name")."""
    cfg = ctx.train_cfg
    pipe = LatentDiffusion(ctx.vae, ema_unet, ctx.process, ctx.conditioning, ctx.scaling_factor, ctx.text_encoder)
    if ctx.conditioning == "text":
        if ctx.val_text is None:
            return None
        cond = ctx.val_text
        uncond = ema_unet.null_condition(cond.batch_size)
    elif ctx.conditioning == "class":
        classes = trained_classes(ctx.extra_metadata, ema_unet.num_classes)
        labels = validation_labels(cfg.num_val_random_samples, classes)
        cond = Condition(labels=torch.tensor(labels, dtype=torch.long, device=ctx.device))
        uncond = ema_unet.null_condition(len(labels))
    else:
        cond = uncond = None
    n = cond.batch_size if cond is not None else cfg.num_val_random_samples
    generator = torch.Generator(device=ctx.device).manual_seed(cfg.seed)
    z = pipe.sample_latents(
        n, cond, uncond, cfg.val_sampler, min(cfg.val_sampler_steps, ctx.process.num_timesteps), cfg.val_guidance_scale,
        generator=generator, guidance_rescale=cfg.val_guidance_rescale,
    )
    images = pipe.decode(z)  # (N, 3, H, W)
    path = Path(out_dir) / f"step_{step:07d}.png"
    save_image_grid(images, path, nrow=min(8, n))
    if ctx.conditioning == "text":
        path.with_suffix(".txt").write_text("\n".join(ctx.val_prompts) + "\n")
    elif ctx.conditioning == "class":  # which class each image of the grid is, in grid order
        names = ctx.extra_metadata.get("class_names") or []
        lines = [f"{label} {names[label]}" if label < len(names) else str(label) for label in labels]
        path.with_suffix(".txt").write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogateescape")
    return path


# --------------------------------------------------------------------------------------------------- saving


def save_final_model(ctx: Stage2Context, ema_unet: UNet, working_dir) -> Path:
    """working_directory/model.safetensors: EMA UNet + VAE, every config in the metadata."""
    path = save_stage2_model(Path(working_dir) / "model.safetensors", ema_unet, ctx.vae, ctx.metadata())
    logger.info("saved %s", path)
    return path



# --------------------------------------------------------------------------------------------------- set-up


def setup_context(args, accelerator, train_cfg: Stage2TrainConfig, model_cfg: ModelConfig) -> tuple[Stage2Context, object]:
    """Everything frozen, plus the UNet (not yet prepared), and the dataset (images or the latent cache).

    Cheap checks (scaling constant, conditioning) come first, so a misconfigured run stops before any model loads.
    """
    from ..models.unet import build_unet
    from .init_unet import load_initial_unet, warn_if_classes_differ
    from .latent_cache import open_or_build_latent_cache

    conditioning = resolve_conditioning(args.dataset, model_cfg.unet)
    scaling_factor = resolve_scaling_factor(model_cfg, args.dataset, args.model_config, args.path_to_vae_backbone)
    pre_encoded = resolve_pre_encoded(train_cfg, model_cfg)
    train_cfg = replace(train_cfg, pre_encoded_text=pre_encoded)  # resolved once: the dataset reads it too
    process = build_process(train_cfg)
    device = accelerator.device
    vae = load_frozen_vae(args.path_to_vae_backbone, model_cfg, device)
    model_cfg = ModelConfig(vae=vae.config, unet=model_cfg.unet, scaling_constants=dict(model_cfg.scaling_constants))
    process = DiffusionProcess.from_config(train_cfg)
    extra = {"vae_source": str(args.path_to_vae_backbone), "pre_encoded_text": pre_encoded}
    initial_unet = None
    if args.init_unet:
        initial_unet, unet_cfg = load_initial_unet(args.init_unet, model_cfg.unet, conditioning, vae.config.latent_dim,
                                                   process.to_dict())
        model_cfg = replace(model_cfg, unet=unet_cfg)
        extra["init_unet"] = str(args.init_unet)
    check_latent_size(vae.config, model_cfg.unet)
    dataset = build_training_dataset(args, train_cfg, vae.config, conditioning, pre_encoded, model_cfg.unet)
    text_encoder = build_text_encoder(conditioning, pre_encoded, model_cfg.unet, device)
    unet = initial_unet if initial_unet is not None else build_unet(model_cfg.unet, vae.config.latent_dim, conditioning)
    if conditioning == "class":
        extra["class_names"] = list(dataset.classes)
        if args.init_unet:
            warn_if_classes_differ(args.init_unet, extra["class_names"])
    ctx = Stage2Context(
        train_cfg=train_cfg,
        model_cfg=model_cfg,
        dataset_name=args.dataset,
        conditioning=conditioning,
        scaling_factor=scaling_factor,
        vae=vae,
        process=process,
        unet_module=unet,
        text_encoder=text_encoder,
        text_model=model_cfg.unet.text_conditioning_hf_model if conditioning == "text" else None,
        device=device,
        extra_metadata=extra,
    )
    if conditioning == "text":
        ctx.val_prompts = read_prompts(args.val_prompts or DEFAULT_PROMPTS_FILE)
        ctx.val_text = encode_validation_prompts(ctx.val_prompts, text_encoder, model_cfg.unet, device)
    if args.cache_latents:
        text_source = None
        if conditioning == "text":
            text_source = "pre_encoded" if pre_encoded else model_cfg.unet.text_conditioning_hf_model
        identity = cache_identity(
            vae, args.dataset, args.path_to_dataset, len(dataset), train_cfg, conditioning, text_source, text_encoder
        )
        dataset = open_or_build_latent_cache(
            accelerator, args.cache_latents, dataset, vae, identity, train_cfg.random_flip_p > 0, conditioning,
            text_encoder.encode_trimmed if text_encoder is not None else None,
            batch_size=train_cfg.per_gpu_batch_size, num_workers=train_cfg.num_workers,
        )
    return ctx, dataset


# --------------------------------------------------------------------------------------------------- the loop


@dataclass
class Stage2State:
    """What the loop updates; `modules()` / `states()` are what a checkpoint holds."""

    unet: torch.nn.Module  # prepared (DDP-wrapped when distributed)
    trainable: Trainable  # the UNet's fused AdamW, LR schedule and clipping
    ema: EMA
    precision: MixedPrecision
    guard: NonFiniteGuard
    randomness: StepRandomness
    step: int = 0
    loader_position: int = 0  # batches this process's loader handed out, unreadable ones included

    def modules(self, ctx: Stage2Context) -> dict[str, torch.nn.Module]:
        return {"unet": ctx.unet_module, "ema": self.ema}

    def states(self) -> dict[str, object]:
        """Loaded in this order: the optimizer before its schedule (which re-binds the optimizer's lr)."""
        return {"optimizer": self.trainable.optimizer, "scheduler": self.trainable.schedule,
                "grad_scaler": self.precision, "guard": self.guard}


def build_training_state(accelerator, ctx: Stage2Context) -> Stage2State:
    """The UNet (prepared), its optimizer and schedule, the EMA, the step's random generators."""
    from .setup import build_trainable

    cfg, device = ctx.train_cfg, accelerator.device
    unet = to_memory_format(ctx.unet_module.to(device), cfg)
    trainable = build_trainable("unet", unet, cfg, device, cfg.learning_rate, (cfg.adam_beta1, cfg.adam_beta2),
                                cfg.weight_decay, cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.total_training_iterations)
    unet = accelerator.prepare(unet)
    ctx.unet_module = accelerator.unwrap_model(unet)
    ema = EMA(ctx.unet_module, cfg.ema_decay, cfg.ema_warmup, cfg.ema_update_every).to(device)
    randomness = StepRandomness.create(cfg.seed, accelerator.process_index, device)
    guard = NonFiniteGuard(("loss", "grad_norm/unet"), cfg.max_nonfinite_steps, device)
    unet = compile_module(unet, cfg)  # what the step calls; the EMA, checkpoints and validation use the module
    return Stage2State(unet, trainable, ema, MixedPrecision.from_accelerator(accelerator), guard, randomness)


def resume_training(accelerator, state: Stage2State, ctx: Stage2Context, working_dir, resume: Optional[str]) -> None:
    """--resume_from_checkpoint: restore every state of the run, its step and its data position."""
    path = resolve_resume_path(working_dir, resume, accelerator)
    if path is None:
        if resume:
            logger.info("no checkpoint in %s yet: starting from step 0", working_dir)
        return
    info = load_checkpoint(accelerator, path, state.modules(ctx), state.states(), state.randomness.as_dict())
    check_resumed_classes(info.get("class_names"), ctx.extra_metadata.get("class_names"), path)
    state.step = int(info["step"])
    state.loader_position = resumed_loader_position(accelerator, info, ctx.train_cfg, path)
    logger.info("resumed from %s at step %d", path, state.step)


def check_resumed_classes(saved: Optional[list], now: Optional[list], path) -> None:
    """Label i is the i-th class folder in sorted order: a folder added, removed or renamed since the checkpoint
    would give the trained class embeddings other classes. Checkpoints written before class_names were kept pass."""
    if saved is None or saved == now:
        return
    added, removed = sorted(set(now or []) - set(saved)), sorted(set(saved) - set(now or []))
    raise Stage2SetupError(
        f"the dataset's class folders differ from those {path} was trained on (added: {', '.join(added) or '-'}; "
        f"removed: {', '.join(removed) or '-'}): resuming would give its labels other classes (label i is the i-th "
        "folder in sorted order). Restore the folders, or start a new run (--init_unet from the last model)"
    )


def train_step(accelerator, ctx: Stage2Context, state: Stage2State, batches) -> tuple[dict, torch.Tensor]:
    """gradient_accumulation_steps batches and one update of the UNet and its EMA, or, when a loss or gradient
    is not finite on any process, none of it (guard.py). Device ops only: returns the logged values and
    `skipped`, () bool."""
    accum = ctx.train_cfg.gradient_accumulation_steps
    # the frozen encoders run in bf16 too; under fp16 they stay fp32 (their activations can exceed its range)
    frozen = state.precision.autocast if state.precision.dtype == torch.bfloat16 else contextlib.nullcontext
    losses = []
    for i in range(accum):
        batch = next(batches)
        mark_step()  # CUDA graphs (compile_mode: reduce-overhead): a new step begins
        with gradient_sync(accelerator, [state.unet], sync=i == accum - 1):
            loss = batch_loss(batch, ctx, state.unet, state.randomness, state.precision.autocast, frozen)
            state.precision.backward(loss / accum)
        losses.append(loss.detach().float())
    losses = torch.stack(losses)  # (accum,)
    loss_bad = any_process(accelerator, ~torch.isfinite(losses).all()[None])  # (1,)
    skipped, grad_bad, norms = guarded_update([state.trainable], state.precision, loss_bad[0])
    state.ema.update(ctx.unet_module, skipped, step=state.step + 1)
    counted = loss_bad[0] | (grad_bad[0] & state.precision.gradient_skip_counts())  # not an fp16 overflow
    state.guard.record(state.step + 1, torch.cat([loss_bad, grad_bad]), skipped, counted)
    return {"loss": losses.mean(), "grad_norm": norms[0]}, skipped


def save_training_checkpoint(accelerator, ctx: Stage2Context, state: Stage2State, working_dir) -> Path:
    cfg = ctx.train_cfg
    return save_checkpoint(
        accelerator, working_dir, state.step, state.modules(ctx), state.states(), state.randomness.as_dict(),
        extra={"total_training_iterations": cfg.total_training_iterations,
               "data_layout": data_layout(accelerator, cfg.per_gpu_batch_size, cfg.gradient_accumulation_steps),
               **({"class_names": ctx.extra_metadata["class_names"]} if "class_names" in ctx.extra_metadata else {})},
        limit=cfg.checkpoints_total_limit,
        loader_position=state.loader_position,
    )


def log_step(accelerator, state: Stage2State, window: MetricWindow, metrics, bar, extra_values: dict) -> None:
    """The host reads of a log step: the guard's verdict, the window's means (over processes), the bar;
    `extra_values` (host numbers, e.g. FID) join the line."""
    state.guard.check()
    extra = {"lr": state.trainable.schedule.last_lr, "ema_decay": state.ema.last_decay(),
             "skipped_steps": state.guard.skipped}
    values = window.pop(extra, accelerator)
    metrics.log({**values, **extra_values}, state.step)
    if "loss" in values:
        bar.set_postfix(loss=f"{values['loss']:.4f}")


def train_loop(args, accelerator, ctx: Stage2Context, state: Stage2State, loader) -> bool:
    """Train from state.step to total_training_iterations; checkpoints and validation grids on the way.

    Returns True at the end of training, False when a stop signal (SIGTERM / SIGUSR1) ended the run early,
    after a checkpoint. Device values are read on the host only at log, checkpoint and stop steps.
    """
    from .periodic_fid import fid_due, periodic_fid
    from .preemption import GracefulStop
    from .setup import MetricsLog, progress_bar

    cfg = ctx.train_cfg
    total = cfg.total_training_iterations
    metrics, window = MetricsLog(accelerator, args.working_directory, start_step=state.step), MetricWindow()
    gens_dir = Path(args.path_to_save_gens or Path(args.working_directory) / "gens")
    bar = progress_bar(accelerator, total, state.step, "stage 2 (latent diffusion)")
    batches = iter(loader)
    state.unet.train()
    with GracefulStop() as stop:
        while state.step < total:
            logs, skipped = train_step(accelerator, ctx, state, batches)
            window.add(logs, keep=~skipped)
            state.step += 1
            # an InfiniteLoader's position (unreadable batches included) for the checkpoint; the tests' and the
            # bench's plain iterables have none
            state.loader_position = getattr(loader, "batches_seen", state.loader_position)
            bar.update(1)
            events = step_events(state.step, cfg, stop, accelerator)
            validate = every(state.step, cfg.val_generation_freq)
            if events.end or validate or fid_due(ctx, state.step):
                state.ema.flush(ctx.unet_module)  # the shadow is read below (ema_update_every > 1: steps pending)
            fid = periodic_fid(args, accelerator, ctx, state.ema.shadow, state.step)  # {} unless FID is on and due
            if events.log or fid:
                log_step(accelerator, state, window, metrics, bar, fid)
            if events.checkpoint:
                path = save_training_checkpoint(accelerator, ctx, state, args.working_directory)
            if validate:
                if accelerator.is_main_process:
                    grid = validation_grid(ctx, state.ema.shadow, state.step, gens_dir)
                    if grid is not None:
                        logger.info("validation grid: %s", grid)
                        log_image(accelerator, "validation", grid, state.step)
                accelerator.wait_for_everyone()
            if events.stop:
                bar.close()
                stop.report(state.step, total, path)
                return False
    bar.close()
    # the final model reads the shadow: a run resumed at or past total_training_iterations trained no step, and its
    # checkpoint (a stop's, or a periodic one) may hold EMA steps still pending (a no-op after events.end's flush)
    state.ema.flush(ctx.unet_module)
    return True
