"""Reconstruction quality of a stage-1 autoencoder: rFID, PSNR, SSIM and LPIPS on held-out images.

    accelerate launch evaluate_vae.py --path_to_weights work_dir/vae_celebahq/model.safetensors \
        --dataset celebahq --path_to_dataset data/celebahq_val --num_images 10000 --output outputs/vae_eval

Each image is encoded and decoded (posterior mode: deterministic), then compared with the original: PSNR and SSIM
on the uint8 images, LPIPS with our network and the official v0.1 weights (or --lpips_checkpoint, a file written
by lpips_trainer.py), and rFID = FID between the reconstructions and the originals. The originals' statistics
are cached (--stats_cache), like evaluate_ldm.py's reference; --skip_rfid leaves rFID out (no Inception weights
needed). Writes --output/results.json and grid.png
(originals on odd rows, reconstructions below them). The work is split over the processes of `accelerate launch`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from src.cli import run_cli
from src.config import TrainConfig
from src.data import DATASET_NAMES
from src.evaluation.conditions import HELD_OUT_SHAPES_SEED_OFFSET
from src.evaluation.fid import fid_from_stats, stats_from_features
from src.evaluation.inception import FEATURE_DIM, load_inception
from src.evaluation.reconstruction import METRIC_NAMES, reconstruct, reconstruction_rows
from src.evaluation.reference import (
    KID_MAX_FEATURES,
    ImageSource,
    cache_entry,
    dataset_features,
    describe,
    select_indices,
)
from src.models.diffusers_compat import load_vae_backbone
from src.training.images import save_image_grid, writable_folder
from src.training.setup import launched_without_gpu

logger = logging.getLogger("evaluate")

DEFAULT_STATS_CACHE = Path.home() / ".cache" / "ldm" / "fid_reference"
GRID_PAIRS = 8


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path_to_weights", required=True, help="model.safetensors of stage 1 (or stage 2: its VAE), or a "
                   "diffusers AutoencoderKL folder (evaluated at its config's sample_size)")
    p.add_argument("--dataset", required=True, choices=DATASET_NAMES)
    p.add_argument("--path_to_dataset", default=None, help="held-out images (not needed for 'shapes')")
    p.add_argument("--num_images", type=int, default=10000, help="images evaluated (default 10000; fewer if the data ends)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--num_workers", type=int, default=4)
    p.add_argument("--interpolation", default="bicubic", choices=["bilinear", "bicubic", "lanczos", "nearest"])
    p.add_argument("--inception_weights", default=None, help="pt_inception-2015-12-05-6726825d.pth "
                   "(default: $TORCH_HOME/hub/checkpoints)")
    p.add_argument("--lpips_checkpoint", default=None, help="LPIPS file of lpips_trainer.py instead of the official")
    p.add_argument("--stats_cache", default=str(DEFAULT_STATS_CACHE), help="folder of cached reference statistics")
    p.add_argument("--skip_rfid", action="store_true", help="PSNR, SSIM and LPIPS only: no Inception network (its "
                   "weights need not exist) and no reference statistics")
    p.add_argument("--output", default="outputs/evaluate_vae", help="folder for results.json and grid.png")
    args = p.parse_args(argv)
    if args.num_images < 2 or args.batch_size < 1:
        p.error("--num_images must be at least 2 and --batch_size at least 1")
    return args


def build_lpips(checkpoint):
    """Our LPIPS: the lpips_trainer.py file when given, else the official v0.1 linear layers on the ImageNet VGG16
    trunk from $TORCH_HOME/hub/checkpoints (a missing file is named, never downloaded)."""
    from src.models.lpips import freeze, load_lpips_checkpoint, lpips_with_official_weights

    return freeze(load_lpips_checkpoint(checkpoint)) if checkpoint else lpips_with_official_weights()


def summarise(rows: torch.Tensor, reference, count: int) -> dict:
    """rFID from the reconstructions' features against the originals' (None without a reference: --skip_rfid);
    mean and std of the per-image metrics."""
    dim = FEATURE_DIM if reference is not None else 0  # rows: [features,] scores
    scores = rows[:, dim:dim + len(METRIC_NAMES)].double().numpy()
    rfid = fid_from_stats(stats_from_features(rows[:, :dim].numpy()), reference) if reference is not None else None
    result = {"rfid": rfid, "num_images": count}
    for i, name in enumerate(METRIC_NAMES):
        result[name], result[f"{name}_std"] = float(np.mean(scores[:, i])), float(np.std(scores[:, i]))
    return result


def save_pairs(vae, dataset, indices: list[int], path: Path) -> None:
    """Originals and their reconstructions, GRID_PAIRS per row."""
    items = [dataset[i] for i in indices[: GRID_PAIRS * 2]]
    images = torch.stack([it["image"] for it in items if it is not None])  # (n, 3, H, W)
    recon = reconstruct(vae, images).cpu()
    rows = [t for start in range(0, len(images), GRID_PAIRS) for t in (images[start:start + GRID_PAIRS],
                                                                         recon[start:start + GRID_PAIRS])]
    save_image_grid(torch.cat(rows), path, nrow=min(GRID_PAIRS, len(images)))


def main(argv=None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=launched_without_gpu())
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", force=True)
    device = accelerator.device
    # missing weights stop the run before any work
    inception = None if args.skip_rfid else load_inception(args.inception_weights, device)
    lpips = build_lpips(args.lpips_checkpoint).to(device)
    vae, _ = load_vae_backbone(args.path_to_weights)  # a diffusers AutoencoderKL: at its config's sample_size
    vae = vae.to(device).float().eval().requires_grad_(False)
    if accelerator.is_main_process:
        writable_folder(args.output)  # and an unwritable output folder before the evaluation, not after it
    cfg = TrainConfig(interpolation=args.interpolation, shapes_num_images=args.num_images,
                      seed=HELD_OUT_SHAPES_SEED_OFFSET)  # shapes: images drawn apart from any training seed
    source = ImageSource(args.dataset, args.path_to_dataset, vae.config.img_size, cfg, args.num_images)
    dataset = source.build()
    entry = None if inception is None else cache_entry(source, dataset, inception.identity, args.stats_cache)
    reference = None if entry is None else entry.load()  # the originals' statistics; None: computed below
    indices = select_indices(len(dataset), args.num_images)
    with_originals = entry is not None and reference is None
    rows, skipped = dataset_features(
        dataset, indices, lambda x: reconstruction_rows(vae, x, inception, lpips, with_originals=with_originals),
        args.batch_size, args.num_workers, accelerator, desc="reconstructions")
    status = "not used (--skip_rfid)" if entry is None else "cached" if reference is not None else "computed"
    if with_originals:
        reference = stats_from_features(rows[:, FEATURE_DIM + len(METRIC_NAMES):].numpy(), keep=KID_MAX_FEATURES)
        entry.store(reference, accelerator)
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return {}
    result = {**summarise(rows, reference, len(rows)), "skipped_unreadable": skipped, "model": str(args.path_to_weights),
              "reference": describe(source), "reference_statistics": status, "image_size": vae.config.img_size,
              "inception_weights": None if inception is None else str(inception.weights_path)}
    result["lpips_weights"] = args.lpips_checkpoint or "official v0.1 (lpips package) + ImageNet VGG16"
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    save_pairs(vae, dataset, indices, out / "grid.png")
    rfid = "rFID -" if result["rfid"] is None else f"rFID {result['rfid']:.3f}"
    print(f"{rfid}  PSNR {result['psnr']:.2f} dB  SSIM {result['ssim']:.4f}  "
          f"LPIPS {result['lpips']:.4f}  ({result['num_images']} images of {describe(source)})")
    print(f"wrote {out / 'results.json'} and {out / 'grid.png'}")
    accelerator.wait_for_everyone()
    return result


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
