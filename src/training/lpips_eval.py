"""Scoring perceptual metrics on BAPPS, as the original LPIPS repository does.

2AFC score of one triplet (Zhang et al. 2018, Sec. 2.2): with h = fraction of people who preferred p1,

    score = 1[d0 < d1] (1 - h) + 1[d1 < d0] h + 0.5 1[d0 == d1]

i.e. the fraction of people the metric agrees with; averaged per category. JND: pairs sorted by distance,
"same" as the positive class, average precision = area under the precision-recall curve with the
precision envelope (PASCAL VOC, all points). Results are printed as the design's table and written to
work_dir/eval.json.

A metric is any callable (x, y) -> (B,) distances on (B, 3, H, W) images in [-1, 1].
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.bapps import LABEL_FOLDERS, JNDDataset, TwoAFCDataset, find_jnd_root, to_minus_one_to_one
from ..data.loader import collate
from ..models.lpips import imagenet_vgg16_path, trunk_tensors

Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
RULE = "-----------"
OURS = "LPIPS Reproduction"
ORIGINAL = "Original LPIPS"


def two_afc_scores(d0: torch.Tensor, d1: torch.Tensor, judge: torch.Tensor) -> torch.Tensor:
    """Per-triplet agreement with people: (B,) in [0, 1]; ties count 0.5."""
    d0, d1, judge = d0.float(), d1.float(), judge.float()
    return (d0 < d1).float() * (1 - judge) + (d1 < d0).float() * judge + (d0 == d1).float() * 0.5


def voc_average_precision(recall: torch.Tensor, precision: torch.Tensor) -> float:
    """Area under the precision-recall curve, precision made monotone from the right (VOC 'all points')."""
    mrec = torch.cat([torch.zeros(1), recall.double(), torch.ones(1)])
    mpre = torch.cat([torch.zeros(1), precision.double(), torch.zeros(1)])
    mpre = torch.flip(torch.cummax(torch.flip(mpre, [0]), dim=0).values, [0])  # envelope
    steps = torch.nonzero(mrec[1:] != mrec[:-1]).flatten()
    return float(((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]).sum())


def jnd_map(distances: torch.Tensor, sames: torch.Tensor) -> float:
    """Average precision of retrieving 'same' pairs by ascending distance (sames are fractions in [0, 1])."""
    order = torch.argsort(distances.double(), stable=True)
    same = sames.double()[order]
    tp = torch.cumsum(same, 0)
    fp = torch.cumsum(1 - same, 0)
    fn = same.sum() - tp
    return voc_average_precision(tp / (tp + fn), tp / (tp + fp))


# --------------------------------------------------------------------------------------------------------------
# Running metrics over BAPPS
# --------------------------------------------------------------------------------------------------------------


class KeepPlaces(Dataset):
    """A BAPPS dataset whose unreadable samples keep their place as zero patches with valid = 0, so that every
    process's batch has the size accelerate expects when it gathers the scores and drops its padding (a dropped
    sample made the processes' batches unequal: the gather failed, or kept a padding duplicate in its place)."""

    def __init__(self, dataset):
        self.dataset = dataset
        size = dataset.transform.img_size
        self.blank = {name: torch.zeros(()) if name in LABEL_FOLDERS else torch.zeros(3, size, size)
                      for name in dataset.folders}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        if item is None:  # the dataset warned, naming the file
            return {**self.blank, "valid": torch.tensor(0.0)}
        return {**item, "valid": torch.tensor(1.0)}


def eval_loader(dataset, batch_size: int, num_workers: int, accelerator) -> DataLoader:
    """In-order batches, sharded over processes; no more workers than batches (worker start-up is not free).
    Every sample is in its batch ('valid' says which were readable)."""
    batches = -(-len(dataset) // (batch_size * accelerator.num_processes))
    workers = min(num_workers, batches - 1)  # a single batch loads fastest in the main process
    loader = DataLoader(KeepPlaces(dataset), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate)
    return accelerator.prepare(loader)


@torch.no_grad()
def score_2afc(metrics: dict[str, Metric], loader, accelerator, img_range: str) -> tuple[dict[str, float], int]:
    """(mean 2AFC score of every metric over one loader's readable triplets, how many were readable); all metrics
    see the same batches."""
    scores: dict[str, list[torch.Tensor]] = {name: [] for name in metrics}
    valid = []
    for batch in loader:
        ref, p0, p1 = (to_minus_one_to_one(batch[k], img_range) for k in ("ref", "p0", "p1"))
        valid.append(accelerator.gather_for_metrics(batch["valid"]).cpu())  # (N,) 1: readable
        for name, metric in metrics.items():
            with accelerator.autocast():
                d0, d1 = metric(ref, p0), metric(ref, p1)  # (B,), (B,)
            scores[name].append(accelerator.gather_for_metrics(two_afc_scores(d0, d1, batch["judge"])).cpu())
    keep = torch.cat(valid) > 0
    return {name: torch.cat(s)[keep].mean().item() for name, s in scores.items()}, int(keep.sum())


@torch.no_grad()
def score_jnd(metrics: dict[str, Metric], loader, accelerator, img_range: str) -> tuple[dict[str, float], int]:
    """(JND mAP of every metric over one loader's readable pairs, how many were readable)."""
    distances: dict[str, list[torch.Tensor]] = {name: [] for name in metrics}
    sames, valid = [], []
    for batch in loader:
        p0, p1 = (to_minus_one_to_one(batch[k], img_range) for k in ("p0", "p1"))
        sames.append(accelerator.gather_for_metrics(batch["same"]).cpu())
        valid.append(accelerator.gather_for_metrics(batch["valid"]).cpu())  # (N,) 1: readable
        for name, metric in metrics.items():
            with accelerator.autocast():
                d = metric(p0, p1)  # (B,)
            distances[name].append(accelerator.gather_for_metrics(d.float()).cpu())
    keep = torch.cat(valid) > 0
    same = torch.cat(sames)[keep]
    return {name: jnd_map(torch.cat(d)[keep], same) for name, d in distances.items()}, int(keep.sum())


def evaluate_bapps(
    metrics: dict[str, Metric],
    root,
    val_sets: list[str],
    jnd_sets: list[str],
    img_size: int,
    img_range: str,
    batch_size: int,
    num_workers: int,
    accelerator,
) -> dict:
    """{'2afc': {metric: {category: score, 'mean': m}}, 'jnd': {...} or None, 'num_samples': {...}}; num_samples
    counts the samples scored, without the unreadable ones."""
    two_afc: dict[str, dict[str, float]] = {name: {} for name in metrics}
    counts: dict[str, int] = {}
    for category in val_sets:
        dataset = TwoAFCDataset(root, "val", [category], img_size, img_range)
        loader = eval_loader(dataset, batch_size, num_workers, accelerator)
        result, counts[f"2afc/{category}"] = score_2afc(metrics, loader, accelerator, img_range)
        for name, score in result.items():
            two_afc[name][category] = score
    for scores in two_afc.values():
        scores["mean"] = sum(scores.values()) / len(scores)
    jnd_root = find_jnd_root(root)
    jnd: Optional[dict[str, dict[str, float]]] = None
    if jnd_root is not None and jnd_sets:
        jnd = {name: {} for name in metrics}
        for category in jnd_sets:
            dataset = JNDDataset(jnd_root, [category], img_size, img_range)
            loader = eval_loader(dataset, batch_size, num_workers, accelerator)
            result, counts[f"jnd/{category}"] = score_jnd(metrics, loader, accelerator, img_range)
            for name, score in result.items():
                jnd[name][category] = score
        for scores in jnd.values():
            scores["mean"] = sum(scores.values()) / len(scores)
    return {"2afc": two_afc, "jnd": jnd, "num_samples": counts}


# --------------------------------------------------------------------------------------------------------------
# The `lpips` package as a side-by-side reference
# --------------------------------------------------------------------------------------------------------------


def lpips_package_metric(device) -> Metric:
    """`lpips.LPIPS(net='vgg')` (official v0.1 linear layers) with torchvision's ImageNet VGG16 trunk read
    from the local torch cache. FileNotFoundError when that file is absent: nothing is downloaded."""
    path = imagenet_vgg16_path()
    import lpips

    with warnings.catch_warnings():  # lpips calls torchvision's deprecated `pretrained=` argument
        warnings.simplefilter("ignore", UserWarning)
        net = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)  # builds without touching the network
    state = trunk_tensors(torch.load(path, map_location="cpu", weights_only=True))
    sliced = {key: state[key.split(".", 1)[1]] for key in net.net.state_dict()}  # 'slice1.0.weight' -> '0.weight'
    net.net.load_state_dict(sliced, strict=True)
    net = net.to(device).eval().requires_grad_(False)
    return lambda x, y: net(x, y).flatten()


def comparison_metrics(lpips: torch.nn.Module, with_package: bool, accelerator) -> tuple[dict[str, Metric], str]:
    """{OURS: lpips, ORIGINAL: the lpips package (when asked and its trunk file exists)} and a note saying which."""
    metrics: dict[str, Metric] = {OURS: lpips.to(accelerator.device)}
    if not with_package:
        return metrics, "not requested"
    try:
        metrics[ORIGINAL] = lpips_package_metric(accelerator.device)
    except FileNotFoundError as err:
        note = f"skipped: the lpips package needs ImageNet VGG16 weights. {err}"
        accelerator.print(f"{ORIGINAL}: {note}")
        return metrics, note
    return metrics, "evaluated"


# --------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------


def format_table(title: str, two_afc: dict[str, float], jnd: Optional[dict[str, float]]) -> str:
    lines = [RULE, f"Evaluating: {title}", RULE]
    lines += [f"Dataset: {cat.upper()} -> Accuracy: {acc:.3f}" for cat, acc in two_afc.items() if cat != "mean"]
    lines.append(f"Mean 2AFC -> Accuracy: {two_afc['mean']:.3f}")
    if jnd is not None:
        lines += [f"JND: {cat.upper()} -> mAP: {ap:.3f}" for cat, ap in jnd.items() if cat != "mean"]
    return "\n".join(lines)


def format_results(results: dict) -> str:
    jnd = results["jnd"] or {}
    return "\n".join(format_table(name, scores, jnd.get(name)) for name, scores in results["2afc"].items())


def results_as_scalars(results: dict) -> dict[str, float]:
    """Per-category scores as tracker scalars: val_2afc/<category> and jnd_map/<category> for our LPIPS,
    the same prefixed with lpips_pkg_ for the `lpips` package when it was scored."""
    scalars = {}
    for kind, key in (("2afc", "val_2afc"), ("jnd", "jnd_map")):
        for name, scores in (results[kind] or {}).items():
            prefix = "" if name == OURS else "lpips_pkg_"
            scalars.update({f"{prefix}{key}/{category}": score for category, score in scores.items()})
    return scalars


def write_eval_json(path, results: dict, info: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**info, **results}, indent=2))
    return path
