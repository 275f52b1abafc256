"""Data: transforms, the built-in shapes dataset, folder datasets with awkward/broken files, loader determinism."""

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from src.config import TrainConfig
from src.data import DatasetError, build_dataset
from src.data.image_folder import ClassFolderDataset, ImageFolderDataset
from src.data.loader import InfiniteLoader, collate
from src.data.shapes import COLORS, SHAPES, ShapesDataset, caption
from src.data.transforms import ImageTransform, load_image, random_flip, to_pil_images, to_rgb


# ----------------------------------------------------------------------------------------------------------------
# transforms
# ----------------------------------------------------------------------------------------------------------------


def test_transform_resizes_shorter_side_centre_crops_and_scales():
    # a 40 x 20 (W x H) image: left half black, right half white, a red column in the middle
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, 20:] = 255
    x = ImageTransform(10, "nearest")(Image.fromarray(arr))
    assert x.shape == (3, 10, 10)
    assert x.min() == -1.0 and x.max() == 1.0
    # shorter side 20 -> 10 makes it 20 x 10; the centre crop keeps columns 5..14: half black, half white
    assert (x[:, :, :5] == -1).all() and (x[:, :, 5:] == 1).all()


def test_random_flip_is_reproducible_and_respects_p():
    x = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).view(2, 3, 2, 4)
    assert torch.equal(random_flip(x, 0.0), x)
    assert torch.equal(random_flip(x, 1.0), x.flip(-1))
    a = torch.randn(64, 1, 1, 2)
    f1 = random_flip(a, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(f1, random_flip(a, 0.5, torch.Generator().manual_seed(3)))
    flipped = (random_flip(x.repeat(32, 1, 1, 1), 0.5, torch.Generator().manual_seed(0)) != x.repeat(32, 1, 1, 1))
    frac = flipped.flatten(1).any(1).float().mean().item()
    assert 0.2 < frac < 0.8


def test_to_rgb_handles_every_mode():
    rgb = Image.new("RGB", (4, 4), (10, 200, 30))
    cases = {
        "L": rgb.convert("L"),
        "P": rgb.convert("P"),
        "CMYK": rgb.convert("CMYK"),
        "RGBA": Image.new("RGBA", (4, 4), (0, 0, 0, 0)),  # fully transparent -> white
        "I;16": Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)),
        "F01": Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)),  # float in [0, 1]
        "F255": Image.fromarray(np.full((4, 4), 128.0, dtype=np.float32)),  # float in [0, 255]
    }
    out = {mode: to_rgb(img) for mode, img in cases.items()}
    assert all(o.mode == "RGB" and o.size == (4, 4) for o in out.values())
    assert np.asarray(out["RGBA"]).min() == 255
    assert np.asarray(out["I;16"]).min() == 255  # 16-bit full scale -> 8-bit full scale
    assert np.asarray(out["F01"]).min() == np.asarray(out["F255"]).max() == 128  # mid-grey either way
    assert np.abs(np.asarray(out["CMYK"]).astype(int) - np.asarray(rgb).astype(int)).max() <= 2


def test_a_transparent_colour_is_composited_onto_white_like_alpha(tmp_path):
    # PNG's tRNS chunk: grayscale and RGB PNGs name one colour as fully transparent, as a palette can
    Image.new("L", (4, 4), 0).save(tmp_path / "gray.png", transparency=0)
    Image.new("RGB", (4, 4), (0, 0, 0)).save(tmp_path / "rgb.png", transparency=(0, 0, 0))
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "rgba.png")
    for name in ("gray.png", "rgb.png", "rgba.png"):
        assert np.asarray(load_image(tmp_path / name)).min() == 255, name


def test_an_exif_rotated_photo_is_loaded_upright(tmp_path):
    """A camera stores the sensor's pixels and an orientation tag (6: turn 90 degrees clockwise to view); loading
    must apply it, or the photo trains sideways. cc_prep's resize goes through the same decode."""
    from src.data.cc_prep import validate_image
    from src.data.transforms import EXIF_ORIENTATION, load_image

    stored = Image.new("RGB", (16, 8), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 8, 8))  # the left half red, as stored
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    stored.save(tmp_path / "photo.jpg", quality=95, exif=exif.tobytes())
    upright = load_image(tmp_path / "photo.jpg")
    assert upright.size == (8, 16)  # portrait, as the camera saw it
    top = np.asarray(upright)[2, 4]
    assert top[0] > 200 and top[2] < 60  # stored left becomes the top after a clockwise turn
    small, _ = validate_image((tmp_path / "photo.jpg").read_bytes(), img_size=4)  # resized and re-encoded: upright
    assert Image.open(io.BytesIO(small)).size == (4, 8)
    Image.new("RGB", (16, 8)).save(tmp_path / "plain.jpg")  # no tag: nothing turns
    assert load_image(tmp_path / "plain.jpg").size == (16, 8)


def test_to_pil_round_trip():
    x = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1)
    assert to_pil_images(x)[0].getpixel((0, 0)) == (0, 128, 255)


# ----------------------------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------------------------


def test_shapes_is_deterministic_and_captions_match_the_drawing():
    a, b, c = ShapesDataset(20, 24, seed=1), ShapesDataset(20, 24, seed=1), ShapesDataset(20, 24, seed=2)
    for i in range(5):
        assert torch.equal(a[i]["image"], b[i]["image"]) and a[i]["caption"] == b[i]["caption"]
    assert any(not torch.equal(a[i]["image"], c[i]["image"]) for i in range(5))
    for i in range(10):
        color, shape, background, text = a.attributes(i)
        item = a[i]
        assert item["image"].shape == (3, 24, 24) and item["label"] == SHAPES.index(shape)
        assert color in text and shape in text and background in text and color != background
        # the corner pixel has the background colour, and some pixels have the shape's colour
        pixels = ((item["image"] + 1) * 127.5).round()  # (3, H, W) in 0..255
        assert torch.allclose(pixels[:, 0, 0], torch.tensor(COLORS[background], dtype=torch.float32), atol=3)
        shape_rgb = torch.tensor(COLORS[color], dtype=torch.float32)[:, None, None]
        assert ((pixels - shape_rgb).abs().amax(0) <= 3).sum() >= 10


def test_caption_grammar():
    assert caption("orange", "circle", "blue") == "an orange circle on a blue background"
    assert caption("red", "square", "white") == "a red square on a white background"


# ----------------------------------------------------------------------------------------------------------------
# folders with awkward and broken files
# ----------------------------------------------------------------------------------------------------------------


def make_mixed_folder(folder):
    """Readable: RGB, grayscale, CMYK JPEG, 16-bit PNG, RGBA, palette (one in a subfolder). Unreadable: 2."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(folder / "rgb.png")
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8), mode="L").save(folder / "gray.jpg")
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).convert("CMYK").save(folder / "cmyk.jpg")
    (folder / "sub").mkdir()
    Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)).save(folder / "sub" / "deep.png")
    Image.new("RGBA", (20, 20), (255, 0, 0, 128)).save(folder / "rgba.png")
    Image.new("RGB", (20, 20), (0, 0, 255)).convert("P").save(folder / "palette.gif")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    full = (folder / "rgb.png").read_bytes()
    (folder / "truncated.png").write_bytes(full[: len(full) // 2])
    (folder / "notes.txt").write_text("ignored: not an image extension")
    return {"good": 6, "bad": 2}


def test_folder_dataset_converts_modes_and_skips_broken_files(tmp_path, caplog):
    counts = make_mixed_folder(tmp_path / "data")
    ds = ImageFolderDataset(tmp_path / "data", 16)
    assert len(ds) == counts["good"] + counts["bad"]
    with caplog.at_level(logging.WARNING):
        items = [ds[i] for i in range(len(ds))]
        items += [ds[i] for i in range(len(ds))]  # a second epoch warns no more
    names = {p.name: item for p, item in zip(ds.paths, items)}
    assert names["corrupt.jpg"] is None and names["truncated.png"] is None
    good = [it for it in items[: len(ds)] if it is not None]
    assert len(good) == counts["good"]
    assert all(it["image"].shape == (3, 16, 16) and -1 <= it["image"].min() <= it["image"].max() <= 1 for it in good)
    warnings = [r for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert len(warnings) == counts["bad"]
    assert any("corrupt.jpg" in r.getMessage() for r in warnings)


def test_loader_drops_and_counts_unreadable_files(tmp_path):
    counts = make_mixed_folder(tmp_path / "data")
    ds = ImageFolderDataset(tmp_path / "data", 16)
    loader = InfiniteLoader(ds, batch_size=4, seed=0)
    batches = iter(loader)
    seen = sum(next(batches)["image"].shape[0] for _ in range(loader.batches_per_epoch))
    assert seen == counts["good"] and loader.num_skipped == counts["bad"]


class Unreadable(torch.utils.data.Dataset):
    """Every item unreadable (None, as a folder of git-lfs pointers gives); fails the test past `limit` reads."""

    def __init__(self, n: int, limit: int = 200):
        self.n, self.limit, self.reads = n, limit, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads += 1
        if self.reads > self.limit:
            raise RuntimeError(f"the loader is still drawing after {self.limit} unreadable items")
        return None


def test_a_process_whose_whole_epoch_is_unreadable_stops_with_a_dataset_error():
    # it drew empty batches forever: stage 2 on a folder of 4 broken files logged 2.5 million 'skipped' lines in
    # 10 minutes and never finished a step, so it ignored SIGTERM too
    with pytest.raises(DatasetError, match="no readable item in a whole epoch: the 4 items of this process's share"):
        next(iter(InfiniteLoader(Unreadable(9), batch_size=2, seed=0, rank=1, world_size=2)))
    resumed = InfiniteLoader(Unreadable(9), batch_size=2, seed=0, start_batch=3)  # mid-epoch: the next one decides
    with pytest.raises(DatasetError):
        next(iter(resumed))
    assert resumed.batches_seen == 8 and resumed.num_skipped == 10  # the end of epoch 0, then all of epoch 1


def test_a_decompression_bomb_is_skipped_and_counted_like_other_broken_files(tmp_path, caplog):
    # a 24 KB 1-bit PNG that declares 2e8 pixels, over twice PIL's limit: PIL raises DecompressionBombError,
    # which is not an OSError
    assert 20000 * 10000 > 2 * Image.MAX_IMAGE_PIXELS
    (tmp_path / "data").mkdir()
    Image.new("1", (20000, 10000)).save(tmp_path / "data" / "bomb.png")
    Image.new("RGB", (20, 20), (0, 0, 255)).save(tmp_path / "data" / "ok.png")
    ds = ImageFolderDataset(tmp_path / "data", 16)
    with caplog.at_level(logging.WARNING):
        batch = next(iter(InfiniteLoader(ds, batch_size=2, seed=0)))
    assert batch["num_skipped"] == 1 and batch["image"].shape == (1, 3, 16, 16)
    assert any("skipping unreadable image" in r.getMessage() and "bomb.png" in r.getMessage() for r in caplog.records)


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        ImageFolderDataset(tmp_path / "empty", 16)
    with pytest.raises(DatasetError, match="not found"):
        ImageFolderDataset(tmp_path / "missing", 16)
    with pytest.raises(DatasetError, match="--path_to_dataset"):
        build_dataset("celebahq", None, 16, TrainConfig())


def test_imagenet_layout_sorts_classes(tmp_path):
    for name in ["zebra", "ant", "moose"]:
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "a.png")
    ds = ClassFolderDataset(tmp_path, 8)
    assert ds.classes == ["ant", "moose", "zebra"]
    assert [ds[i]["label"] for i in range(3)] == [0, 1, 2]
    assert ds.paths[2].parent.name == "zebra"


def test_hidden_folders_and_files_are_neither_classes_nor_images(tmp_path, caplog):
    # a notebook's .ipynb_checkpoints sorts first: as a class it would shift every real label by one
    for name in ["cat", "dog", ".ipynb_checkpoints"]:
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "a.png")
    (tmp_path / "cat" / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cat" / ".ipynb_checkpoints" / "a-checkpoint.png")  # a copy
    (tmp_path / "dog" / "._a.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    with caplog.at_level(logging.INFO, logger="src.data.image_folder"):
        ds = ClassFolderDataset(tmp_path, 8)
        flat = ImageFolderDataset(tmp_path, 8)
    assert ds.classes == ["cat", "dog"]
    assert [(p.relative_to(tmp_path).as_posix(), label) for p, label in zip(ds.paths, ds.labels)] == [
        ("cat/a.png", 0), ("dog/a.png", 1)]
    assert any("skipped 1 hidden folder" in r.getMessage() for r in caplog.records)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in flat.paths) == ["cat/a.png", "dog/a.png"]
    assert any("skipped 3 image file(s) below hidden names" in r.getMessage() for r in caplog.records)



def test_a_class_folder_without_images_is_refused_not_given_a_label(tmp_path):
    # a macOS zip's __MACOSX holds only ._ resource forks: as a class it took label 0 and shifted every real one
    for name in ["cat", "dog"]:
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "a.png")
    (tmp_path / "__MACOSX" / "cat").mkdir(parents=True)
    (tmp_path / "__MACOSX" / "cat" / "._a.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    with pytest.raises(DatasetError, match="class folder.s. with no images in .*: __MACOSX "):
        ClassFolderDataset(tmp_path, 8)
    (tmp_path / "__MACOSX" / "cat" / "._a.png").unlink()
    (tmp_path / "__MACOSX" / "cat").rmdir()
    (tmp_path / "__MACOSX").rmdir()
    assert ClassFolderDataset(tmp_path, 8).classes == ["cat", "dog"]

# ----------------------------------------------------------------------------------------------------------------
# loader
# ----------------------------------------------------------------------------------------------------------------


class Indexed(torch.utils.data.Dataset):
    def __len__(self):
        return 23

    def __getitem__(self, i):
        return {"image": torch.full((1,), float(i)), "label": i}


def take(loader, n):
    it = iter(loader)
    return [next(it)["label"].tolist() for _ in range(n)]


def test_loader_is_a_pure_function_of_seed_and_resumes_exactly():
    full = take(InfiniteLoader(Indexed(), 4, seed=5), 12)  # crosses two epoch boundaries (5 batches / epoch)
    assert full == take(InfiniteLoader(Indexed(), 4, seed=5), 12)
    assert full != take(InfiniteLoader(Indexed(), 4, seed=6), 12)
    assert take(InfiniteLoader(Indexed(), 4, seed=5, start_batch=7), 5) == full[7:]
    epoch0 = sum(full[:5], [])
    assert len(set(epoch0)) == 20  # no repeats within an epoch


def test_loader_shards_are_disjoint_across_processes():
    r0 = sum(take(InfiniteLoader(Indexed(), 2, seed=1, rank=0, world_size=2), 5), [])
    r1 = sum(take(InfiniteLoader(Indexed(), 2, seed=1, rank=1, world_size=2), 5), [])
    assert not set(r0) & set(r1) and len(r0) == len(r1) == 10


def test_a_dataset_smaller_than_the_processes_is_a_dataset_error_and_a_small_one_gets_smaller_batches():
    # a bare ValueError: the trainers printed it with a traceback, as a bug, instead of their one-line input error
    with pytest.raises(DatasetError, match="a dataset of 1 item"):
        InfiniteLoader(Unreadable(1), 4, rank=1, world_size=2)
    r0, r1 = (take(InfiniteLoader(Indexed(), 16, seed=1, rank=r, world_size=2), 2) for r in (0, 1))
    assert [len(b) for b in r0 + r1] == [11] * 4 and not set(r0[0]) & set(r1[0])  # 23 items: 11 each, 1 left out


CRASH_WITH_WORKERS = """
import torch
from src.data.loader import InfiniteLoader

class Items(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"image": torch.zeros(1)}

loader = InfiniteLoader(Items(), 2, num_workers=2)
batches = iter(loader)
next(batches)
raise RuntimeError("the training step failed")
"""


def test_a_run_that_fails_with_loader_workers_alive_exits(tmp_path):
    # the workers ignore SIGTERM, which is how multiprocessing's exit hook stops them: without the loader's own
    # exit hook the failed process waited forever for its workers
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "crash.py"
    script.write_text(CRASH_WITH_WORKERS)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script)], cwd=root, env=env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the script and its workers
        proc.communicate()
        pytest.fail("the process hung at exit, waiting for its data loader workers")
    assert proc.returncode == 1 and "the training step failed" in err


def test_collate_pads_variable_length_and_keeps_captions():
    batch = collate([{"emb": torch.ones(2, 3), "caption": "a"}, None, {"emb": torch.ones(4, 3), "caption": "b"}])
    assert batch["num_skipped"] == 1 and batch["caption"] == ["a", "b"]
    assert batch["emb"].shape == (2, 4, 3) and batch["emb_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
