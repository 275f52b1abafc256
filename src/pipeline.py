"""A trained latent diffusion model as one object: VAE + UNet (EMA) + diffusion process + conditioning.

    pipe = load_pipeline("work_dir/diffusion_cc/model.safetensors", device="cuda")
    images = pipe.generate(prompts=["a red circle on a blue background"], num_per_condition=4, seed=0)  # (4,3,H,W)

Stage 2 saves everything the pipeline needs in model.safetensors (`save_stage2_model`): the EMA UNet, the frozen
VAE, the model / training configs, the dataset, its conditioning, the latent scaling factor and the text model's
name. Only the text encoder itself is loaded from elsewhere (the local Hugging Face cache or a folder).

Sampling (`generate`): z_T ~ N(0, I) in latent space, DDIM (any number of steps, eta), DPM-Solver++(2M) or
ancestral DDPM with classifier-free guidance eps = eps_u + s (eps_c - eps_u) (Ho & Salimans 2022), where eps_u comes from the learned
null condition or from a negative prompt; then x = Decoder(z_0 / scaling_factor).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .config import ModelConfig, Stage2TrainConfig, VAEConfig, from_dict, to_dict
from .diffusion.samplers import Generators, ddim_sample, ddpm_sample, dpmpp_2m_sample
from .diffusion.schedule import DiffusionProcess
from .models.diffusers_compat import load_vae_backbone
from .models.serialization import load_models, save_models
from .models.unet import Condition, UNet, build_unet
from .models.vae import Autoencoder, build_autoencoder

logger = logging.getLogger(__name__)

SAMPLERS = ("ddim", "dpmpp_2m", "ddpm")
DEFAULT_STEPS = {"ddim": 50, "dpmpp_2m": 20}  # ddpm always runs every training timestep


def sampler_flags_error(
    sampler: str, num_steps: Optional[int], eta: float = 0.0, guidance_rescale: float = 0.0
) -> Optional[str]:
    """What is wrong with the sampling scripts' --sampler / --num_steps / --eta / --guidance_rescale, or None: a
    flag the sampler would ignore is refused rather than recorded as if it had been used."""
    if sampler == "ddpm" and num_steps is not None:
        return "--num_steps applies to --sampler ddim and dpmpp_2m; DDPM runs every training step"
    if not 0 <= eta <= 1:
        return "--eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like noise)"
    if eta != 0 and sampler != "ddim":
        return f"--eta applies to --sampler ddim only; {sampler} would ignore it"
    if not 0.0 <= guidance_rescale <= 1.0:
        return "--guidance_rescale must be in [0, 1] (Lin et al. 2024: 0 off, 0.7 their choice)"
    return None


STAGE = 2


class PipelineError(ValueError):
    """Bad input to sampling (empty prompt, wrong kind of model file, class label out of range)."""


def trained_classes(metadata: dict, num_classes: int) -> int:
    """How many class labels the run trains: the dataset's classes, which may be fewer than the UNet's
    (ldm.yaml's 1000 for a 10-class ImageNet subset; the other embeddings never get a gradient)."""
    return len(metadata.get("class_names", [])) or num_classes


@dataclass
class LatentDiffusion:
    vae: Autoencoder
    unet: UNet
    process: DiffusionProcess
    conditioning: str  # "none" | "class" | "text"
    scaling_factor: float
    text_encoder: Optional[torch.nn.Module] = None  # src.models.text_encoder.TextEncoder, for "text"
    metadata: dict[str, Any] = field(default_factory=dict)
    _warned_null: bool = field(default=False, repr=False)

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def num_trained_classes(self) -> int:
        """Class labels 0 .. n-1 the model was trained on (its dataset's class folders, stored as class_names)."""
        return trained_classes(self.metadata, self.unet.num_classes)

    def class_labels(self, given: list[str]) -> list[int]:
        """--class_label values -> labels: an integer is a label index, any other text a class folder's name."""
        names = self.metadata.get("class_names") or []
        labels = []
        for value in given:
            try:
                labels.append(int(value))
                continue
            except ValueError:
                pass
            if value not in names:
                known = f"its classes: {', '.join(names[:10])}{', ...' if len(names) > 10 else ''}" if names else \
                    "it records no class names (give label indices)"
                raise PipelineError(f"--class_label {value!r} is not a class this model was trained on ({known})")
            labels.append(names.index(value))
        return labels

    def latent_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        cfg = self.vae.config
        return (batch_size, cfg.latent_dim, cfg.latent_size, cfg.latent_size)

    # --------------------------------------------------------------------------------------------- conditions

    def encode_prompts(self, prompts: list[str]) -> Condition:
        """Prompts -> Condition(text (B, L, D), text_mask (B, L)) with the frozen text encoder."""
        check_prompts(prompts)
        if self.text_encoder is None:
            raise PipelineError("this pipeline has no text encoder loaded (load_pipeline(..., load_text_encoder=True))")
        with torch.no_grad():
            hidden, mask = self.text_encoder.encode(prompts)
        return Condition(text=hidden, text_mask=mask).to(self.device, self.unet.conv_in.weight.dtype)

    def conditions(
        self,
        prompts: Optional[list[str]] = None,
        labels: Optional[list[int]] = None,
        num_per_condition: int = 1,
        negative_prompt: Optional[str] = None,
    ) -> tuple[int, Optional[Condition], Optional[Condition]]:
        """(batch size, cond, uncond) for `num_per_condition` images per prompt / label (or of an
        unconditional model). uncond is the learned null condition, or the negative prompt's embedding."""
        n = num_per_condition
        if self.conditioning == "text":
            if not prompts:
                raise PipelineError("this model is text-conditional: give at least one prompt (--prompt)")
            if labels:  # ignored silently before; an unconditional model already refused them
                raise PipelineError("--class_label needs a class-conditional model; this one is text-conditional")
            check_prompts(prompts)
            repeated = [p for p in prompts for _ in range(n)]
            cond = self.encode_prompts(repeated)
            if negative_prompt is not None:
                if not negative_prompt.strip():
                    raise PipelineError("--negative_prompt is empty: leave it out to use the learned null condition")
                uncond = self.encode_prompts([negative_prompt] * len(repeated))
            else:
                uncond = self.unet.null_condition(len(repeated))
            return len(repeated), cond, uncond
        if prompts:
            raise PipelineError(
                f"this model was trained on '{self.metadata.get('dataset')}' without text conditioning: "
                "--prompt cannot be used (drop --prompt / --text_conditional)"
            )
        if negative_prompt is not None:
            raise PipelineError("--negative_prompt needs a text-conditional model")
        if self.conditioning == "class":
            if not labels:
                raise PipelineError("this model is class-conditional: give class labels (--class_label)")
            num_classes = self.num_trained_classes
            for label in labels:
                if not 0 <= label < num_classes:
                    names = self.metadata.get("class_names") or []
                    known = f" ({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})" if names else ""
                    raise PipelineError(f"class label {label} is out of range: the model was trained on classes "
                                        f"0 .. {num_classes - 1}{known}")
            repeated = torch.tensor([c for c in labels for _ in range(n)], dtype=torch.long, device=self.device)
            return len(repeated), Condition(labels=repeated), self.unet.null_condition(len(repeated))
        if labels:
            raise PipelineError("--class_label needs a class-conditional model")
        return n, None, None

    # --------------------------------------------------------------------------------------------- sampling

    @torch.no_grad()
    def sample_latents(
        self,
        batch_size: int,
        cond: Optional[Condition],
        uncond: Optional[Condition],
        sampler: str = "ddim",
        num_steps: Optional[int] = None,
        guidance_scale: float = 1.0,
        eta: float = 0.0,
        generator: Generators = None,
        progress: bool = False,
        guidance_rescale: float = 0.0,
    ) -> torch.Tensor:
        """Scaled latents z_0 (B, C, h, w) from pure noise. num_steps None: the sampler's default (DEFAULT_STEPS, at
        most the model's number of timesteps)."""
        if sampler not in SAMPLERS:
            raise PipelineError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
        guidance_scale = self.guidance_used(guidance_scale)
        shape = self.latent_shape(batch_size)
        common = dict(cond=cond, uncond=uncond, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                      generator=generator, device=self.device, progress=progress)
        if sampler == "ddpm":
            return ddpm_sample(self.unet, self.process, shape, **common)
        steps = self.sampler_steps(sampler, num_steps)
        if sampler == "dpmpp_2m":
            return dpmpp_2m_sample(self.unet, self.process, shape, num_steps=steps, **common)
        return ddim_sample(self.unet, self.process, shape, num_steps=steps, eta=eta, **common)

    def guidance_used(self, guidance_scale: float) -> float:
        """The guidance scale sampling applies: 1 (off: nothing to guide towards) for an unconditional model."""
        return 1.0 if self.conditioning == "none" else guidance_scale

    def sampler_steps(self, sampler: str, num_steps: Optional[int] = None) -> int:
        """The UNet evaluations per image `sampler` makes: every timestep for DDPM; otherwise `num_steps`, or the
        sampler's default, which never asks for more steps than the model has timesteps. An explicit count above
        them is a PipelineError, so a script can check it before hours of other work."""
        T = self.process.num_timesteps
        if sampler == "ddpm":
            return T
        if num_steps is None:
            return min(DEFAULT_STEPS[sampler], T)
        if not 1 <= num_steps <= T:
            raise PipelineError(f"--num_steps {num_steps}: this model has {T} training timesteps, so {sampler} "
                                f"takes 1 to {T} steps")
        return num_steps

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1]: Decoder(z / scaling_factor)."""
        z = z / self.scaling_factor
        return self.vae.decode_latent(z.to(self.vae.decoder.conv_in.weight.dtype)).float().clamp(-1, 1)

    @torch.no_grad()
    def generate(
        self,
        prompts: Optional[list[str]] = None,
        labels: Optional[list[int]] = None,
        num_per_condition: int = 1,
        negative_prompt: Optional[str] = None,
        sampler: str = "ddim",
        num_steps: Optional[int] = None,
        guidance_scale: float = 4.0,
        eta: float = 0.0,
        seed: Optional[int] = 0,
        generator: Generators = None,
        progress: bool = False,
        guidance_rescale: float = 0.0,
        sample_indices: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1], `num_per_condition` per prompt / label, in prompt order.

        The same seed on the same device and dtype gives the same images. Each image has its own noise, seeded by
        sample_seed(seed, index): image j of every prompt / label has index j, unless `sample_indices` (one per
        image) says otherwise. So image j stays the same when the number of images or of prompts changes, or the
        batch is split; a `generator` instead draws the whole batch's noise from one stream.
        """
        batch, cond, uncond = self.conditions(prompts, labels, num_per_condition, negative_prompt)
        if uncond is not None and guidance_scale != 1.0 and negative_prompt is None:
            self.warn_if_null_untrained(guidance_scale)
        if generator is None and seed is not None:
            indices = [i % num_per_condition for i in range(batch)] if sample_indices is None else list(sample_indices)
            if len(indices) != batch:
                raise PipelineError(f"{len(indices)} sample indices for {batch} images")
            generator = sample_generators(seed, indices, self.device)
        z = self.sample_latents(
            batch, cond, uncond, sampler, num_steps, guidance_scale, eta, generator, progress, guidance_rescale
        )
        check_finite(z, self.unet.conv_in.weight.dtype)
        return self.decode(z)


    def warn_if_null_untrained(self, guidance_scale: float) -> None:
        """Guidance extrapolates away from the learned null condition, which only cfg_dropout_prob > 0 trains: with
        0 it is still its random initialisation (said once per pipeline)."""
        if self.metadata.get("training_config", {}).get("cfg_dropout_prob", 1.0) > 0 or self._warned_null:
            return
        self._warned_null = True
        logger.warning("this model was trained with cfg_dropout_prob 0, so its null condition never trained: guidance "
                       "(scale %g) steers away from an untrained embedding. Sample with --guidance_scale 1%s",
                       guidance_scale, " or a --negative_prompt" if self.conditioning == "text" else "")


def sample_generators(seed: int, indices: Sequence[int], device) -> list[torch.Generator]:
    """One generator per sample, on `device`, seeded by sample_seed(seed, index): the samplers' per-image noise."""
    return [torch.Generator(device=device).manual_seed(sample_seed(seed, i)) for i in indices]


def sample_seed(seed: int, index: int) -> int:
    """The noise seed of sample `index` of a run seeded with `seed`: a 32-bit offset hashed from `seed`, plus
    `index`. The samples of one run never share a seed, and runs with other seeds draw other samples (with
    seed + index, seed 1's sample 0 was seed 0's sample 1). 32 bits: a CPU generator ignores the higher ones."""
    offset = int.from_bytes(hashlib.sha256(f"ldm-sample-seed:{seed}".encode()).digest()[:4], "little")
    return (offset + index) % 2**32


def usable_device(name: str | torch.device) -> torch.device:
    """`name` ("cuda", "cuda:1", "mps", "cpu") as a device this machine has, or a PipelineError in one line (torch
    would raise a driver traceback, or "invalid device ordinal" only at the first kernel)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PipelineError(f"--device {name}: not a device name (expected cuda, cuda:N, mps or cpu)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise PipelineError(f"--device {name}: no CUDA GPU is available here (use --device cpu)")
        if device.index is not None and device.index >= count:
            raise PipelineError(f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0 .. cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise PipelineError(f"--device {name}: MPS (Apple GPU) is not available here (use --device cpu)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise PipelineError(f"--device {name}: expected cuda, cuda:N, mps or cpu")
    return device


def check_finite(z: torch.Tensor, dtype: torch.dtype) -> None:
    """Sampled latents (B, C, h, w) with inf / NaN would decode to black images without a word: a PipelineError."""
    bad = int((~torch.isfinite(z)).flatten(1).any(1).sum())
    if bad == 0:
        return
    hint = ("the UNet overflowed float16's range (65504): sample with --dtype bfloat16 or float32"
            if dtype == torch.float16 else "check the weights and a very large --guidance_scale")
    raise PipelineError(f"sampling gave inf / NaN in {bad} of {len(z)} images: {hint}")


def check_prompts(prompts: list[str]) -> None:
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise PipelineError(f"prompt {i + 1} is empty: give a description of the image, e.g. --prompt \"a red circle\"")


# ----------------------------------------------------------------------------------------------------- files


def stage2_metadata(
    model_cfg: ModelConfig,
    train_cfg: Stage2TrainConfig,
    process: DiffusionProcess,
    dataset: str,
    conditioning: str,
    scaling_factor: float,
    text_model: Optional[str],
    extra: Optional[dict] = None,
) -> dict:
    """What model.safetensors of stage 2 carries besides the weights: enough to sample with nothing else."""
    meta = {
        "stage": STAGE,
        "model_config": to_dict(model_cfg),
        "training_config": to_dict(train_cfg),
        "diffusion": process.to_dict(),
        "dataset": dataset,
        "conditioning": conditioning,
        "scaling_factor": float(scaling_factor),
        "text_model": text_model,
    }
    meta.update(extra or {})
    return meta


def save_stage2_model(path, unet: UNet, vae: Autoencoder, metadata: dict) -> Path:
    """working_directory/model.safetensors: 'unet.*' (the EMA weights, passed in) and 'vae.*', configs in metadata."""
    return save_models(path, {"unet": unet, "vae": vae}, metadata)


def read_stage2_metadata(path) -> tuple[dict, dict]:
    """(tensors by prefix, metadata) of a stage-2 model file, with a clear error for anything else."""
    tensors, meta = load_models(path)
    if meta.get("stage") != STAGE or "unet" not in tensors:
        what = "a stage-1 autoencoder" if meta.get("stage") == 1 else "not a stage-2 model"
        raise PipelineError(
            f"{path} is {what}: pass the model.safetensors written by stage2_diffusion_trainer.py "
            "(its working_directory/model.safetensors)"
        )
    return tensors, meta


def load_pipeline(
    path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    text_encoder: Optional[str] = None,
    hf_cache_dir: Optional[str] = None,
    load_text_encoder: bool = True,
    vae_path: Optional[str] = None,
    vae_dtype: Optional[torch.dtype] = None,
) -> LatentDiffusion:
    """Rebuild the pipeline from a stage-2 model.safetensors. `text_encoder` overrides the stored text model name
    (a local folder, say); `vae_path` decodes with another autoencoder of the same latent space (our stage-1 file
    or a diffusers AutoencoderKL folder). The VAE runs in `vae_dtype`, by default `dtype`, but fp32 when dtype is
    float16 (its decoder overflows in fp16); the text encoder runs in `dtype`, but fp32 when that is float16, as in
    training (T5's feed-forward overflows in fp16; transformers keeps it in fp32 for that reason)."""
    device = usable_device(device)
    tensors, meta = read_stage2_metadata(path)
    model_cfg = from_dict(ModelConfig, meta["model_config"], f"{path} metadata 'model_config'")
    conditioning = meta["conditioning"]
    vae = build_autoencoder(model_cfg.vae)
    vae.load_state_dict(tensors["vae"])
    if vae_path is not None:
        vae = replacement_vae(vae_path, model_cfg.vae)
    unet = build_unet(model_cfg.unet, model_cfg.vae.latent_dim, conditioning)
    unet.load_state_dict(tensors["unet"])
    if vae_dtype is None:
        vae_dtype = torch.float32 if dtype == torch.float16 else dtype
    vae = vae.to(device=device, dtype=vae_dtype).eval().requires_grad_(False)
    unet = unet.to(device=device, dtype=dtype).eval().requires_grad_(False)
    encoder = None
    if conditioning == "text" and load_text_encoder:
        try:
            encoder = load_text_encoder_for(text_encoder or meta["text_model"], model_cfg.unet.text_embed_dim,
                                            hf_cache_dir)
        except FileNotFoundError as err:
            if text_encoder is not None:
                raise
            raise FileNotFoundError(f"{err} -- this is the text model named in {path}: if it has moved, pass its "
                                    "folder with --text_encoder") from err
        if text_encoder is not None:
            warn_if_other_text_model(text_encoder, meta["text_model"], path)
        encoder = encoder.to(device=device, dtype=torch.float32 if dtype == torch.float16 else dtype)
    return LatentDiffusion(
        vae=vae,
        unet=unet,
        process=DiffusionProcess.from_dict(meta["diffusion"]),
        conditioning=conditioning,
        scaling_factor=float(meta["scaling_factor"]),
        text_encoder=encoder,
        metadata=meta,
    )


def replacement_vae(path, stored: VAEConfig) -> Autoencoder:
    """The autoencoder at `path`, checked to decode the stored VAE's latents (same channels and downsampling)."""
    vae, _ = load_vae_backbone(path, img_size=stored.img_size)
    kinds = {False: "a KL autoencoder", True: "a VQ autoencoder"}
    if vae.config.quantize != stored.quantize:  # the decoder would read another kind of latent space
        raise PipelineError(f"{path} is {kinds[vae.config.quantize]}, but the model was trained on the latents of "
                            f"{kinds[stored.quantize]}: it can't decode them")
    got = (vae.config.latent_dim, vae.config.downsample_factor)
    if got != (stored.latent_dim, stored.downsample_factor):
        raise PipelineError(
            f"the VAE in {path} has {got[0]}-channel latents at 1/{got[1]} resolution, but the model was trained on "
            f"{stored.latent_dim}-channel latents at 1/{stored.downsample_factor}: it can't decode them"
        )
    return vae


def warn_if_other_text_model(given: str, trained_with: str, path) -> None:
    """--text_encoder is meant for the training text model moved elsewhere; another model of the same width loads
    too, and the UNet then reads embeddings it never saw."""
    from .models.text_encoder import same_text_model

    moved = Path(trained_with).is_absolute() or trained_with.startswith((".", "~")) or trained_with.count("/") > 1
    if moved and not Path(trained_with).expanduser().exists():
        return  # a folder that is gone: nothing to compare with
    if not same_text_model(given, trained_with):
        logger.warning("--text_encoder %s does not look like %s, the text model %s was trained with (another "
                       "config.json or name): the UNet reads embeddings it never saw", given, trained_with, path)


def load_text_encoder_for(name_or_path: str, expected_dim: int, cache_dir: Optional[str] = None):
    """The frozen text encoder, checked against the UNet's text_embed_dim."""
    from .models.text_encoder import TextEncoder, resolve_text_model

    encoder = TextEncoder(resolve_text_model(name_or_path), cache_dir=cache_dir)
    if encoder.hidden_size != expected_dim:
        raise PipelineError(
            f"text encoder {name_or_path} gives {encoder.hidden_size}-d embeddings but unet.text_embed_dim is "
            f"{expected_dim}: set text_embed_dim: {encoder.hidden_size} in the model config, or use another encoder"
        )
    return encoder.eval().requires_grad_(False)
