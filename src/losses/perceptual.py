"""The frozen perceptual network of the stage-1 loss, chosen by the training config.

    net = build_perceptual_loss(train_cfg)     # None when use_lpips is False
    d = net(x, x_hat)                          # (B,) LPIPS distances, inputs in [-1, 1]

Sources, in order of precedence:
  * `lpips_checkpoint: <path>`   the project's own LPIPS written by lpips_trainer.py (self-contained file)
  * `use_lpips_package: True`    the `lpips` package's network (official weights; needs torchvision's ImageNet
                                 VGG16 file in the torch hub cache, checked first: nothing is downloaded)
  * otherwise                    our LPIPS with the official v0.1 linear weights and the ImageNet VGG16 trunk
Whatever the source, the network is frozen and in eval mode.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn as nn

from ..config import Stage1TrainConfig

logger = logging.getLogger(__name__)


class PackageLPIPS(nn.Module):
    """`lpips.LPIPS(net='vgg')` behind the project's contract: forward(x, y) -> (B,) for inputs in [-1, 1]."""

    def __init__(self):
        super().__init__()
        import lpips

        from ..models.lpips import imagenet_vgg16_path

        imagenet_vgg16_path()  # FileNotFoundError naming the file and folder, before lpips would download it
        self.net = lpips.LPIPS(net="vgg", verbose=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(x, y, normalize=False).view(x.shape[0])  # (B,)


def freeze(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


def build_perceptual_loss(cfg: Stage1TrainConfig) -> Optional[nn.Module]:
    """The frozen LPIPS network `cfg` asks for, or None (with a warning) when use_lpips is False."""
    if not cfg.use_lpips:
        logger.warning(
            "use_lpips is False: training on the reconstruction loss alone (plus the GAN when enabled); "
            "expect blurry reconstructions"
        )
        return None
    if cfg.lpips_checkpoint:
        from ..models.lpips import load_lpips_checkpoint

        return freeze(load_lpips_checkpoint(cfg.lpips_checkpoint))
    if cfg.use_lpips_package:
        return freeze(PackageLPIPS())
    from ..models.lpips import lpips_with_official_weights

    return freeze(lpips_with_official_weights())
