"""Per-image reconstruction quality of a stage-1 autoencoder: PSNR, SSIM and LPIPS (rFID comes from fid.py).

    rows = reconstruction_rows(vae, images, inception, lpips)    # (B, 2048 + 3): features of x_hat, PSNR, SSIM, LPIPS

The reconstruction decodes the posterior mode (KL; the codebook lookup for VQ), so it is deterministic. PSNR and
SSIM compare the images as they would be saved (uint8 levels) scaled to [0, 1]:
    PSNR = 10 log10(1 / MSE)                                   (per image, in dB)
    SSIM: Wang et al. 2004, eq. 13, Gaussian window 11 x 11, sigma 1.5 (torchmetrics' implementation)
LPIPS is our network (src/models/lpips.py) on the [-1, 1] images.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..models.vae import Autoencoder
from .inception import to_uint8

METRIC_NAMES = ("psnr", "ssim", "lpips")
MIN_MSE = 1e-10  # PSNR of a perfect reconstruction is capped at 100 dB


@torch.no_grad()
def reconstruct(vae: Autoencoder, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> the deterministic reconstruction, clamped to [-1, 1]."""
    device = vae.decoder.conv_in.weight.device
    out = vae(images.to(device), sample=False).reconstruction if vae.quantize is None else vae(images.to(device)).reconstruction
    return out.float().clamp(-1, 1)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB of images in [0, 1]."""
    mse = (x - y).pow(2).mean(dim=(1, 2, 3)).clamp_min(MIN_MSE)
    return 10.0 * torch.log10(1.0 / mse)


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) SSIM of images in [0, 1]."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(x, y, data_range=1.0, reduction="none")


@torch.no_grad()
def reconstruction_rows(
    vae: Autoencoder, images: torch.Tensor, inception: Optional[nn.Module], lpips: nn.Module,
    with_originals: bool = False,
) -> torch.Tensor:
    """(B, D + 3 [+ D]): Inception features of the reconstructions, PSNR, SSIM and LPIPS against the originals,
    and with `with_originals` the originals' features too (one Inception pass over both). Without `inception`
    (no rFID): (B, 3), the scores alone."""
    images = images.to(vae.decoder.conv_in.weight.device).float()  # (B, 3, H, W)
    recon = reconstruct(vae, images)
    x01, y01 = to_uint8(images).float() / 255.0, to_uint8(recon).float() / 255.0
    scores = torch.stack([psnr(y01, x01), ssim(y01, x01), lpips(recon, images).view(-1)], dim=1)  # (B, 3)
    if inception is None:
        return scores.float().cpu()
    features = inception(torch.cat([recon, images]) if with_originals else recon).float().cpu()  # (B or 2B, D)
    b = images.shape[0]
    parts = [features[:b], scores.float().cpu()] + ([features[b:]] if with_originals else [])
    return torch.cat(parts, dim=1)
