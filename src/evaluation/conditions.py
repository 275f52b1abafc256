"""What each evaluation sample is conditioned on: class labels, or prompts from validation data.

    labels = balanced_labels(50000, 1000)                      # 50 of each class
    labels = proportional_labels(50000, reference_labels, 1000)  # the reference's class proportions
    prompts = evaluation_prompts("conceptual_captions", path, cfg, captions_file=None)

Prompts come from a captions file (one per line) when given, otherwise from the dataset's validation data:
the `validation` split prep_cc.py writes with --val_fraction, or, for the built-in shapes, captions drawn with
another seed than training's. (Shapes has 168 colour/shape/background combinations, and a long enough training
run sees every one: its "held-out" captions are other draws of seen combinations, not unseen ones.) Sample i
uses prompt i mod len(prompts), so any number of samples can be drawn.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..config import TrainConfig
from ..data.image_folder import DatasetError

HELD_OUT_SHAPES_SEED_OFFSET = 1_000_003  # shapes captions for evaluation come from seed + this offset


def balanced_labels(num_samples: int, num_classes: int) -> list[int]:
    """Label of sample i is i mod C: every class gets floor(N / C) or ceil(N / C) samples."""
    if num_classes < 1:
        raise ValueError("a class-conditional model needs at least one class")
    return [i % num_classes for i in range(num_samples)]


def proportional_labels(num_samples: int, reference_labels: list[int], num_classes: int) -> list[int]:
    """Labels in the class proportions of the reference images' labels, so that FID compares the model's marginal
    with the reference's: class c gets N n_c / M samples, rounded by largest remainder (ties to the lower class).
    The k-th of class c's n'_c samples sits at (k + 1/2) / n'_c of the sequence (ties in class order), so every
    prefix (the grid, a batch) holds the classes in about those proportions; equal class counts give
    balanced_labels' labels when N is a multiple of the class count."""
    counts = np.bincount(np.asarray(reference_labels, dtype=np.int64), minlength=num_classes)  # (C,)
    if len(counts) > num_classes or counts.sum() == 0:
        raise ValueError(f"reference labels must be in 0 .. {num_classes - 1}, and there must be some")
    quota = num_samples * counts / counts.sum()
    share = np.floor(quota).astype(np.int64)
    extra = np.argsort(-(quota - share), kind="stable")[: num_samples - share.sum()]
    share[extra] += 1
    labels = np.repeat(np.arange(num_classes), share)  # (N,) by class
    within = np.concatenate([np.arange(n) for n in share]) if num_samples else np.zeros(0)
    position = (within + 0.5) / np.maximum(share[labels], 1)
    return labels[np.lexsort((labels, position))].tolist()


def validation_captions(dataset: str, path: Optional[str], cfg: TrainConfig, limit: int) -> list[str]:
    """Up to `limit` captions from the dataset's validation data: rows the model was not trained on for
    conceptual_captions; for shapes, another seed's draws (mostly combinations and captions it has seen)."""
    if dataset == "conceptual_captions":
        from ..data.conceptual_captions import load_prepared

        try:
            split = load_prepared(path, "validation")
        except DatasetError as err:
            raise DatasetError(
                f"{err}. Pass --captions_file, or prepare the data with prep_cc.py --val_fraction 0.01"
            ) from err
        return [c for c in split.select(range(min(limit, len(split))))["caption"] if c and c.strip()]
    if dataset == "shapes":
        from ..data.shapes import ShapesDataset

        held_out = ShapesDataset(limit, 8, seed=cfg.seed + HELD_OUT_SHAPES_SEED_OFFSET)
        return [held_out.attributes(i)[3] for i in range(limit)]
    raise DatasetError(f"dataset '{dataset}' has no captions: pass --captions_file for a text-conditional model")


def evaluation_prompts(
    dataset: str, path: Optional[str], cfg: TrainConfig, num_samples: int, captions: Optional[list[str]] = None
) -> list[str]:
    """One prompt per sample from `captions` (a captions file's lines) or the validation captions, cycled when
    there are fewer prompts than samples."""
    prompts = captions if captions else validation_captions(dataset, path, cfg, num_samples)
    if not prompts:
        raise DatasetError(f"no captions found for '{dataset}': pass --captions_file")
    return [prompts[i % len(prompts)] for i in range(num_samples)]
