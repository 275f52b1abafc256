"""Image decoding and transforms shared by every dataset.

Any PIL mode (grayscale, RGBA, CMYK, palette, 16-bit) becomes 8-bit RGB, turned upright by its EXIF orientation
tag; images are resized on their shorter side, centre-cropped to a square and scaled to [-1, 1]. Random flips are
applied per batch by the trainer (`random_flip`) with a generator whose state is checkpointed, so a resumed run
sees the same flips.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import functional as TF
from torchvision.transforms import InterpolationMode

INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "lanczos": InterpolationMode.LANCZOS,
}

# What PIL raises for a file that is not a usable image: OSError (truncated, unknown format), ValueError and
# SyntaxError (malformed headers), and DecompressionBombError (a declared size over 2 x Image.MAX_IMAGE_PIXELS),
# which subclasses Exception, not OSError. Datasets catch exactly these to skip a file.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


EXIF_ORIENTATION = 0x0112  # the EXIF tag a camera sets when the pixels are stored rotated or mirrored


def to_rgb(img: Image.Image) -> Image.Image:
    """Return an 8-bit RGB copy of any PIL image, upright as its EXIF orientation says (a phone photo stored
    sideways), with alpha, or a PNG's transparent colour, composited onto white."""
    if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:  # PNG tRNS / GIF: a colour that is see-through
        img = img.convert("RGBA")
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F" and arr.max() <= 1.0:
            hi = 1.0  # a float image in [0, 1] (scientific TIFFs); 0-255 floats keep the integer rule below
        else:
            hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path) -> Image.Image:
    """Open and fully decode an image file as RGB. Raises one of IMAGE_ERRORS on unreadable or truncated files."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


class ImageTransform:
    """PIL image -> (3, size, size) float tensor in [-1, 1]: resize shorter side, centre crop."""

    def __init__(self, img_size: int, interpolation: str = "bicubic"):
        self.img_size = img_size
        self.interpolation = INTERPOLATIONS[interpolation]

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = to_rgb(img)
        img = TF.resize(img, self.img_size, interpolation=self.interpolation, antialias=True)
        img = TF.center_crop(img, [self.img_size, self.img_size])
        x = TF.pil_to_tensor(img).float() / 127.5 - 1.0  # (3, H, W) in [-1, 1]
        return x.clamp(-1.0, 1.0)


def random_flip(images: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Flip each image of a (B, C, H, W) batch horizontally with probability p. The coin flips are drawn on the
    generator's device (the images' without one), so a generator on the GPU costs no host round trip."""
    if p <= 0:
        return images
    device = generator.device if generator is not None else images.device
    flip = torch.rand(images.shape[0], generator=generator, device=device) < p  # (B,)
    flip = flip.to(images.device, non_blocking=True)[:, None, None, None]
    return torch.where(flip, images.flip(-1), images)


def to_pil_images(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) tensor in [-1, 1] -> list of PIL RGB images."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in x]
