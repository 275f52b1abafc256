"""Folder datasets: `celebahq` (any folder of images, searched recursively) and `imagenet` (class subfolders)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from torch.utils.data import Dataset

from .transforms import IMAGE_ERRORS, ImageTransform, load_image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}


class DatasetError(ValueError):
    """A dataset path that cannot be used (missing, empty, wrong layout)."""


def is_hidden(name: str) -> bool:
    """A file or folder name that tools, not people, put in a dataset: `.ipynb_checkpoints/` (copies of images),
    macOS `._x.jpg` resource forks and `.DS_Store`, `.git/`."""
    return name.startswith(".")


def find_images(root: Path) -> list[Path]:
    """Image files below `root`, sorted. Anything below a hidden file or folder name is skipped, and counted in a
    log line: a notebook's `.ipynb_checkpoints/` holds copies of images, and a macOS `._x.jpg` is no image."""
    images, hidden = [], 0
    for p in root.rglob("*"):
        if p.suffix.lower() not in IMAGE_EXTENSIONS or not p.is_file():
            continue
        if any(is_hidden(part) for part in p.relative_to(root).parts):
            hidden += 1
        else:
            images.append(p)
    if hidden:
        logger.info("skipped %d image file(s) below hidden names (starting with '.') in %s", hidden, root)
    return sorted(images)


def _check_root(root) -> Path:
    if root is None:
        raise DatasetError("this dataset needs --path_to_dataset")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    return root


class SafeImageDataset(Dataset):
    """Base class: `__getitem__` returns None (after one warning naming the file) for an unreadable image.

    The collate function drops the None entries and counts them, so one bad file never stops training.
    """

    def __init__(self, paths: list[Path], transform: ImageTransform):
        self.paths = paths
        self.transform = transform
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int):
        try:
            return self.transform(load_image(self.paths[index]))
        except IMAGE_ERRORS as err:
            if index not in self._warned:
                self._warned.add(index)
                logger.warning("skipping unreadable image %s: %s", self.paths[index], err)
            return None


class ImageFolderDataset(SafeImageDataset):
    """Every image below `root` (recursively), unconditional: items are {'image'}."""

    def __init__(self, root, img_size: int, interpolation: str = "bicubic"):
        root = _check_root(root)
        paths = find_images(root)
        if not paths:
            raise DatasetError(f"no images found in {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
        super().__init__(paths, ImageTransform(img_size, interpolation))

    def __getitem__(self, index: int) -> Optional[dict]:
        image = self.load(index)
        return None if image is None else {"image": image}


class ClassFolderDataset(SafeImageDataset):
    """ImageNet layout `root/<class>/**/image`: classes in sorted order (hidden folders such as
    `.ipynb_checkpoints` are not classes, and a class folder without images is an error, as in torchvision's
    ImageFolder); items are {'image', 'label'}."""

    def __init__(self, root, img_size: int, interpolation: str = "bicubic"):
        root = _check_root(root)
        folders = [p for p in root.iterdir() if p.is_dir()]
        hidden = sorted(p.name for p in folders if is_hidden(p.name))
        if hidden:  # `.ipynb_checkpoints`, `.git`: never a class (it would shift every label after it)
            logger.info("skipped %d hidden folder(s) in %s: %s", len(hidden), root, ", ".join(hidden))
        self.classes = sorted(p.name for p in folders if not is_hidden(p.name))
        if not self.classes:
            raise DatasetError(f"no class subfolders in {root} (expected root/<class_name>/<images>)")
        per_class = [find_images(root / name) for name in self.classes]
        empty = [name for name, images in zip(self.classes, per_class) if not images]
        if len(empty) == len(self.classes):
            raise DatasetError(f"no images found in the class folders of {root}")
        if empty:  # a class of no images (macOS zips' `__MACOSX/`, `lost+found/`) would still take a label
            raise DatasetError(
                f"class folder(s) with no images in {root}: {', '.join(empty[:10])}{', ...' if len(empty) > 10 else ''} "
                "(every subfolder is a class: move these out, or put their images in)"
            )
        paths = [p for images in per_class for p in images]
        labels = [label for label, images in enumerate(per_class) for _ in images]
        self.labels = labels
        super().__init__(paths, ImageTransform(img_size, interpolation))

    def __getitem__(self, index: int) -> Optional[dict]:
        image = self.load(index)
        return None if image is None else {"image": image, "label": self.labels[index]}
