"""Reference statistics for FID / KID: from a statistics file, or computed from images and cached on disk.

    source = ImageSource("celebahq", "data/celebahq", img_size=256, cfg=train_cfg, max_images=50000)
    stats, status = reference_stats(source, inception, cache_dir="~/.cache/ldm/fid_stats", accelerator=acc)
    stats = load_stats_file("VIRTUAL_imagenet256.npz")      # any .npz with 'mu' and 'sigma' (+ 'features')

The images are those of one of our datasets (src/data: a plain folder is `celebahq`), resized and centre-cropped
to the model's resolution exactly as training saw them. A cache file is named by a hash of everything the
statistics depend on: the dataset, every file under its folder (relative path, size, modification time), the
resolution and interpolation, how many images, the feature extractor (its weights' sha256), and which feature rows
are kept for KID. Changing any of them makes a new entry; an unchanged reference is read back instead of recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import TrainConfig
from ..data import build_dataset
from ..data.loader import collate
from .fid import KID_ROWS_SEED, FeatureStats, stats_from_features
from .sharding import gather_in_order, local_rows, process_batches, world

logger = logging.getLogger(__name__)

KID_MAX_FEATURES = 10000  # feature rows kept in a cache for KID (its subsets are 1000 rows)
SELECTION_SEED = 0  # which images a capped reference uses: a fixed permutation, so classes stay balanced


@dataclass
class ImageSource:
    """A set of reference images: `dataset` of src/data at `path`, at the model's resolution."""

    dataset: str
    path: Optional[str]
    img_size: int
    cfg: TrainConfig = field(default_factory=TrainConfig)  # interpolation; shapes: shapes_num_images, seed
    max_images: Optional[int] = None  # None: every image

    def build(self) -> Dataset:
        return build_dataset(self.dataset, self.path, self.img_size, self.cfg)


def folder_fingerprint(root) -> str:
    """sha256 over (relative path, size, mtime) of every file below `root`: any added, removed, rewritten or
    touched file changes it, without reading the images."""
    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        st = p.stat()
        # the name's own bytes: a name that is not UTF-8 (a zip made on Windows) holds surrogates, which .encode()
        # refuses; os.fsencode gives back the bytes on disk, the same bytes as .encode() for every UTF-8 name
        h.update(os.fsencode(p.relative_to(root).as_posix()) + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def source_identity(
    source: ImageSource, num_items: int, extractor_identity: dict, keep_features: int = KID_MAX_FEATURES
) -> dict:
    identity = {
        "dataset": source.dataset,
        "path": str(Path(source.path).resolve()) if source.path else None,
        "files": folder_fingerprint(source.path) if source.path else None,
        "num_items": num_items,
        "img_size": source.img_size,
        "interpolation": source.cfg.interpolation,
        "max_images": source.max_images,
        "selection_seed": SELECTION_SEED,
        "extractor": extractor_identity,
        # a random subset of the rows (fid.kid_rows); caches without this field kept the first rows, which on a
        # class-sorted folder are its first classes, so they must not be reused
        "kid_features": {"max_rows": keep_features, "selection": "random", "seed": KID_ROWS_SEED},
    }
    if source.dataset == "shapes":
        identity["shapes"] = {"num_images": source.cfg.shapes_num_images, "seed": source.cfg.seed}
    return identity


def cache_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def select_indices(num_items: int, max_images: Optional[int]) -> list[int]:
    """All items, or `max_images` of them in a fixed random order (a folder sorted by class would otherwise
    give the first classes only)."""
    if max_images is None or max_images >= num_items:
        return list(range(num_items))
    perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(SELECTION_SEED))
    return sorted(perm[:max_images].tolist())


# --------------------------------------------------------------------------------------------------- files


def save_stats_file(path, stats: FeatureStats, identity: Optional[dict] = None) -> Path:
    """An .npz with mu, sigma, count, features (when kept) and the identity as JSON; written atomically, through a
    temporary file of this call's own: the cache folder is shared by every evaluation, and two of them storing the
    same reference at once must not write into (or move away) one another's temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mu": stats.mu, "sigma": stats.sigma, "count": np.array(stats.count)}
    if stats.features is not None:
        arrays["features"] = stats.features.astype(np.float32)
    if identity is not None:
        arrays["identity"] = np.array(json.dumps(identity, sort_keys=True))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")  # mode from the umask, as before
    try:
        with open(tmp, "xb") as f:
            np.savez(f, **arrays)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_stats_file(path) -> FeatureStats:
    """Statistics from an .npz holding 'mu' (D,) and 'sigma' (D, D) (pytorch-fid's --save-stats format, or a
    cache file of this module, which also holds 'features' for KID). Nothing is unpickled."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics file not found: {path}")
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise ValueError(f"{path} has no {missing} array(s): a statistics file holds 'mu' (D,) and 'sigma' (D, D)")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        features = data["features"] if "features" in data.files else None
        count = int(data["count"]) if "count" in data.files else -1
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: 'mu' {mu.shape} and 'sigma' {sigma.shape} do not fit together")
    return FeatureStats(mu=mu, sigma=sigma, count=count, features=features)


def read_identity(path) -> Optional[dict]:
    with np.load(path, allow_pickle=False) as data:
        return json.loads(str(data["identity"])) if "identity" in data.files else None


# --------------------------------------------------------------------------------------------------- computing


class _Positioned(Dataset):
    """Items of `dataset` at `indices`, tagged with their position in that list (None stays None)."""

    def __init__(self, dataset: Dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> Optional[dict]:
        item = self.dataset[self.indices[position]]
        return None if item is None else {"image": item["image"], "position": position}


def dataset_features(
    dataset: Dataset, indices: list[int], extractor: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 50, num_workers: int = 0, accelerator=None, desc: str = "reference features",
) -> tuple[torch.Tensor, int]:
    """Features (N', D) of the images at `indices` (split over processes, gathered in order) and how many were
    unreadable and skipped (N' = len(indices) - skipped)."""
    from tqdm.auto import tqdm

    rank, size = world(accelerator)
    mine = process_batches(len(indices), batch_size, rank, size)
    batches = [list(range(start, end)) for _, start, end in mine]
    loader = DataLoader(_Positioned(dataset, indices), batch_sampler=batches, num_workers=num_workers, collate_fn=collate)
    parts, positions, skipped, dim = [], [], 0, 0
    for batch in tqdm(loader, desc=desc, disable=rank != 0, dynamic_ncols=True):
        skipped += batch["num_skipped"]
        if "image" not in batch:
            continue
        rows = extractor(batch["image"])  # (b, D)
        parts.append(rows.float().cpu())
        positions.append(batch["position"])
        dim = rows.shape[1]
    if accelerator is not None and size > 1:
        dim = int(accelerator.gather(torch.tensor([dim], device=accelerator.device)).max())
        skipped = int(accelerator.gather(torch.tensor([skipped], device=accelerator.device)).sum())
    rows, order = local_rows(parts, positions, dim)
    return gather_in_order(rows, order, accelerator), skipped


@dataclass
class CacheEntry:
    """Where the statistics of a source live in the cache, and what they must have been computed from."""

    path: Path
    identity: dict

    def load(self) -> Optional[FeatureStats]:
        """The cached statistics, or None when absent (or written for another identity)."""
        if self.path.is_file() and read_identity(self.path) == self.identity:
            logger.info("reference statistics: reusing %s", self.path)
            return load_stats_file(self.path)
        return None

    def store(self, stats: FeatureStats, accelerator=None) -> None:
        if accelerator is None or accelerator.is_main_process:
            save_stats_file(self.path, stats, self.identity)
            logger.info("reference statistics of %d images written to %s", stats.count, self.path)
        if accelerator is not None:
            accelerator.wait_for_everyone()


def cache_entry(
    source: ImageSource, dataset: Dataset, extractor_identity: dict, cache_dir, keep_features: int = KID_MAX_FEATURES
) -> CacheEntry:
    identity = source_identity(source, len(dataset), extractor_identity, keep_features)
    return CacheEntry(Path(cache_dir).expanduser() / f"reference_{cache_key(identity)}.npz", identity)


def reference_stats(
    source: ImageSource, extractor, cache_dir, accelerator=None, batch_size: int = 50, num_workers: int = 0,
    keep_features: int = KID_MAX_FEATURES,
) -> tuple[FeatureStats, str]:
    """(statistics of the source's images, 'cached' | 'computed'). `extractor` maps images (B, 3, H, W) in
    [-1, 1] to features (B, D) and has an `identity` dict naming it (InceptionFeatures does)."""
    dataset = source.build()
    entry = cache_entry(source, dataset, extractor.identity, cache_dir, keep_features)
    cached = entry.load()
    if cached is not None:
        return cached, "cached"
    indices = select_indices(len(dataset), source.max_images)
    features, skipped = dataset_features(dataset, indices, extractor, batch_size, num_workers, accelerator)
    if skipped:
        logger.warning("reference: skipped %d unreadable image(s) of %d", skipped, len(indices))
    stats = stats_from_features(features.numpy(), keep=keep_features)
    entry.store(stats, accelerator)
    return stats, "computed"


def describe(source: ImageSource) -> str:
    return f"{source.dataset}:{source.path}" if source.path else source.dataset

