import random

import numpy as np
import pytest
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


# ------------------------------------------------------------------------------- ground truth and the clean score


def test_ground_truth_reads_back_at_least_99_percent_and_clean():
    """The dataset's own drawings, sampled as the dataset samples them (positions, sizes, rotations, colours)."""
    from src.data.shapes import ShapesDataset

    ds = ShapesDataset(400, 32, seed=11)
    expected = [ds.attributes(i)[:3] for i in range(len(ds))]
    images = [render(*e, 32, random.Random(f"11:{i}:draw")) for i, e in enumerate(expected)]
    result = score(expected, images)
    for key in ("shape_color", "background_color", "shape", "clean"):
        assert result[key] >= 0.99, (key, result[key])


def _canvas(background: str) -> np.ndarray:
    return np.tile(np.array(COLORS[background], dtype=np.uint8), (32, 32, 1))


def test_clean_rejects_mosaics_second_shapes_two_colour_shapes_and_blank_images():
    good = render("red", "square", "blue", 32)
    assert read_image(good).clean
    two_shapes = np.asarray(good).copy()
    two_shapes[1:5, 1:5] = COLORS["red"]  # a second region in the corner
    two_colours = np.asarray(render("red", "square", "blue", 32)).copy()
    two_colours[:16] = np.where((two_colours[:16] == COLORS["red"]).all(-1, keepdims=True), COLORS["yellow"], two_colours[:16])
    mosaic = _canvas("blue")
    for k, name in enumerate(["red", "green", "white", "orange"]):  # patches of colour, no single shape
        y, x = divmod(k, 2)
        mosaic[4 + 12 * y: 14 + 12 * y, 4 + 12 * x: 14 + 12 * x] = COLORS[name]
    stained = np.asarray(render("white", "circle", "black", 32)).copy()
    stained[26:32, 0:10] = COLORS["purple"]  # the background is not one colour
    for arr in (two_shapes, two_colours, mosaic, stained, _canvas("green")):
        assert not read_image(Image.fromarray(arr)).clean
    result = score([("red", "square", "blue")] * 2, [good, Image.fromarray(mosaic)])
    assert result["clean"] == 0.5 and result["clean_and_right"] == 0.5


def test_no_single_shape_reads_as_no_shape_class_and_two_shapes_as_their_own_class():
    """Moments over everything that is not background made uniform noise a purple square on purple, and two
    circles a square: a noise generator scored every square prompt, and two circles answered one."""
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert read_image(Image.fromarray(noise)).shape is None
    two = _canvas("blue")
    yy, xx = np.mgrid[:32, :32]
    for cy, cx in ((9, 9), (22, 22)):
        two[(yy - cy) ** 2 + (xx - cx) ** 2 <= 16] = COLORS["red"]
    reading = read_image(Image.fromarray(two))
    assert reading.shape == "circle" and not reading.clean


def test_clean_rejects_smeared_edges_that_keep_the_right_colours():
    """A blur of radius 2.5, or the mean of many drawings (a mean-seeking generator's blob), blends the two right
    colours but has no sharp edge; radius-1 blur, as the demo's decoder gives, is still clean."""
    square = render("red", "square", "blue", 32, random.Random(1))
    assert read_image(square.filter(ImageFilter.GaussianBlur(1))).clean
    assert not read_image(square.filter(ImageFilter.GaussianBlur(2.5))).clean
    rng = random.Random(7)
    mean = np.mean([np.asarray(render("red", "circle", "green", 32, rng), float) for _ in range(100)], axis=0)
    assert not read_image(Image.fromarray(mean.round().astype(np.uint8))).clean  # read as clean before


def test_shape_moments_match_theory_and_ignore_blur():
    """c_4 of a square is 1/60 and c_3 of a disc or square is 0, at any position, size and rotation; blur moves them
    only a little (exactly invariant in theory; dropping faint coverage far from the shape costs ~10 %)."""
    from src.evaluation.shapes import coverage, shape_moments

    def moments(img):
        arr = np.asarray(img, dtype=np.float64)
        return shape_moments(coverage(arr, np.array(COLORS["blue"], float), np.array(COLORS["red"], float)))

    rng = random.Random(5)
    for _ in range(10):
        square = render("red", "square", "blue", 32, rng)
        sharp, soft = moments(square), moments(square.filter(ImageFilter.GaussianBlur(1.2)))
        assert sharp[1] == pytest.approx(1 / 60, rel=0.05) and sharp[0] < 0.004
        assert soft[1] == pytest.approx(sharp[1], rel=0.15) and soft[0] < 0.004
        disc = moments(render("red", "circle", "blue", 32, rng))
        assert disc.max() < 0.002
        triangle = render("red", "triangle", "blue", 32, rng)
        sharp, soft = moments(triangle), moments(triangle.filter(ImageFilter.GaussianBlur(1.2)))
        assert sharp[0] > 0.06 and sharp[1] < 0.004
        assert soft[0] == pytest.approx(sharp[0], rel=0.15) and soft[1] < 0.004


def test_reads_soft_noisy_shapes_as_a_generator_draws_them():
    """Blur (radius 1.2) and noise (std 10) as a soft decoder makes them: shapes and cleanliness still read."""
    expected, images = _renders(200, 32, seed=6)
    noise = np.random.default_rng(6)
    soft = [Image.fromarray(np.clip(np.asarray(im.filter(ImageFilter.GaussianBlur(1.2)), float)
                                    + noise.normal(0, 10, (32, 32, 3)), 0, 255).astype(np.uint8)) for im in images]
    result = score(expected, soft)
    assert result["shape"] >= 0.97 and result["clean"] >= 0.95


def test_evaluate_shapes_sources_bound_the_diffusion_model(tmp_path):
    """--source renders scores the evaluator itself (all right); --source reconstructions scores an autoencoder
    (here an untrained one, which loses the shapes): the flags need only a stage-1 file."""
    import json

    import evaluate_shapes
    from src.config import VAEConfig
    from tests.stage2_helpers import make_vae_file

    vae = make_vae_file(tmp_path / "vae.safetensors", vae_cfg=VAEConfig(
        img_size=32, latent_channels=4, residual_layers_per_block=1, vae_channels_per_block=[8, 16],
        groupnorm_groups=4, attention_layers=1))
    scores = {}
    for source in ("renders", "reconstructions"):
        evaluate_shapes.main(["--path_to_weights", str(vae), "--source", source, "--num_prompts", "24",
                              "--device", "cpu", "--output", str(tmp_path / source)])
        scores[source] = json.loads((tmp_path / source / "results.json").read_text())
    assert all(scores["renders"][k] == 1.0 for k in ("shape_color", "background_color", "shape", "clean"))
    assert scores["reconstructions"]["clean"] < 0.5 and scores["reconstructions"]["source"].startswith("autoencoder")


@pytest.mark.parametrize("color,background", [("yellow", "orange"), ("orange", "yellow"), ("purple", "blue")])
def test_low_contrast_pairs_read_back_when_soft(color, background):
    """The closest palette pairs (87 and 119 apart in RGB) still give a mask when a decoder softens their edge."""
    rng = random.Random(9)
    for shape in SHAPES:
        img = render(color, shape, background, 32, rng).filter(ImageFilter.GaussianBlur(1.0))
        reading = read_image(img)
        assert (reading.color, reading.shape, reading.background, reading.clean) == (color, shape, background, True)


def test_a_misspelt_exclusion_file_or_no_prompts_is_an_error_not_a_quiet_default(tmp_path, capsys):
    import evaluate_shapes

    with pytest.raises(FileNotFoundError, match="--exclude_prompts .*typo.txt: no such file"):
        evaluate_shapes.main(["--path_to_weights", "x", "--source", "renders", "--exclude_prompts",
                              str(tmp_path / "typo.txt"), "--output", str(tmp_path / "out")])
    with pytest.raises(SystemExit):
        evaluate_shapes.parse_args(["--path_to_weights", "x", "--num_prompts", "0"])
    assert "--num_prompts must be at least 1" in capsys.readouterr().err
    assert evaluate_shapes.parse_args(["--path_to_weights", "x"]).exclude_prompts.endswith("configs/quickstart/prompts.txt")


def test_num_steps_with_ddpm_or_below_one_is_refused_not_ignored(capsys):
    """DDPM runs every training step: a --num_steps beside it used to be dropped silently (1000 steps run for 5)."""
    import evaluate_shapes

    for extra, message in ((["--sampler", "ddpm", "--num_steps", "5"], "DDPM runs every training step"),
                           (["--num_steps", "0"], "--num_steps must be at least 1")):
        with pytest.raises(SystemExit):
            evaluate_shapes.parse_args(["--path_to_weights", "x", *extra])
        assert message in capsys.readouterr().err
    assert evaluate_shapes.parse_args(["--path_to_weights", "x", "--sampler", "ddpm"]).num_steps is None
    assert evaluate_shapes.parse_args(["--path_to_weights", "x", "--sampler", "ddim", "--num_steps", "5"]).num_steps == 5
