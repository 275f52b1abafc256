"""Prompt adherence on the `shapes` vocabulary: read back the shape, its colour and the background colour.

For each generated image:
  1. background colour = median of the border pixels, snapped to the nearest entry of COLORS;
  2. the shape mask = pixels far (in RGB) from that measured background;
  3. shape colour = median of the mask's interior pixels, snapped to COLORS;
  4. shape class from two complex moments of the shape's coverage ("alpha") map. alpha is each pixel's position on
     the line from the background colour to the shape colour (0 background, 1 shape), so anti-aliasing and blur
     give fractional coverage; around the centroid z0, with z = x + iy and mass m = sum(alpha),
         c_n = | sum alpha (z - z0)^n | / m^(1 + n/2)          n = 3, 4
     is invariant to translation, rotation and scale, and also to any isotropic blur: convolving with an isotropic
     kernel leaves the moments of the harmonic polynomial (z - z0)^n unchanged. A disc has c_3 = c_4 = 0, a square
     c_4 = 1/60 (4-fold symmetry, c_3 = 0), an equilateral triangle c_3 ~ 0.068 (3-fold, c_4 = 0). The class is the
     nearest of the three class means measured on rendered shapes, each moment scaled by its largest class mean.
     Coverage under ALPHA_FLOOR, or outside a disc of COVERAGE_RADIUS equivalent radii, is dropped, so faint noise
     far from the shape (weighted by |z|^4) cannot swamp the moments.
  5. clean = the image is what the dataset draws: exactly one foreground region (8-connected, specks under
     MIN_REGION pixels ignored), whose body is one palette colour (at least CLEAN_FRACTION of the pixels of coverage
     above SOLID_COVERAGE snap to the shape colour), on a uniform background (at least CLEAN_FRACTION of the pixels two or more pixels away
     from the shape snap to the background colour), and at least CLEAN_FRACTION of all pixels are blends of those
     two colours (within BLEND_TOLERANCE of the segment between them: edges may be soft, but not a third colour).
     A mosaic of patches, two shapes, a two-coloured shape or a blank image is not clean.
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
MASK_THRESHOLD = 80.0  # RGB distance from the background that counts as "shape" (at most; see _shape_mask)
ALPHA_FLOOR = 0.15  # coverage below this is background noise, not shape (step 4)
COVERAGE_RADIUS = 2.0  # shape moments use coverage within this many equivalent-disc radii of the centroid
MIN_REGION = 3  # connected foreground regions smaller than this (pixels) are specks, not regions
SOLID_COVERAGE = 0.8  # pixels this far along from background to shape colour are the shape's body, not its edge
BLEND_TOLERANCE = 40.0  # RGB distance from the background-to-shape colour segment still counted as a blend
MAX_EDGE_WIDTH = 4.5  # px
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


def is_clean(arr: np.ndarray, mask: np.ndarray, color: Optional[str], background: str,
             background_rgb: np.ndarray, shape_rgb: Optional[np.ndarray]) -> bool:
    """Step 5 of the module docstring: one region, of one palette colour, on a uniform background, and nothing in
    the image but those two colours and their blends (an anti-aliased or blurred edge is a blend; a patch of a
    third colour is not)."""
    labels, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    areas = np.bincount(labels.ravel())[1:]  # (n,) pixels per region
    if color is None or (areas >= MIN_REGION).sum() != 1:
        return False
    alpha = coverage(arr, background_rgb, shape_rgb)  # (H, W)
    solid = alpha > SOLID_COVERAGE
    shape_px = arr[solid] if solid.sum() >= 4 else arr[_interior(mask)]  # the shape away from the edge's blend
    outside = arr[~_dilate(_dilate(mask))]  # the background away from the edge's blend
    shape_ok = (nearest_color_index(shape_px) == _NAMES.index(color)).mean() >= CLEAN_FRACTION
    background_ok = len(outside) > 0 and (nearest_color_index(outside) == _NAMES.index(background)).mean() >= CLEAN_FRACTION
    blend = background_rgb + alpha[..., None] * (shape_rgb - background_rgb)  # (H, W, 3)
    off_blend = np.sqrt(((arr - blend) ** 2).sum(-1))  # (H, W)
    blend_ok = (off_blend <= BLEND_TOLERANCE).mean() >= CLEAN_FRACTION
    # a sharp edge: partial-coverage pixels form a band at most MAX_EDGE_WIDTH px wide around the shape
    edge = ((alpha > ALPHA_FLOOR) & (alpha < 1 - ALPHA_FLOOR)).sum()
    sharp_ok = edge <= MAX_EDGE_WIDTH * 2 * np.sqrt(np.pi * max(int((alpha >= 0.5).sum()), 1))
    return bool(shape_ok and background_ok and blend_ok and sharp_ok)


def _interior(mask: np.ndarray) -> np.ndarray:
    """The mask eroded twice, or once, or not at all: the deepest version that keeps at least 4 pixels."""
    inner = _erode(mask)
    deeper = _erode(inner)
    return deeper if deeper.sum() >= 4 else inner if inner.sum() >= 4 else mask


def _erode(mask: np.ndarray) -> np.ndarray:
    m = mask.copy()
    m[1:] &= mask[:-1]
    m[:-1] &= mask[1:]
    m[:, 1:] &= mask[:, :-1]
    m[:, :-1] &= mask[:, 1:]
    return m


def coverage(arr: np.ndarray, background_rgb: np.ndarray, shape_rgb: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1]: each pixel's projection on the segment from the background colour to the shape colour."""
    d = shape_rgb - background_rgb
    return np.clip(((arr - background_rgb) @ d) / max(float(d @ d), 1e-9), 0.0, 1.0)


def shape_moments(alpha: np.ndarray) -> Optional[np.ndarray]:
    """(c_3, c_4) of a coverage map (step 4); None when there is too little shape to measure."""
    h, w = alpha.shape
    ys, xs = np.mgrid[0:h, 0:w] + 0.5  # pixel centres
    core = alpha > 0.5
    if core.sum() < 6:
        return None
    cx, cy = xs[core].mean(), ys[core].mean()
    radius = COVERAGE_RADIUS * np.sqrt(core.sum() / np.pi)
    alpha = np.where(((xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2) & (alpha > ALPHA_FLOOR), alpha, 0.0)
    m = alpha.sum()
    z = (xs - (alpha * xs).sum() / m) + 1j * (ys - (alpha * ys).sum() / m)
    return np.array([abs((alpha * z**n).sum()) / m ** (1 + n / 2) for n in (3, 4)])


@lru_cache(maxsize=None)
def _class_means(size: int, n: int = 240, seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
    """(S, 2) mean (c_3, c_4) per class over `n` rendered shapes of `size` px, and (2,) the scale of each moment
    (its largest class mean: the triangle's c_3, the square's c_4)."""
    rng = random.Random(seed)
    feats: dict[str, list[np.ndarray]] = {s: [] for s in SHAPES}
    for i in range(n):
        color, _, background = sample_attributes(rng)
        shape = SHAPES[i % len(SHAPES)]
        arr = np.asarray(render(color, shape, background, size, rng), dtype=np.float64)
        f = shape_moments(coverage(arr, np.asarray(COLORS[background], float), np.asarray(COLORS[color], float)))
        if f is not None:
            feats[shape].append(f)
    means = np.stack([np.mean(feats[s], 0) for s in SHAPES])  # (S, 2)
    return means, means.max(0)


def classify_shape(alpha: np.ndarray) -> Optional[str]:
    """The class whose mean moments (scaled) are nearest to this coverage map's; None if there is no shape."""
    moments = shape_moments(alpha)
    if moments is None:
        return None
    means, scale = _class_means(alpha.shape[0])
    return SHAPES[int(np.argmin((((means - moments) / scale) ** 2).sum(1)))]


def _shape_mask(arr: np.ndarray, background_rgb: np.ndarray) -> np.ndarray:
    """(H, W): pixels farther from the background than MASK_THRESHOLD, or than half the way to the palette colour
    nearest the background's (yellow and orange are only 87 apart: a shape of one on the other is cut at 44)."""
    own = _PALETTE[nearest_color_index(background_rgb[None])[0]]
    others = np.sqrt(((_PALETTE - own) ** 2).sum(-1))
    threshold = min(MASK_THRESHOLD, 0.5 * others[others > 0].min())
    return np.sqrt(((arr - background_rgb) ** 2).sum(-1)) > threshold


def read_image(img: Image.Image) -> Reading:
    """Measure (shape colour, shape class, background colour, clean) of one image."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float64)  # (H, W, 3)
    bg_rgb = np.median(_border(arr), axis=0)
    background = nearest_color(bg_rgb)
    mask = _shape_mask(arr, bg_rgb)
    pixels = arr[_interior(mask)]
    color = shape = None
    if len(pixels):
        shape_rgb = np.median(pixels, axis=0)
        color = nearest_color(shape_rgb)
        alpha = coverage(arr, bg_rgb, shape_rgb)
        labels, _ = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        areas = np.bincount(labels.ravel())[1:]  # (regions,)
        if (areas >= MIN_REGION).sum() > 1:  # moments of the largest region only: two shapes are not one square
            largest = 1 + int(np.argmax(areas))  # (a speck is left alone: cutting to a region clips soft edges)
            alpha = np.where(_dilate(_dilate(labels == largest)), alpha, 0.0)
        shape = None if color == background else classify_shape(alpha)  # noise reads as its own background
    clean = color is not None and is_clean(arr, mask, color, background, bg_rgb, shape_rgb)
    return Reading(color=color, shape=shape, background=background, clean=clean)


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
