"""`shapes`: a built-in, procedurally drawn, captioned dataset (no files needed).

Each image is one coloured shape on a plain coloured background, with a caption naming both colours and the
shape, e.g. "a red circle on a blue background". Item `i` is a pure function of (seed, i), so the dataset is
identical on every machine and any size. The vocabulary is public so anyone can write prompts it understands:

    COLORS            name -> RGB
    SHAPES            shape names
    CAPTION_TEMPLATE  the canonical caption; CAPTION_TEMPLATES holds the wordings used for training
"""

from __future__ import annotations

import math
import random
import re

from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from .transforms import ImageTransform

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 230),
    "yellow": (245, 225, 40),
    "purple": (140, 50, 190),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: list[str] = ["circle", "square", "triangle"]

CAPTION_TEMPLATE = "a {color} {shape} on a {background} background"
CAPTION_TEMPLATES: list[str] = [
    CAPTION_TEMPLATE,
    "a {color} {shape} on {background}",
    "{color} {shape}, {background} background",
    "a picture of a {color} {shape} over a {background} background",
    "a {shape} coloured {color} on a {background} background",
    "{background} background with a {color} {shape}",
    "one {color} {shape} in front of {background}",
    "a drawing of a {color} {shape}, the background is {background}",
]

SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled, for anti-aliased edges


def caption(color: str, shape: str, background: str, template: str = CAPTION_TEMPLATE) -> str:
    text = template.format(color=color, shape=shape, background=background)
    return re.sub(r"\ba (?=[aeiou])", "an ", text)  # "an orange circle"


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [math.pi / 4 + k * math.pi / 2 for k in range(4)]
        r = r * 0.9 * math.sqrt(2)  # a square of side 1.8 r: about the circle's visual size
    else:  # triangle
        corners = [-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
        r = r * 1.2
    return [(cx + r * math.cos(a + angle), cy + r * math.sin(a + angle)) for a in corners]


def render(
    color: str, shape: str, background: str, size: int, rng: random.Random | None = None
) -> Image.Image:
    """Draw one `size` x `size` RGB image. `rng` jitters position, size and rotation (centred when None)."""
    s = size * SUPERSAMPLE
    img = Image.new("RGB", (s, s), COLORS[background])
    draw = ImageDraw.Draw(img)
    if rng is None:
        cx = cy = s / 2
        r, angle = 0.3 * s, 0.0
    else:
        r = rng.uniform(0.22, 0.34) * s
        margin = r * 1.25
        cx = rng.uniform(margin, s - margin)
        cy = rng.uniform(margin, s - margin)
        angle = rng.uniform(-0.25, 0.25)  # radians: mild rotation, shapes stay recognisable
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLORS[color])
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r, angle), fill=COLORS[color])
    return img.resize((size, size), Image.Resampling.LANCZOS)


def sample_attributes(rng: random.Random) -> tuple[str, str, str]:
    """A random (colour, shape, background) with the shape's colour different from the background's."""
    names = list(COLORS)
    color = rng.choice(names)
    background = rng.choice([n for n in names if n != color])
    return color, rng.choice(SHAPES), background


class ShapesDataset(Dataset):
    """Items are {'image': (3, H, W) in [-1, 1], 'caption': str, 'label': shape index}."""

    def __init__(self, num_images: int, img_size: int, seed: int = 0, interpolation: str = "bicubic"):
        if num_images <= 0:
            raise ValueError("shapes dataset needs num_images > 0")
        self.num_images = num_images
        self.img_size = img_size
        self.seed = seed
        self.transform = ImageTransform(img_size, interpolation)

    def __len__(self) -> int:
        return self.num_images

    def attributes(self, index: int) -> tuple[str, str, str, str]:
        """(colour, shape, background, caption) of item `index`."""
        rng = random.Random(f"{self.seed}:{index}")
        color, shape, background = sample_attributes(rng)
        template = rng.choice(CAPTION_TEMPLATES)
        return color, shape, background, caption(color, shape, background, template)

    def __getitem__(self, index: int) -> dict:
        color, shape, background, text = self.attributes(index)
        rng = random.Random(f"{self.seed}:{index}:draw")
        image = render(color, shape, background, self.img_size, rng)
        return {"image": self.transform(image), "caption": text, "label": SHAPES.index(shape)}
