"""Prompt adherence on the `shapes` vocabulary: read back the shape, its colour and the background colour.

For each generated image:
  1. background colour = median of the border pixels, snapped to the nearest entry of COLORS;
  2. the shape mask = pixels far (in RGB) from that measured background;
  3. shape colour = median of the mask's interior pixels, snapped to COLORS;
  4. shape class = nearest class centroid of two rotation-invariant mask features, fitted on rendered shapes:
       moment ratio  area / (4 pi sqrt(det Cov))   (1 for a disc, ~0.95 square, ~0.83 triangle)
       reach         95th percentile of distance to the centroid / sqrt(area)
  5. clean = the image is what the dataset draws: exactly one foreground region (8-connected, specks under
     MIN_REGION pixels ignored), whose interior is one palette colour (at least CLEAN_FRACTION of its pixels snap
     to the shape colour), on a uniform background (at least CLEAN_FRACTION of the pixels away from the shape's
     anti-aliased rim snap to the background colour). A mosaic of patches, two shapes or a blank image is not.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np
from PIL import Image
from scipy import ndimage

from ..data.shapes import COLORS, SHAPES, render, sample_attributes

_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[n] for n in _NAMES], dtype=np.float64)  # (K, 3)
MASK_THRESHOLD = 80.0  # RGB distance from the background that counts as "shape"
MIN_REGION = 3  # connected foreground regions smaller than this (pixels) are specks, not regions
CLEAN_FRACTION = 0.95  # share of shape / background pixels that must snap to the one expected palette colour
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass
class Reading:
    color: Optional[str]
    shape: Optional[str]
    background: str
    clean: bool = False


def nearest_color(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(-1)))]


def nearest_color_index(pixels: np.ndarray) -> np.ndarray:
    """(N, 3) RGB -> (N,) index into COLORS of each pixel's nearest palette colour."""
    return np.argmin(((pixels[:, None, :] - _PALETTE[None]) ** 2).sum(-1), axis=1)


def _border(arr: np.ndarray, width: int = 2) -> np.ndarray:
    return np.concatenate(
        [arr[:width].reshape(-1, 3), arr[-width:].reshape(-1, 3), arr[:, :width].reshape(-1, 3), arr[:, -width:].reshape(-1, 3)]
    )


def _dilate(mask: np.ndarray) -> np.ndarray:
    return ~_erode(~mask)


def is_clean(arr: np.ndarray, mask: np.ndarray, color: Optional[str], background: str) -> bool:
    """Step 5 of the module docstring: one region, of one palette colour, on a uniform background."""
    labels, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    areas = np.bincount(labels.ravel())[1:]  # (n,) pixels per region
    if color is None or (areas >= MIN_REGION).sum() != 1:
        return False
    inner = _erode(mask)
    shape_px = arr[inner] if inner.sum() >= 4 else arr[mask]
    outside = arr[~_dilate(mask)]
    shape_ok = (nearest_color_index(shape_px) == _NAMES.index(color)).mean() >= CLEAN_FRACTION
    background_ok = len(outside) > 0 and (nearest_color_index(outside) == _NAMES.index(background)).mean() >= CLEAN_FRACTION
    return bool(shape_ok and background_ok)


def _erode(mask: np.ndarray) -> np.ndarray:
    m = mask.copy()
    m[1:] &= mask[:-1]
    m[:-1] &= mask[1:]
    m[:, 1:] &= mask[:, :-1]
    m[:, :-1] &= mask[:, 1:]
    return m


def mask_features(mask: np.ndarray) -> Optional[np.ndarray]:
    """(moment ratio, reach) of a boolean mask; None when the mask is too small to measure."""
    ys, xs = np.nonzero(mask)
    area = len(xs)
    if area < 6:
        return None
    pts = np.stack([xs, ys], 1).astype(np.float64) + 0.5  # (N, 2) pixel centres
    centred = pts - pts.mean(0)
    cov = centred.T @ centred / area + np.eye(2) / 12.0  # + pixel's own second moment
    ratio = area / (4 * np.pi * np.sqrt(max(np.linalg.det(cov), 1e-9)))
    reach = np.percentile(np.sqrt((centred**2).sum(1)), 95) / np.sqrt(area)
    return np.array([ratio, reach])


@lru_cache(maxsize=None)
def _centroids(size: int, n: int = 240, seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
    """Per-class mean and std of mask features over `n` rendered shapes of `size` px."""
    rng = random.Random(seed)
    feats: dict[str, list[np.ndarray]] = {s: [] for s in SHAPES}
    for i in range(n):
        color, _, background = sample_attributes(rng)
        shape = SHAPES[i % len(SHAPES)]
        arr = np.asarray(render(color, shape, background, size, rng), dtype=np.float64)
        f = mask_features(_shape_mask(arr, np.asarray(COLORS[background], dtype=np.float64)))
        if f is not None:
            feats[shape].append(f)
    means = np.stack([np.mean(feats[s], 0) for s in SHAPES])  # (S, 2)
    spread = np.stack([np.std(feats[s], 0) for s in SHAPES]).mean(0) + 1e-6  # (2,)
    return means, spread


def _shape_mask(arr: np.ndarray, background_rgb: np.ndarray) -> np.ndarray:
    return np.sqrt(((arr - background_rgb) ** 2).sum(-1)) > MASK_THRESHOLD  # (H, W)


def read_image(img: Image.Image) -> Reading:
    """Measure (shape colour, shape class, background colour, clean) of one image."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float64)  # (H, W, 3)
    bg_rgb = np.median(_border(arr), axis=0)
    background = nearest_color(bg_rgb)
    mask = _shape_mask(arr, bg_rgb)
    inner = _erode(mask)
    pixels = arr[inner] if inner.sum() >= 4 else arr[mask]
    color = nearest_color(np.median(pixels, axis=0)) if len(pixels) else None
    feats = mask_features(mask)
    shape = None
    if feats is not None:
        means, spread = _centroids(arr.shape[0])
        shape = SHAPES[int(np.argmin((((means - feats) / spread) ** 2).sum(1)))]
    return Reading(color=color, shape=shape, background=background, clean=is_clean(arr, mask, color, background))


def score(expected: list[tuple[str, str, str]], images: list[Image.Image]) -> dict:
    """Fractions of images whose shape colour, background colour and shape match (color, shape, background),
    of clean images (step 5, whatever they show) and of images clean and right on all three."""
    readings = [read_image(im) for im in images]
    n = len(expected)
    result = {
        "shape_color": sum(r.color == e[0] for r, e in zip(readings, expected)) / n,
        "shape": sum(r.shape == e[1] for r, e in zip(readings, expected)) / n,
        "background_color": sum(r.background == e[2] for r, e in zip(readings, expected)) / n,
        "all_three": sum((r.color, r.shape, r.background) == e for r, e in zip(readings, expected)) / n,
        "clean": sum(r.clean for r in readings) / n,
        "clean_and_right": sum(r.clean and (r.color, r.shape, r.background) == e for r, e in zip(readings, expected)) / n,
        "num_prompts": n,
    }
    result["readings"] = [r.__dict__ for r in readings]
    return result
