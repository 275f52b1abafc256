"""Saving PNG grids of image tensors in [-1, 1]."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import make_grid

from ..data.transforms import to_pil_images


def save_image_grid(images: torch.Tensor, path, nrow: int) -> Path:
    """Save a (B, 3, H, W) tensor in [-1, 1] as one PNG grid with `nrow` images per row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=nrow, padding=2, pad_value=1.0)
    to_pil_images(grid[None])[0].save(path)
    return path
