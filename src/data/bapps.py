"""BAPPS (Berkeley-Adobe Perceptual Patch Similarity) as it ships, 2AFC and JND.

    <root>/2afc/train/{traditional,cnn,mix}/{ref,p0,p1,judge}/
    <root>/2afc/val/{traditional,cnn,superres,deblur,color,frameinterp}/{ref,p0,p1,judge}/
    <root>/jnd/val/{traditional,cnn}/{p0,p1,same}/

Patches are image files matched across folders by sorted name (000000.png in ref/, p0/, p1/ and 000000.npy
in judge/). `judge/*.npy` holds the fraction of people who preferred p1 (0: everyone preferred p0);
`same/*.npy` the fraction who found p0 and p1 identical. `root` may be the folder holding `2afc/` or `2afc/`
itself (then `jnd/` is looked for next to it).

    ds = TwoAFCDataset(root, "val", ["cnn"], img_size=64, img_range="minus_one_to_one")
    ds[0] -> {"ref": (3, 64, 64), "p0": ..., "p1": ..., "judge": () float}
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .image_folder import IMAGE_EXTENSIONS, DatasetError
from .transforms import IMAGE_ERRORS, load_image

logger = logging.getLogger(__name__)

TRAIN_CATEGORIES = ("traditional", "cnn", "mix")
VAL_CATEGORIES = ("cnn", "traditional", "color", "deblur", "frameinterp", "superres")  # the design's table order
JND_CATEGORIES = ("traditional", "cnn")
IMG_RANGES = ("zero_to_one", "minus_one_to_one")
TWO_AFC_FOLDERS = ("ref", "p0", "p1", "judge")
JND_FOLDERS = ("p0", "p1", "same")
LABEL_FOLDERS = ("judge", "same")  # hold .npy files; the others hold images


def find_2afc_root(path) -> Path:
    """The `2afc/` folder: `path/2afc`, or `path` itself when it is named 2afc or holds train/ or val/."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"BAPPS folder not found: {path}")
    if (path / "2afc").is_dir():
        return path / "2afc"
    if path.name == "2afc" or (path / "train").is_dir() or (path / "val").is_dir():
        return path
    raise DatasetError(f"no '2afc' folder in {path}: --path_to_root must point at the BAPPS root or at its 2afc/")


def find_jnd_root(path) -> Optional[Path]:
    """The `jnd/` folder next to `2afc/`, or None when the download has none."""
    two_afc = find_2afc_root(path)
    candidate = two_afc.parent / "jnd"
    return candidate if candidate.is_dir() else None


def _list_files(folder: Path, label: bool) -> list[Path]:
    if label:
        return sorted(p for p in folder.iterdir() if p.suffix == ".npy")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def match_folders(category_dir: Path, folders: Sequence[str]) -> list[dict[str, Path]]:
    """One {folder: file} dict per sample, files matched by sorted name; clear errors on any mismatch."""
    if not category_dir.is_dir():
        raise DatasetError(f"BAPPS category folder missing: {category_dir}")
    listing = {}
    for name in folders:
        sub = category_dir / name
        if not sub.is_dir():
            raise DatasetError(f"BAPPS folder missing: {sub} (each category needs {', '.join(folders)})")
        listing[name] = _list_files(sub, label=name in LABEL_FOLDERS)
    counts = {name: len(files) for name, files in listing.items()}
    if len(set(counts.values())) != 1:
        raise DatasetError(f"BAPPS count mismatch in {category_dir}: {counts}")
    if counts[folders[0]] == 0:
        raise DatasetError(f"BAPPS category {category_dir} is empty")
    samples = []
    for files in zip(*listing.values()):
        stems = {p.stem for p in files}
        if len(stems) != 1:
            raise DatasetError(f"BAPPS files do not match by name in {category_dir}: {[str(p.name) for p in files]}")
        samples.append(dict(zip(folders, files)))
    return samples


def read_fraction(path: Path) -> float:
    """A judge/same .npy file -> its single value in [0, 1] (ValueError naming the file otherwise)."""
    try:
        value = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:  # an empty file raises EOFError, a truncated one ValueError
        raise ValueError(f"{path}: unreadable .npy ({err})") from err
    if value.size != 1 or not np.issubdtype(value.dtype, np.number):
        raise ValueError(f"{path}: expected one number, got array of shape {value.shape} ({value.dtype})")
    value = float(value.reshape(()))
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{path}: value {value} is outside [0, 1]")
    return value


class PatchTransform:
    """PIL patch -> (3, S, S) float tensor in the chosen range (bilinear resize, as the official loader)."""

    def __init__(self, img_size: int, img_range: str):
        if img_range not in IMG_RANGES:
            raise ValueError(f"img_range must be one of {IMG_RANGES}, got {img_range!r}")
        self.img_size = img_size
        self.img_range = img_range

    def __call__(self, img) -> torch.Tensor:
        if img.size != (self.img_size, self.img_size):
            img = TF.resize(img, [self.img_size, self.img_size], InterpolationMode.BILINEAR, antialias=True)
        x = TF.pil_to_tensor(img).float() / 255.0  # (3, S, S) in [0, 1]
        return x if self.img_range == "zero_to_one" else x * 2.0 - 1.0


def to_minus_one_to_one(x: torch.Tensor, img_range: str) -> torch.Tensor:
    """Bring a batch in `img_range` to the [-1, 1] that LPIPS takes."""
    return x * 2.0 - 1.0 if img_range == "zero_to_one" else x


class _BAPPSDataset(Dataset):
    """Shared reading: an unreadable file gives None (one warning naming it); collate drops and counts it."""

    folders: tuple[str, ...] = ()

    def __init__(self, category_dirs: Sequence[Path], img_size: int, img_range: str):
        self.transform = PatchTransform(img_size, img_range)
        self.samples: list[dict[str, Path]] = []
        for category_dir in category_dirs:
            self.samples += match_folders(Path(category_dir), self.folders)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Optional[dict]:
        files = self.samples[index]
        try:
            item = {}
            for name, path in files.items():
                if name in LABEL_FOLDERS:
                    item[name] = torch.tensor(read_fraction(path), dtype=torch.float32)  # ()
                else:
                    item[name] = self.transform(load_image(path))
            return item
        except IMAGE_ERRORS as err:  # unreadable, truncated, or too many pixels (a decompression bomb)
            logger.warning("skipping BAPPS sample %d: %s", index, err)
            return None


class TwoAFCDataset(_BAPPSDataset):
    """2AFC triplets of one split over the given categories: ref, p0, p1 and judge (fraction preferring p1)."""

    folders = TWO_AFC_FOLDERS

    def __init__(self, root, split: str, categories: Sequence[str], img_size: int, img_range: str):
        base = find_2afc_root(root) / split
        super().__init__([base / c for c in categories], img_size, img_range)


class JNDDataset(_BAPPSDataset):
    """JND pairs: p0, p1 and same (fraction of people who saw no difference)."""

    folders = JND_FOLDERS

    def __init__(self, jnd_root, categories: Sequence[str], img_size: int, img_range: str):
        base = Path(jnd_root) / "val"
        super().__init__([base / c for c in categories], img_size, img_range)
