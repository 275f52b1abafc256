"""FID / KID arithmetic, the reference-statistics cache, the work split over processes, conditions and the
Inception weights file (missing, refused). The scripts end to end are in test_evaluate.py."""

from __future__ import annotations

import collections
import hashlib
import itertools
import os
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from src.config import TrainConfig
from src.evaluation.conditions import balanced_labels, evaluation_prompts, proportional_labels
from src.evaluation.fid import (
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
    mmd2_unbiased,
    stats_from_features,
)
from src.evaluation.inception import INCEPTION_FILE, INCEPTION_URL, InceptionWeightsError, load_inception
from src.evaluation.reference import (
    ImageSource,
    cache_entry,
    cache_key,
    folder_fingerprint,
    load_stats_file,
    reference_stats,
    save_stats_file,
)
from src.evaluation.sharding import batch_ranges, gather_in_order, map_batches, process_batches


def _gaussian(n: int, d: int, seed: int, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return scale * rng.normal(size=(n, d)) @ mixing + rng.normal(size=d) * 0.1


# --------------------------------------------------------------------------------------------------- FID


def _scipy_fid(x: np.ndarray, y: np.ndarray) -> float:
    """The textbook formula, as pytorch-fid writes it: scipy's matrix square root of S1 S2."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy_and_torchmetrics():
    from torchmetrics.image.fid import _compute_fid

    x, y = _gaussian(300, 24, seed=0), _gaussian(250, 24, seed=1, scale=1.5) + 0.3
    (mu1, s1), (mu2, s2) = feature_statistics(x), feature_statistics(y)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours > 1.0
    assert ours == pytest.approx(_scipy_fid(x, y), rel=1e-7)
    peer = _compute_fid(*(torch.from_numpy(a) for a in (mu1, s1, mu2, s2))).item()
    assert ours == pytest.approx(peer, rel=1e-6)


def test_fid_of_a_set_against_itself_is_zero_even_when_singular():
    x = _gaussian(200, 16, seed=2)
    mu, sigma = feature_statistics(x)
    assert frechet_distance(mu, sigma, mu, sigma) < 1e-9 * np.trace(sigma)
    few = _gaussian(5, 64, seed=3)  # 5 samples in 64-d: a rank-4 covariance
    mu, sigma = feature_statistics(few)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_fid_grows_monotonically_with_the_shift():
    x, y = _gaussian(400, 12, seed=4), _gaussian(400, 12, seed=5)
    direction = np.ones(12) / np.sqrt(12)
    ref = feature_statistics(x)
    fids = [frechet_distance(*ref, *feature_statistics(y + t * direction)) for t in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    same = [frechet_distance(*ref, *feature_statistics(x + t * direction)) for t in (1.0, 3.0)]
    assert same == pytest.approx([1.0, 9.0], rel=1e-6)  # same set shifted: exactly ||t u||^2


# --------------------------------------------------------------------------------------------------- KID


def _brute_force_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]

    def k(a, b):
        return (sum(float(p) * float(q) for p, q in zip(a, b)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_a_brute_force_unbiased_mmd_and_torchmetrics():
    from torchmetrics.image.kid import poly_mmd

    x, y = _gaussian(7, 5, seed=6), _gaussian(7, 5, seed=7) + 0.4
    expected = _brute_force_mmd2(x, y)
    assert mmd2_unbiased(x, y) == pytest.approx(expected, rel=1e-10)
    mean, std = kernel_inception_distance(x, y, subset_size=7, num_subsets=3)  # whole sets, permuted
    assert mean == pytest.approx(expected, rel=1e-10) and std == pytest.approx(0.0, abs=1e-12)
    assert mmd2_unbiased(x, y) == pytest.approx(poly_mmd(torch.from_numpy(x), torch.from_numpy(y)).item(), rel=1e-8)
    uneven = _gaussian(6, 5, seed=8)
    assert mmd2_unbiased(x, uneven) == pytest.approx(_brute_force_mmd2(x, uneven), rel=1e-10)


def test_kid_refuses_subsets_it_cannot_average():
    x, y = _gaussian(6, 4, seed=13), _gaussian(6, 4, seed=14)
    with pytest.raises(ValueError, match="at least 1 subset"):
        kernel_inception_distance(x, y, subset_size=4, num_subsets=0)  # was a NaN mean and std
    with pytest.raises(ValueError, match="at least 2 rows"):
        kernel_inception_distance(x, y, subset_size=1, num_subsets=3)


def test_kid_is_unbiased_where_the_plain_mmd_is_not():
    """Two sets from one distribution: the unbiased estimate averages to 0, the V-statistic stays positive."""
    rng = np.random.default_rng(9)
    unbiased, biased = [], []
    for _ in range(400):
        x, y = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
        unbiased.append(mmd2_unbiased(x, y))
        kxx, kyy, kxy = ((a @ b.T / 4 + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        biased.append(kxx.mean() + kyy.mean() - 2 * kxy.mean())
    se = np.std(unbiased) / np.sqrt(len(unbiased))
    assert abs(np.mean(unbiased)) < 3 * se
    assert np.mean(biased) > 10 * se


# --------------------------------------------------------------------------------------------------- cache


class PixelStats:
    """A cheap stand-in feature extractor of our own: per-channel mean and std, counting its calls."""

    def __init__(self, name: str = "pixel-stats"):
        self.identity = {"extractor": name}
        self.calls = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.cat([images.mean((2, 3)), images.std((2, 3))], 1)  # (B, 6)


def _write_images(folder, count: int, seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_reference_cache_is_reused_then_invalidated_when_the_data_changes(tmp_path):
    data, cache = tmp_path / "faces", tmp_path / "cache"
    _write_images(data, 6)
    source = ImageSource("celebahq", str(data), img_size=8)
    extractor = PixelStats()
    first, status = reference_stats(source, extractor, cache, batch_size=4)
    assert status == "computed" and extractor.calls == 2 and first.count == 6
    assert len(list(cache.glob("*.npz"))) == 1

    again, status = reference_stats(source, extractor, cache, batch_size=4)
    assert status == "cached" and extractor.calls == 2  # read back, nothing extracted
    np.testing.assert_array_equal(again.mu, first.mu)
    np.testing.assert_array_equal(again.features, first.features)

    Image.fromarray(np.full((12, 12, 3), 255, np.uint8)).save(data / "3.png")  # one image changes
    changed, status = reference_stats(source, extractor, cache, batch_size=4)
    assert status == "computed" and extractor.calls == 4
    assert not np.allclose(changed.mu, first.mu)

    _, status = reference_stats(source, PixelStats("another-extractor"), cache, batch_size=4)
    assert status == "computed"  # the feature extractor is part of the key too
    capped, status = reference_stats(ImageSource("celebahq", str(data), 8, max_images=4), extractor, cache)
    assert status == "computed" and capped.count == 4



@pytest.mark.skipif(os.name == "nt" or sys.platform == "darwin", reason="needs a file system that takes any bytes")
def test_the_reference_fingerprint_takes_a_file_name_that_is_not_utf8(tmp_path):
    # a zip made on Windows unpacks Latin-1 names as raw bytes: hashing them crashed --cache_latents and the FID cache
    data = tmp_path / "faces"
    _write_images(data, 2)
    before = folder_fingerprint(data)  # UTF-8 names hash as they did before
    assert before == hashlib.sha256(b"".join(
        f"{p.name}\0{p.stat().st_size}\0{p.stat().st_mtime_ns}\n".encode() for p in sorted(data.iterdir()))).hexdigest()
    os.rename(data / "0.png", os.fsencode(data) + b"/caf\xe9.png")
    assert folder_fingerprint(data) != before
    stats, status = reference_stats(ImageSource("celebahq", str(data), img_size=8), PixelStats(), tmp_path / "cache")
    assert status == "computed" and stats.count == 2

def test_rows_kept_for_kid_span_every_class_of_a_class_sorted_set():
    classes, per_class, keep = 10, 50, 50
    labels = np.repeat(np.arange(classes), per_class)  # dataset order: class 0 first, as an ImageNet folder
    features = np.column_stack([labels, _gaussian(len(labels), 3, seed=11)])  # column 0 names the class
    assert set(labels[:keep]) == {0}  # the first `keep` rows would be one class
    stats = stats_from_features(features, keep=keep)
    kept_labels = stats.features[:, 0].astype(int)
    assert len(stats.features) == keep and set(kept_labels) == set(range(classes))
    assert len({tuple(row) for row in stats.features}) == keep  # distinct rows of the set, no repeats
    np.testing.assert_allclose(stats.mu, features.mean(0))  # mu and sigma still of every row
    np.testing.assert_array_equal(stats_from_features(features, keep=keep).features, stats.features)  # fixed draw


def test_a_cache_written_with_the_first_rows_for_kid_is_not_reused(tmp_path):
    data, cache = tmp_path / "faces", tmp_path / "cache"
    _write_images(data, 6)
    source = ImageSource("celebahq", str(data), img_size=8)
    entry = cache_entry(source, source.build(), PixelStats().identity, cache, keep_features=4)
    # what the code before the random KID subset wrote: the same identity without the subset's description
    old_identity = {k: v for k, v in entry.identity.items() if k != "kid_features"}
    old = stats_from_features(_gaussian(6, 6, seed=12))
    save_stats_file(cache / f"reference_{cache_key(old_identity)}.npz", old, old_identity)
    _, status = reference_stats(source, PixelStats(), cache, batch_size=4, keep_features=4)
    assert status == "computed"
    _, status = reference_stats(source, PixelStats(), cache, batch_size=4, keep_features=5)
    assert status == "computed"  # another number of kept rows is another entry


def _store_repeatedly(path, seed: int, times: int = 20) -> list[str]:
    stats = stats_from_features(_gaussian(2000, 256, seed=seed))
    errors = []
    for _ in range(times):
        try:
            save_stats_file(path, stats, {"writer": seed})
        except OSError as err:
            errors.append(repr(err))
    return errors


def test_two_evaluations_storing_one_reference_at_once_both_succeed(tmp_path):
    """The default cache folder is shared by every run: two evaluations of the same reference (a sweep over
    checkpoints) store the same entry at the same time. A fixed temporary name made one move the other's file
    away (FileNotFoundError at its rename) or both write into one file."""
    import multiprocessing

    path = tmp_path / "cache" / "reference_x.npz"
    with multiprocessing.get_context("fork").Pool(2) as pool:
        errors = pool.starmap(_store_repeatedly, [(path, 0), (path, 1)])
    assert errors == [[], []]
    assert load_stats_file(path).features.shape == (2000, 256)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_unreadable_reference_images_are_skipped_and_counted(tmp_path):
    data = tmp_path / "faces"
    _write_images(data, 5)
    (data / "2.png").write_bytes(b"not a png")
    stats, _ = reference_stats(ImageSource("celebahq", str(data), 8), PixelStats(), tmp_path / "cache", batch_size=2)
    assert stats.count == 4


def test_statistics_files_mu_sigma_only_and_bad_ones(tmp_path):
    x = _gaussian(20, 4, seed=10)
    stats = stats_from_features(x)
    np.savez(tmp_path / "pytorch_fid.npz", mu=stats.mu, sigma=stats.sigma)  # pytorch-fid --save-stats layout
    loaded = load_stats_file(tmp_path / "pytorch_fid.npz")
    assert loaded.features is None and np.allclose(loaded.sigma, stats.sigma)
    full = load_stats_file(save_stats_file(tmp_path / "full.npz", stats, {"k": 1}))
    assert full.count == 20 and full.features.shape == (20, 4)
    np.savez(tmp_path / "bad.npz", mean=stats.mu)
    with pytest.raises(ValueError, match="'mu'"):
        load_stats_file(tmp_path / "bad.npz")


# --------------------------------------------------------------------------------------------------- split


@pytest.mark.parametrize("num_items,batch_size", [(10, 3), (7, 7), (1, 4), (50, 8)])
def test_process_batches_cover_every_item_once_and_balance_the_work(num_items, batch_size):
    for world in (1, 2, 3, 4):
        shares = [process_batches(num_items, batch_size, rank, world) for rank in range(world)]
        items = sorted(i for share in shares for _, start, end in share for i in range(start, end))
        assert items == list(range(num_items))
        counts = [len(share) for share in shares]
        assert max(counts) - min(counts) <= 1
        for share in shares:  # batch k is the same items whatever the number of processes
            assert all(batch_ranges(num_items, batch_size)[k] == (s, e) for k, s, e in share)



def test_proportional_labels_keep_the_reference_shares_in_every_prefix():
    reference = [0] * 900 + [1] * 90 + [2] * 10
    labels = proportional_labels(100, reference, 4)  # class 3: an embedding the reference has no image of
    assert np.bincount(labels, minlength=4).tolist() == [90, 9, 1, 0]
    assert np.bincount(labels[:50], minlength=4).tolist()[:2] == [45, 5]  # spread, not sorted by class
    assert proportional_labels(7, [0, 0, 1], 2).count(0) == 5  # 4.67 / 2.33: the larger remainder rounds up
    assert proportional_labels(50, list(range(5)) * 7, 5) == balanced_labels(50, 5)  # equal counts: balanced

def test_gather_in_order_puts_shards_back_and_refuses_duplicates():
    rows = torch.arange(20.0).view(10, 2)
    shards = [process_batches(10, 3, rank, 3) for rank in range(3)]
    order = torch.tensor([i for share in shards for _, s, e in share for i in range(s, e)])
    assert torch.equal(gather_in_order(rows[order], order), rows)
    with pytest.raises(RuntimeError, match="repeat"):
        gather_in_order(rows[:3], torch.tensor([0, 1, 1]))
    gathered = map_batches(10, 4, lambda k, s, e: (rows[s:e] * 1, torch.arange(s, e)))
    assert torch.equal(gathered, rows)


# --------------------------------------------------------------------------------------------------- conditions


def test_labels_are_class_balanced_and_prompts_cycle():
    counts = collections.Counter(balanced_labels(103, 10))
    assert set(counts) == set(range(10)) and max(counts.values()) - min(counts.values()) == 1
    assert evaluation_prompts("shapes", None, TrainConfig(), 5, ["a red circle", "a blue square"]) == [
        "a red circle", "a blue square", "a red circle", "a blue square", "a red circle"]
    held_out = evaluation_prompts("shapes", None, TrainConfig(seed=0), 6)
    assert len(held_out) == 6 and all("background" in p or "on" in p for p in held_out)
    with pytest.raises(ValueError, match="--captions_file"):
        evaluation_prompts("celebahq", None, TrainConfig(), 4)


# --------------------------------------------------------------------------------------------------- weights


def test_missing_inception_weights_name_the_file_the_url_and_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(InceptionWeightsError) as err:
        load_inception(None)
    msg = str(err.value)
    assert INCEPTION_FILE in msg and INCEPTION_URL in msg and "--inception_weights" in msg
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in msg
    with pytest.raises(FileNotFoundError, match="elsewhere.pth"):
        load_inception(tmp_path / "elsewhere.pth")


class NotWeights:
    """An arbitrary pickled object: a weights-only load must refuse it."""


def test_a_pickled_object_is_refused_not_unpickled(tmp_path):
    path = tmp_path / INCEPTION_FILE
    torch.save({"model": NotWeights()}, path)
    with pytest.raises(InceptionWeightsError, match="holds pickled objects besides tensors"):
        load_inception(path)


@pytest.mark.parametrize("n1,n2,d", [(5, 8, 32), (40, 30, 6)])
def test_fid_from_features_equals_fid_from_statistics(n1, n2, d):
    from src.evaluation.fid import fid_from_stats, frechet_distance_from_features

    x, y = _gaussian(n1, d, seed=11), _gaussian(n2, d, seed=12, scale=2.0) + 0.2
    expected = frechet_distance(*feature_statistics(x), *feature_statistics(y))
    assert frechet_distance_from_features(x, y) == pytest.approx(expected, rel=1e-8)
    assert fid_from_stats(stats_from_features(x), stats_from_features(y)) == pytest.approx(expected, rel=1e-8)
