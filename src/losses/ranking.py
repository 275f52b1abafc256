"""The LPIPS ranking loss: a small network turns the two distances of a 2AFC triplet into the probability
that a person prefers p1, trained with binary cross-entropy against the judges' fraction (Zhang et al. 2018,
Sec. 3.3, "G" in Fig. 3).

    head = RankingHead(middle_channels=32)
    loss = ranking_loss(head(d0, d1), judge)     # d0 = d(ref, p0), d1 = d(ref, p1), judge in [0, 1]

judge = fraction of observers who preferred p1 (0: everyone preferred p0). A larger d0 should raise the
predicted probability of p1.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

RATIO_EPS = 0.1


def ranking_features(d0: torch.Tensor, d1: torch.Tensor, eps: float = RATIO_EPS) -> torch.Tensor:
    """(B,), (B,) -> (B, 5, 1, 1): (d0, d1, d0 - d1, d0 / (d1 + eps), d1 / (d0 + eps))."""
    feats = torch.stack([d0, d1, d0 - d1, d0 / (d1 + eps), d1 / (d0 + eps)], dim=1)  # (B, 5)
    return feats[:, :, None, None]


class RankingHead(nn.Module):
    """1x1 convs 5 -> middle -> middle -> 1 with LeakyReLU(0.2); returns logits (B,) of P(p1 preferred)."""

    def __init__(self, middle_channels: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(5, middle_channels, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(middle_channels, middle_channels, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(middle_channels, 1, 1),
        )

    def forward(self, d0: torch.Tensor, d1: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=d0.device.type, enabled=False):  # small net: keep it in fp32
            return self.net(ranking_features(d0.float(), d1.float())).flatten()  # (B,)


def ranking_loss(logits: torch.Tensor, judge: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy between sigmoid(logits) (B,) and the judge fraction (B,), in fp32.

    BCE(p, h) = -[h log p + (1 - h) log(1 - p)], p = sigmoid(logit); the logits form is the stable one.
    """
    return F.binary_cross_entropy_with_logits(logits.float(), judge.float())
