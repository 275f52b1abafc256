"""Dataset registry: `build_dataset(name, ...)` and the conditioning each dataset implies.

    celebahq             a folder of images, searched recursively          -> unconditional
    imagenet             class subfolders (sorted), items carry 'label'    -> class-conditional
    shapes               built-in procedural shapes with captions          -> text-conditional
    conceptual_captions  the Hugging Face dataset folder made by prep_cc.py -> text-conditional
"""

from __future__ import annotations

from typing import Callable, Optional

from torch.utils.data import Dataset

from ..config import TrainConfig
from .image_folder import ClassFolderDataset, DatasetError, ImageFolderDataset
from .shapes import ShapesDataset

# dataset name -> "none" | "class" | "text"
CONDITIONING: dict[str, str] = {
    "celebahq": "none",
    "imagenet": "class",
    "shapes": "text",
    "conceptual_captions": "text",
}


def _celebahq(path, img_size: int, cfg: TrainConfig) -> Dataset:
    return ImageFolderDataset(path, img_size, cfg.interpolation)


def _imagenet(path, img_size: int, cfg: TrainConfig) -> Dataset:
    return ClassFolderDataset(path, img_size, cfg.interpolation)


def _shapes(path, img_size: int, cfg: TrainConfig) -> Dataset:
    return ShapesDataset(cfg.shapes_num_images, img_size, seed=cfg.seed, interpolation=cfg.interpolation)


def _conceptual_captions(path, img_size: int, cfg: TrainConfig) -> Dataset:
    from .conceptual_captions import build_conceptual_captions

    return build_conceptual_captions(path, img_size, cfg)


BUILDERS: dict[str, Callable[[Optional[str], int, TrainConfig], Dataset]] = {
    "celebahq": _celebahq,
    "imagenet": _imagenet,
    "shapes": _shapes,
    "conceptual_captions": _conceptual_captions,
}
DATASET_NAMES = sorted(BUILDERS)


def build_dataset(name: str, path: Optional[str], img_size: int, cfg: TrainConfig) -> Dataset:
    if name not in BUILDERS:
        raise DatasetError(f"unknown dataset '{name}': choose one of {DATASET_NAMES}")
    return BUILDERS[name](path, img_size, cfg)


__all__ = ["CONDITIONING", "DATASET_NAMES", "DatasetError", "build_dataset"]
