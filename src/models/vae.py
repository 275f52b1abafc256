"""The stage-1 autoencoder: a KL-regularised VAE, or a VQ-VAE when `quantize: True` (Rombach et al. 2022, App. G).

    vae = build_autoencoder(model_cfg.vae)
    out = vae(x)                          # x (B, 3, H, W) in [-1, 1] -> out.reconstruction, out.posterior / out.quant
    mean, std = vae.latent_moments(x)     # (B, latent_dim, H/f, W/f) each; what stage 2 diffuses
    x_hat = vae.decode_latent(z)          # (B, latent_dim, h, w) -> (B, 3, H, W); VQ quantises z first
    vae = load_autoencoder("work_dir/vae/model.safetensors")

Module names follow diffusers' AutoencoderKL / VQModel (encoder.down_blocks.i.resnets.j, encoder.mid_block.
attentions.0, quant_conv, quantize.embedding, post_quant_conv, decoder.up_blocks.i.upsamplers.0, ...), so
converting weights to and from diffusers is a renaming of keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig, VAEConfig, from_dict
from .layers import Downsample2D, ResnetBlock2D, SpatialSelfAttention, Upsample2D, group_norm
from .quantizer import QuantizerOutput, VectorQuantizer

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def _fp16_autocast(device: str) -> bool:
    if device not in ("cuda", "cpu", "xpu", "mps"):  # e.g. "meta": no autocast
        return False
    return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))) from the encoder's (B, 2C, h, w) moments; logvar clamped to [-30, 20]."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.float().chunk(2, dim=1)  # (B, C, h, w) each
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Reparameterised sample z = mean + std * eps (Kingma & Welling 2014, Eq. 10)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per latent element, (B, C, h, w): 0.5 (mu^2 + sigma^2 - 1 - log sigma^2)
        (Kingma & Welling 2014, App. B); sum over the last three dims for the per-image KL."""
        return 0.5 * (self.mean**2 + self.logvar.exp() - 1.0 - self.logvar)


@dataclass
class AutoencoderOutput:
    reconstruction: torch.Tensor  # (B, 3, H, W)
    posterior: Optional[DiagonalGaussian]  # KL autoencoder
    quant: Optional[QuantizerOutput]  # VQ-VAE


# --------------------------------------------------------------------------------------------------------------
# Blocks (diffusers: DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D)
# --------------------------------------------------------------------------------------------------------------


class DownEncoderBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, num_layers: int, downsample: bool, cfg: VAEConfig):
        super().__init__()
        g, eps = cfg.groupnorm_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(cin if i == 0 else cout, cout, g, eps) for i in range(num_layers)]
        )
        down = [Downsample2D(cout, cfg.vae_up_down_kernel_size, cfg.vae_up_down_factor, asymmetric_pad=True)]
        self.downsamplers = nn.ModuleList(down if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for down in self.downsamplers:
            x = down(x)  # (B, C, H / factor, W / factor)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, num_layers: int, upsample: bool, cfg: VAEConfig):
        super().__init__()
        g, eps = cfg.groupnorm_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(cin if i == 0 else cout, cout, g, eps) for i in range(num_layers)]
        )
        up = [Upsample2D(cout, cfg.vae_up_down_kernel_size, cfg.vae_up_down_factor)]
        self.upsamplers = nn.ModuleList(up if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for up in self.upsamplers:
            x = up(x)  # (B, C, H * factor, W * factor)
        return x


class MidBlock2D(nn.Module):
    """resnet, then (attention, resnet) x attention_layers, at the lowest resolution."""

    def __init__(self, channels: int, cfg: VAEConfig):
        super().__init__()
        g, eps = cfg.groupnorm_groups, cfg.norm_eps
        n = cfg.attention_layers
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, g, eps) for _ in range(n + 1)])
        self.attentions = nn.ModuleList(
            [SpatialSelfAttention(channels, g, eps, residual=cfg.attention_residual_connections) for _ in range(n)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x))
        return x


# --------------------------------------------------------------------------------------------------------------
# Encoder / decoder
# --------------------------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """conv_in -> down blocks (stride-2 between resolutions) -> mid block -> GroupNorm+SiLU -> conv_out."""

    def __init__(self, cfg: VAEConfig, out_channels: int):
        super().__init__()
        ch = cfg.vae_channels_per_block
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [
                DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.residual_layers_per_block, i < len(ch) - 1, cfg)
                for i in range(len(ch))
            ]
        )
        self.mid_block = MidBlock2D(ch[-1], cfg)
        self.conv_norm_out = group_norm(ch[-1], cfg.groupnorm_groups, cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[-1], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, C0, H, W)
        for block in self.down_blocks:
            h = block(h)  # (B, Ci, H / f_i, W / f_i)
        h = self.mid_block(h)  # (B, C_last, h, w)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, out_channels, h, w)


class Decoder(nn.Module):
    """Mirror of the encoder with one more resnet per resolution (as in LDM and diffusers)."""

    def __init__(self, cfg: VAEConfig, in_channels: int):
        super().__init__()
        ch = list(reversed(cfg.vae_channels_per_block))
        self.conv_in = nn.Conv2d(in_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock2D(ch[0], cfg)
        self.up_blocks = nn.ModuleList(
            [
                UpDecoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.residual_layers_per_block + 1, i < len(ch) - 1, cfg)
                for i in range(len(ch))
            ]
        )
        self.conv_norm_out = group_norm(ch[-1], cfg.groupnorm_groups, cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))  # (B, C_last, h, w)
        for block in self.up_blocks:
            h = block(h)  # (B, Ci, ...) upsampled between resolutions
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 3, H, W)


# --------------------------------------------------------------------------------------------------------------
# Autoencoder
# --------------------------------------------------------------------------------------------------------------


class Autoencoder(nn.Module):
    """Encoder -> [quant_conv] -> posterior sample (KL) or codebook lookup (VQ) -> [post_quant_conv] -> decoder."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        L = cfg.latent_channels
        if cfg.quantize:
            # encoder emits latent_channels; quant_conv projects to the codebook's vq_embed_dim
            enc_out = L if cfg.post_encoder_latent_proj else cfg.vq_embed_dim
            self.quant_conv = nn.Conv2d(L, cfg.vq_embed_dim, 1) if cfg.post_encoder_latent_proj else None
            self.quantize = VectorQuantizer(cfg.codebook_size, cfg.vq_embed_dim, cfg.commitment_beta, cfg.codebook_reset_steps)
        else:
            enc_out = 2 * L  # mean and log-variance
            self.quant_conv = nn.Conv2d(2 * L, 2 * L, 1) if cfg.post_encoder_latent_proj else None
            self.quantize = None
        dec_in = L if cfg.pre_decoder_latent_proj else cfg.latent_dim
        self.post_quant_conv = nn.Conv2d(cfg.latent_dim, L, 1) if cfg.pre_decoder_latent_proj else None
        self.encoder = Encoder(cfg, enc_out)
        self.decoder = Decoder(cfg, dec_in)

    # -- encoding --------------------------------------------------------------------------------------------
    def encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> moments (B, 2C, h, w) for KL, or the pre-quantisation latent (B, D, h, w) for VQ."""
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """The posterior q(z|x) of the KL autoencoder."""
        if self.quantize is not None:
            raise ValueError("encode() returns a Gaussian posterior: this autoencoder is a VQ-VAE (quantize: True)")
        return DiagonalGaussian(self.encode_raw(x))

    def latent_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the latent, each (B, latent_dim, H/f, W/f). VQ: (pre-quantisation latent, zeros)."""
        if self.quantize is not None:
            z = self.encode_raw(x).float()
            return z, torch.zeros_like(z)
        posterior = self.encode(x)
        return posterior.mean, posterior.std

    # -- decoding --------------------------------------------------------------------------------------------
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode an already-quantised (VQ) or sampled (KL) latent (B, latent_dim, h, w) -> (B, 3, H, W)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Stage 2's decoder: (B, latent_dim, h, w) -> (B, 3, H, W); a VQ-VAE snaps z to its codebook first.

        Under fp16 autocast the decoder runs in fp32: its large activations overflow fp16's range."""
        if self.quantize is not None:
            z = self.quantize.lookup(z)
        device = z.device.type
        if _fp16_autocast(device):
            with torch.autocast(device, enabled=False):
                return self.decode(z.float().to(self.decoder.conv_in.weight.dtype))
        return self.decode(z.to(self.decoder.conv_in.weight.dtype))

    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's output conv: where the adaptive GAN weight compares gradients."""
        return self.decoder.conv_out.weight

    # -- training forward ------------------------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, sample: bool = True, generator: Optional[torch.Generator] = None
    ) -> AutoencoderOutput:
        """Reconstruct x (B, 3, H, W). KL: decode a posterior sample (mode when `sample` is False). `generator`
        draws the KL posterior's noise, or the VQ codebook's re-seeding (training only)."""
        raw = self.encode_raw(x)
        if self.quantize is not None:
            quant = self.quantize(raw, generator)  # its dead-code re-seeding draws from `generator`
            return AutoencoderOutput(self.decode(quant.z_q), None, quant)
        posterior = DiagonalGaussian(raw)
        z = posterior.sample(generator) if sample else posterior.mode()
        return AutoencoderOutput(self.decode(z.to(raw.dtype)), posterior, None)


def build_autoencoder(cfg: VAEConfig) -> Autoencoder:
    cfg.check()  # a config built in code, not loaded (from_dict checks at load)
    return Autoencoder(cfg)


def load_autoencoder(path, device: str | torch.device = "cpu") -> Autoencoder:
    """Rebuild the autoencoder from a model.safetensors of stage 1 or stage 2 (prefix 'vae'), in eval mode."""
    from .serialization import load_models

    tensors, meta = load_models(path, device)
    if "vae" not in tensors or "model_config" not in meta:
        raise ValueError(f"{path} holds no autoencoder (expected 'vae.*' weights and 'model_config' metadata)")
    model_cfg = from_dict(ModelConfig, meta["model_config"], f"{path} metadata 'model_config'")
    vae = build_autoencoder(model_cfg.vae)
    vae.load_state_dict(tensors["vae"])
    return vae.to(device).eval()
