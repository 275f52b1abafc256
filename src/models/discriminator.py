"""PatchGAN discriminator (pix2pix's NLayerDiscriminator, Isola et al. 2017, "Image-to-Image Translation with
Conditional Adversarial Networks", App. 6.1.2).

    disc = build_discriminator(train_cfg)        # from Stage1TrainConfig's disc_* keys
    logits = disc(x)                             # (B, 3, H, W) -> (B, 1, h, w): one real/fake logit per patch

conv(stride 2, no norm) + LeakyReLU, then `depth - 1` stride-2 convs and one stride-1 conv with BatchNorm and
LeakyReLU, channels doubling from `start_dim` up to 8 x start_dim, then a conv to one channel. Weights are drawn
from N(0, 0.02) and BatchNorm scales from N(1, 0.02), as in pix2pix.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import Stage1TrainConfig


class NLayerDiscriminator(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,
        start_dim: int = 64,
        depth: int = 3,
        kernel_size: int = 4,
        leaky_relu: float = 0.2,
    ):
        super().__init__()
        pad = (kernel_size - 1) // 2  # 1 for pix2pix's 4x4 kernels
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, start_dim, kernel_size, stride=2, padding=pad),
            nn.LeakyReLU(leaky_relu, inplace=True),
        ]
        mult = 1
        for n, stride in zip(range(1, depth + 1), conv_strides(depth)[1:-1]):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(start_dim * prev, start_dim * mult, kernel_size, stride=stride, padding=pad, bias=False),
                nn.BatchNorm2d(start_dim * mult),
                nn.LeakyReLU(leaky_relu, inplace=True),
            ]
        layers.append(nn.Conv2d(start_dim * mult, 1, kernel_size, stride=1, padding=pad))
        self.main = nn.Sequential(*layers)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (B, 1, h, w) patch logits


def conv_strides(depth: int) -> list[int]:
    """Strides of the depth + 2 convs: 2 (first), 2 x (depth - 1), then 1 (the last hidden conv keeps the
    resolution) and 1 (the logit conv)."""
    return [2] + [2] * (depth - 1) + [1, 1]


def patch_map_size(img_size: int, depth: int, kernel_size: int) -> int:
    """Side of the logit map for img_size x img_size images; 0 when a conv would see an input smaller than its
    kernel (the forward pass fails there)."""
    pad = (kernel_size - 1) // 2
    size = img_size
    for stride in conv_strides(depth):
        if size + 2 * pad < kernel_size:
            return 0
        size = (size + 2 * pad - kernel_size) // stride + 1
    return size


def init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_discriminator(cfg: Stage1TrainConfig, in_channels: int = 3) -> NLayerDiscriminator:
    return NLayerDiscriminator(in_channels, cfg.disc_start_dim, cfg.disc_depth, cfg.disc_kernel_size, cfg.disc_leaky_relu)


def sync_batchnorm_if_distributed(disc: nn.Module, num_processes: int, device: torch.device) -> nn.Module:
    """BatchNorm -> SyncBatchNorm when several processes train on accelerators (PyTorch's SyncBatchNorm only
    runs on GPU/XPU; CPU multi-process runs keep per-process BatchNorm)."""
    if num_processes > 1 and device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(disc)
    return disc
