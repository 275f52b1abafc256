"""A BAPPS-format generator: synthetic 2AFC triplets and JND pairs, written in exactly BAPPS's folder layout
(see src/data/bapps.py), so the real loader is what reads them. For tests and the offline demo:

    python -m src.data.bapps_synth --out data/bapps_synth --num_train 500 --num_val 100 --patch_size 64 --seed 0

Each triplet: a reference patch (procedural texture or one of the built-in shapes), two distortions of random
type and strength, and a judge value = the fraction of simulated observers who preferred p1. The observers
see the images, not the distortion's name: each perceives q = `perceived_difference(ref, p)`, a multi-scale
structural dissimilarity of luminance (1 - SSIM) plus a smaller chroma term, so their judgments depend on the
content (blurring a flat patch changes nothing they can see) and are not a function of pixel error alone. An
SSIM observer is only a stand-in for people: it is more sensitive to noise and blocking than to mild blur.
It prefers p1 with probability sigmoid(ln(q0 / q1) / TEMPERATURE), or presses at random after a lapse (LAPSE).
JND pairs: a reference and a distorted copy, `same` = fraction of observers who saw no difference, P(same) = sigmoid(ln(JND_THRESHOLD / q) / JND_TEMPERATURE).

Categories use different distortion families, as BAPPS's do (train: traditional, cnn, mix; val adds
superres, deblur, color, frameinterp), so validation measures transfer to unseen distortions.
"""

from __future__ import annotations

import argparse
import io
import math
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter

from .bapps import JND_CATEGORIES, TRAIN_CATEGORIES, VAL_CATEGORIES
from .shapes import COLORS, SHAPES, render

TEMPERATURE = 0.3
LAPSE = 0.1
JND_THRESHOLD = 0.05
JND_TEMPERATURE = 0.4
Q_FLOOR = 0.003  # perceived differences below this are all the same to the observers
CHROMA_WEIGHT = 0.5
OBSERVERS = {"train": 2, "val": 5, "jnd": 3}  # judgments per sample, as in BAPPS

Array = np.ndarray  # (H, W, 3) float32 in [0, 1]


# --------------------------------------------------------------------------------------------------------------
# Reference patches
# --------------------------------------------------------------------------------------------------------------


def _colour(rng: np.random.Generator) -> Array:
    return rng.uniform(0.0, 1.0, size=3).astype(np.float32)


def _grid(size: int) -> tuple[Array, Array]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return x, y


def grating(rng: np.random.Generator, size: int) -> Array:
    """Sum of 1-3 sinusoids (soft) or their sign (hard stripes/checks) between two colours."""
    x, y = _grid(size)
    wave = np.zeros((size, size), np.float32)
    for _ in range(rng.integers(1, 4)):
        freq = rng.uniform(1.0, size / 8)  # cycles per patch
        theta = rng.uniform(0, math.pi)
        wave += np.sin(2 * math.pi * freq * (x * math.cos(theta) + y * math.sin(theta)) + rng.uniform(0, 2 * math.pi))
    if rng.random() < 0.4:
        wave = np.sign(wave)
    t = (wave - wave.min()) / (np.ptp(wave) + 1e-6)  # (H, W) in [0, 1]
    a, b = _colour(rng), _colour(rng)
    return a * (1 - t[..., None]) + b * t[..., None]


def clouds(rng: np.random.Generator, size: int) -> Array:
    """Multi-octave smooth noise (1/f amplitudes) through a random three-colour ramp."""
    field = np.zeros((size, size), np.float32)
    for octave, cells in enumerate((2, 4, 8, 16)):
        if cells > size:
            break
        low = rng.standard_normal((cells, cells)).astype(np.float32)
        up = Image.fromarray(low, mode="F").resize((size, size), Image.Resampling.BICUBIC)
        field += np.asarray(up) / (2**octave)
    t = (field - field.min()) / (np.ptp(field) + 1e-6)
    stops = [_colour(rng) for _ in range(3)]
    lo = np.clip(t * 2, 0, 1)[..., None]
    hi = np.clip(t * 2 - 1, 0, 1)[..., None]
    return stops[0] * (1 - lo) + stops[1] * lo * (1 - hi) + stops[2] * hi


def blobs(rng: np.random.Generator, size: int) -> Array:
    """3-8 random ellipses and rectangles on a plain or cloudy background."""
    base = clouds(rng, size) if rng.random() < 0.5 else np.broadcast_to(_colour(rng), (size, size, 3))
    img = Image.fromarray((base * 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(3, 9)):
        x0, y0 = rng.uniform(-0.2, 0.9, size=2) * size
        w, h = rng.uniform(0.1, 0.6, size=2) * size
        fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=fill)
    return np.asarray(img, np.float32) / 255.0


def shape_patch(rng: np.random.Generator, size: int) -> Array:
    """One of the built-in coloured shapes (src/data/shapes.py)."""
    names = list(COLORS)
    color, background = rng.choice(len(names), size=2, replace=False)
    py_rng = random.Random(int(rng.integers(1 << 31)))
    img = render(names[color], SHAPES[rng.integers(len(SHAPES))], names[background], size, py_rng)
    return np.asarray(img, np.float32) / 255.0


REFERENCES: list[Callable[[np.random.Generator, int], Array]] = [grating, clouds, blobs, shape_patch]


def reference_patch(rng: np.random.Generator, size: int) -> Array:
    return REFERENCES[rng.integers(len(REFERENCES))](rng, size).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# Distortions: fn(img, s, rng) with strength s in [0, 1]; parameters scale with the patch size
# --------------------------------------------------------------------------------------------------------------


def _pil(img: Array) -> Image.Image:
    return Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))


def _arr(img: Image.Image) -> Array:
    return np.asarray(img, np.float32) / 255.0


def blur(img: Array, s: float, rng: np.random.Generator) -> Array:
    return _arr(_pil(img).filter(ImageFilter.GaussianBlur(radius=(0.2 + 2.0 * s) * img.shape[0] / 64)))


def noise(img: Array, s: float, rng: np.random.Generator) -> Array:
    return img + rng.standard_normal(img.shape).astype(np.float32) * (0.01 + 0.2 * s)


def jpeg(img: Array, s: float, rng: np.random.Generator) -> Array:
    buf = io.BytesIO()
    _pil(img).save(buf, format="JPEG", quality=int(round(90 - 85 * s)))
    return _arr(Image.open(buf).convert("RGB"))


def contrast(img: Array, s: float, rng: np.random.Generator) -> Array:
    factor = 1.0 - 0.8 * s if rng.random() < 0.7 else 1.0 + 1.2 * s
    return (img - img.mean()) * factor + img.mean()


def brightness(img: Array, s: float, rng: np.random.Generator) -> Array:
    return img + (0.4 * s if rng.random() < 0.5 else -0.4 * s)


def quantize(img: Array, s: float, rng: np.random.Generator) -> Array:
    levels = max(2, int(round(32 - 30 * s)))
    return np.round(img * (levels - 1)) / (levels - 1)


def upsample_from(img: Array, s: float, rng: np.random.Generator) -> Array:
    """Super-resolution artefacts: downsample by 1.5-8x, upsample with a random filter."""
    size = img.shape[0]
    small = max(2, int(round(size / (1.5 + 6.5 * s))))
    method = [Image.Resampling.NEAREST, Image.Resampling.BILINEAR, Image.Resampling.BICUBIC][rng.integers(3)]
    return _arr(_pil(img).resize((small, small), Image.Resampling.BOX).resize((size, size), method))


def sharpen(img: Array, s: float, rng: np.random.Generator) -> Array:
    """Unsharp masking: halos and ringing."""
    soft = blur(img, 0.3, rng)
    return img + (img - soft) * (4.0 * s)


def deblur(img: Array, s: float, rng: np.random.Generator) -> Array:
    """A blurred patch, partly restored by sharpening: residual blur plus ringing."""
    blurred = blur(img, 0.3 + 0.7 * s, rng)
    return sharpen(blurred, 0.2 + 0.5 * rng.random(), rng)


def checkerboard(img: Array, s: float, rng: np.random.Generator) -> Array:
    """Transposed-convolution style 2x2 periodic artefacts, scaled by local intensity."""
    size = img.shape[0]
    pattern = np.indices((size, size)).sum(0) % 2 * 2.0 - 1.0  # (H, W) of +-1
    return img + (0.03 + 0.2 * s) * pattern[..., None].astype(np.float32) * (0.5 + img)


def _displace(img: Array, dx: Array, dy: Array) -> Array:
    """Resample (H, W, 3) at positions offset by (dx, dy) pixels, bilinear, border-clamped."""
    size = img.shape[0]
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None]  # (1, 3, H, W)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    gx = (xs + torch.from_numpy(dx)) / (size - 1) * 2 - 1
    gy = (ys + torch.from_numpy(dy)) / (size - 1) * 2 - 1
    grid = torch.stack([gx, gy], dim=-1)[None]  # (1, H, W, 2)
    out = F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out[0].permute(1, 2, 0).numpy()


def warp(img: Array, s: float, rng: np.random.Generator) -> Array:
    """Smooth random displacement field of up to ~3 px (at 64 px)."""
    size = img.shape[0]
    amp = (0.3 + 3.0 * s) * size / 64
    field = []
    for _ in range(2):
        low = rng.standard_normal((4, 4)).astype(np.float32)
        field.append(np.asarray(Image.fromarray(low, mode="F").resize((size, size), Image.Resampling.BICUBIC)) * amp)
    return _displace(img, field[0], field[1])


def ghost(img: Array, s: float, rng: np.random.Generator) -> Array:
    """Frame-interpolation style ghosting: blend with a shifted copy."""
    size = img.shape[0]
    shift = (1 + 5 * s) * size / 64
    angle = rng.uniform(0, 2 * math.pi)
    dx = np.full((size, size), shift * math.cos(angle), np.float32)
    dy = np.full((size, size), shift * math.sin(angle), np.float32)
    alpha = 0.25 + 0.25 * s
    return (1 - alpha) * img + alpha * _displace(img, dx, dy)


def hue(img: Array, s: float, rng: np.random.Generator) -> Array:
    """Rotate chroma in YIQ space by up to ~100 degrees."""
    yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
    theta = (0.1 + 1.6 * s) * (1 if rng.random() < 0.5 else -1)
    rot = np.array([[1, 0, 0], [0, math.cos(theta), -math.sin(theta)], [0, math.sin(theta), math.cos(theta)]], np.float32)
    m = np.linalg.inv(yiq) @ rot @ yiq
    return img @ m.T.astype(np.float32)


def saturation(img: Array, s: float, rng: np.random.Generator) -> Array:
    grey = img @ np.array([0.299, 0.587, 0.114], np.float32)
    factor = 1.0 - 0.9 * s if rng.random() < 0.6 else 1.0 + 1.5 * s
    return grey[..., None] + (img - grey[..., None]) * factor


def channel_gain(img: Array, s: float, rng: np.random.Generator) -> Array:
    gains = 1.0 + rng.uniform(-1, 1, size=3).astype(np.float32) * (0.05 + 0.4 * s)
    return img * gains


DISTORTIONS: dict[str, Callable[[Array, float, np.random.Generator], Array]] = {
    "blur": blur, "noise": noise, "jpeg": jpeg, "contrast": contrast, "brightness": brightness,
    "quantize": quantize, "upsample": upsample_from, "sharpen": sharpen, "deblur": deblur,
    "checkerboard": checkerboard, "warp": warp, "ghost": ghost, "hue": hue, "saturation": saturation,
    "channel_gain": channel_gain,
}
_TRADITIONAL = ["blur", "noise", "jpeg", "contrast", "brightness", "quantize"]
_CNN = ["upsample", "sharpen", "checkerboard", "warp", "deblur", "noise"]
FAMILIES: dict[str, list[str]] = {
    "traditional": _TRADITIONAL,
    "cnn": _CNN,
    "mix": _TRADITIONAL + _CNN,
    "superres": ["upsample"],
    "deblur": ["deblur", "blur", "sharpen"],
    "color": ["hue", "saturation", "channel_gain", "brightness"],
    "frameinterp": ["ghost", "warp"],
}


def distort(img: Array, family: list[str], rng: np.random.Generator, low: float, high: float) -> Array:
    """Apply one random distortion of `family` at strength U(low, high)."""
    name = family[rng.integers(len(family))]
    s = float(rng.uniform(low, high))
    return np.clip(DISTORTIONS[name](img, s, rng), 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# Simulated observers
# --------------------------------------------------------------------------------------------------------------


def _gaussian_window(size: int = 7, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]  # (1, 1, k, k)


WINDOW = _gaussian_window()


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM of two (1, 1, H, W) images in [0, 1] (Wang et al. 2004, Eq. 13; C1 = .01^2, C2 = .03^2)."""
    stack = torch.cat([a, b, a * a, b * b, a * b], dim=0)  # (5, 1, H, W): all local means in one conv
    mu_a, mu_b, m_aa, m_bb, m_ab = F.conv2d(F.pad(stack, (3, 3, 3, 3), mode="reflect"), WINDOW)
    var_a, var_b, cov = m_aa - mu_a**2, m_bb - mu_b**2, m_ab - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return float((num / den).mean())


def perceived_difference(ref: Array, img: Array) -> float:
    """What the simulated observers see: mean over scales of (1 - SSIM) on luminance + chroma change."""
    a, b = (torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None] for x in (ref, img))  # (1, 3, H, W)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    ya, yb = (a * luma).sum(1, keepdim=True), (b * luma).sum(1, keepdim=True)  # (1, 1, H, W)
    dissim = []
    while ya.shape[-1] >= 8 and len(dissim) < 3:
        dissim.append(1.0 - ssim(ya, yb))
        ya, yb = F.avg_pool2d(ya, 2), F.avg_pool2d(yb, 2)
    opponent = lambda t: torch.cat([t[:, :1] - t[:, 1:2], 0.5 * (t[:, :1] + t[:, 1:2]) - t[:, 2:]], 1)
    chroma = (F.avg_pool2d(opponent(a) - opponent(b), 4)).abs().mean().item()
    return sum(dissim) / len(dissim) + CHROMA_WEIGHT * chroma


def observe(p: float, n: int, rng: np.random.Generator) -> float:
    """Fraction of n observers who answer yes, each with probability p, or at random after a lapse."""
    p = LAPSE * 0.5 + (1 - LAPSE) * p
    return float((rng.random(n) < p).mean())


def prefer_p1(q0: float, q1: float) -> float:
    """Probability that an observer finds p1 closer to the reference."""
    return sigmoid(math.log((q0 + Q_FLOOR) / (q1 + Q_FLOOR)) / TEMPERATURE)


def see_same(q: float) -> float:
    return sigmoid(math.log(JND_THRESHOLD / (q + Q_FLOOR)) / JND_TEMPERATURE)


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# --------------------------------------------------------------------------------------------------------------
# Writing the BAPPS layout
# --------------------------------------------------------------------------------------------------------------


def _save(img: Array, path: Path) -> None:
    _pil(img).save(path, compress_level=1)


def write_2afc_category(out: Path, split: str, category: str, count: int, size: int, seed: int) -> None:
    folder = out / "2afc" / split / category
    for sub in ("ref", "p0", "p1", "judge"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rng = np.random.default_rng([seed, i, *map(ord, split + "/" + category)])
        ref = reference_patch(rng, size)
        p0 = distort(ref, FAMILIES[category], rng, 0.05, 1.0)
        p1 = distort(ref, FAMILIES[category], rng, 0.05, 1.0)
        q0, q1 = perceived_difference(ref, p0), perceived_difference(ref, p1)
        judge = observe(prefer_p1(q0, q1), OBSERVERS[split], rng)  # fraction preferring p1
        name = f"{i:06d}"
        _save(ref, folder / "ref" / f"{name}.png")
        _save(p0, folder / "p0" / f"{name}.png")
        _save(p1, folder / "p1" / f"{name}.png")
        np.save(folder / "judge" / f"{name}.npy", np.array([judge], np.float32))


def write_jnd_category(out: Path, category: str, count: int, size: int, seed: int) -> None:
    folder = out / "jnd" / "val" / category
    for sub in ("p0", "p1", "same"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rng = np.random.default_rng([seed, i, *map(ord, "jnd/" + category)])
        ref = reference_patch(rng, size)
        distorted = distort(ref, FAMILIES[category], rng, 0.0, 0.5)
        same = observe(see_same(perceived_difference(ref, distorted)), OBSERVERS["jnd"], rng)
        pair = (ref, distorted) if rng.random() < 0.5 else (distorted, ref)
        name = f"{i:06d}"
        _save(pair[0], folder / "p0" / f"{name}.png")
        _save(pair[1], folder / "p1" / f"{name}.png")
        np.save(folder / "same" / f"{name}.npy", np.array([same], np.float32))


def generate_bapps(
    out, num_train: int, num_val: int, patch_size: int = 64, seed: int = 0, num_jnd: int | None = None
) -> Path:
    """Write a BAPPS-format tree under `out` (num_train per train category, num_val per val category)."""
    out = Path(out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # patch-sized tensor ops: thread start-up costs more than it saves
    try:
        for category in TRAIN_CATEGORIES:
            write_2afc_category(out, "train", category, num_train, patch_size, seed)
        for category in VAL_CATEGORIES:
            write_2afc_category(out, "val", category, num_val, patch_size, seed)
        for category in JND_CATEGORIES:
            write_jnd_category(out, category, num_val if num_jnd is None else num_jnd, patch_size, seed)
    finally:
        torch.set_num_threads(threads)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic BAPPS-format dataset (2AFC + JND).")
    parser.add_argument("--out", required=True, help="output root (gets 2afc/ and jnd/)")
    parser.add_argument("--num_train", type=int, default=500, help="triplets per train category")
    parser.add_argument("--num_val", type=int, default=100, help="triplets per val category (and JND pairs)")
    parser.add_argument("--num_jnd", type=int, default=None, help="JND pairs per category (default --num_val)")
    parser.add_argument("--patch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = generate_bapps(args.out, args.num_train, args.num_val, args.patch_size, args.seed, args.num_jnd)
    print(f"wrote a BAPPS-format dataset to {root}")


if __name__ == "__main__":
    main()
