"""Saving PNG grids of image tensors in [-1, 1], and checking an output folder before the work that fills it."""

from __future__ import annotations

import tempfile
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


def writable_folder(path) -> Path:
    """Create `path` and check that a file can be written there, before sampling or evaluating for hours: a
    read-only or misspelt output folder must fail at the start, not lose a finished result at the end."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ValueError(f"cannot write to the output folder {path}: {err}") from err
    return path
