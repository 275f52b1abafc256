import random

import numpy as np
from PIL import Image, ImageFilter

from src.data.shapes import COLORS, SHAPES, render, sample_attributes
from src.evaluation.shapes import read_image, score


def _renders(n, size, seed, degrade=False):
    rng, noise = random.Random(seed), np.random.default_rng(seed)
    expected, images = [], []
    for _ in range(n):
        attrs = sample_attributes(rng)
        img = render(*attrs, size, rng)
        if degrade:  # what a generator's blur and noise look like
            arr = np.asarray(img.filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float64)
            arr = arr + noise.normal(0, 12, arr.shape)
            img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        expected.append(attrs)
        images.append(img)
    return expected, images


def test_reads_back_rendered_shapes():
    expected, images = _renders(120, 32, seed=3)
    result = score(expected, images)
    assert result["shape_color"] == 1.0 and result["background_color"] == 1.0
    assert result["shape"] >= 0.98


def test_robust_to_blur_and_noise():
    expected, images = _renders(120, 32, seed=4, degrade=True)
    result = score(expected, images)
    assert result["shape_color"] >= 0.97 and result["background_color"] >= 0.97 and result["shape"] >= 0.9


def test_wrong_image_scores_zero():
    img = render("red", "circle", "blue", 32)
    assert read_image(img).shape == "circle"
    result = score([("green", "square", "white")], [img])
    assert result["shape_color"] == 0 and result["shape"] == 0 and result["background_color"] == 0


def test_blank_image_has_no_shape():
    reading = read_image(Image.new("RGB", (32, 32), COLORS["white"]))
    assert reading.background == "white" and reading.shape is None
    assert set(SHAPES) == {"circle", "square", "triangle"}
