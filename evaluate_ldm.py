"""FID and KID of a stage-2 model's samples against a reference, as the LDM paper reports them.

    accelerate launch evaluate_ldm.py --path_to_weights work_dir/diffusion_celebahq/model.safetensors \
        --path_to_dataset data/celebahq --num_samples 50000 --sampler ddim --num_steps 50 --output outputs/fid

The reference is an image folder (--reference DIR), a statistics file (--reference stats.npz: 'mu', 'sigma' and
optionally 'features'), or one of our datasets (--dataset, default the model's own, with --path_to_dataset).
Reference statistics are cached in --stats_cache, keyed by the data and the feature extractor, so a second run
only samples. A class-conditional model's labels follow the class proportions of a class-folder reference (the
model's own dataset), and are balanced over the classes otherwise; text-conditional models take prompts
from --captions_file or the dataset's validation split. Sampling is split over the processes of
`accelerate launch` (or torchrun); the same --seed gives the same samples whatever the number of processes and
--batch_size (sample i's noise is seeded by (seed, i)), and another seed gives other samples.

Writes --output/results.json (FID, KID, every setting) and --output/grid.png (the first samples). The Inception
weights are read from --inception_weights or $TORCH_HOME/hub/checkpoints (never downloaded; see the README).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from src.cli import run_cli
from src.config import Stage2TrainConfig, from_dict
from src.data import CONDITIONING, DATASET_NAMES
from src.evaluation.conditions import balanced_labels, evaluation_prompts, proportional_labels
from src.evaluation.fid import fid_from_stats, kernel_inception_distance, kid_subset_rows, stats_from_features
from src.evaluation.inception import load_inception
from src.evaluation.reference import ImageSource, describe, load_stats_file, reference_stats, select_indices
from src.evaluation.sharding import gather_in_order, local_rows, map_batches
from src.pipeline import SAMPLERS, LatentDiffusion, load_pipeline, sampler_flags_error
from src.training.images import save_image_grid, writable_folder
from src.training.setup import launched_without_gpu
from src.training.stage2 import read_prompts

logger = logging.getLogger("evaluate")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_STATS_CACHE = Path.home() / ".cache" / "ldm" / "fid_reference"
GRID_IMAGES = 64


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path_to_weights", required=True, help="model.safetensors written by stage2_diffusion_trainer.py")
    ref = p.add_argument_group("reference")
    ref.add_argument("--reference", default=None, help="an image folder, or an .npz with 'mu' and 'sigma'")
    ref.add_argument("--dataset", default=None, choices=DATASET_NAMES, help="reference dataset (default: the model's)")
    ref.add_argument("--path_to_dataset", default=None, help="the reference dataset's folder")
    ref.add_argument("--num_reference", type=int, default=None, help="reference images used (default: all)")
    ref.add_argument("--stats_cache", default=str(DEFAULT_STATS_CACHE), help="folder of cached reference statistics")
    smp = p.add_argument_group("sampling")
    smp.add_argument("--num_samples", type=int, default=50000, help="samples (50000 for paper-comparable FID)")
    smp.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    smp.add_argument("--num_steps", type=int, default=None,
                     help="sampler steps; default: DDIM 50, DPM-Solver++ 20, as inference_ldm.py (DDPM: every step)")
    smp.add_argument("--guidance_scale", type=float, default=1.0, help="classifier-free guidance (1 = off)")
    smp.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity")
    smp.add_argument("--guidance_rescale", type=float, default=0.0,
                     help="Lin et al. 2024 eq. 16, as inference_ldm.py and training's val_guidance_rescale (0 = off)")
    smp.add_argument("--seed", type=int, default=0, help="sample i's noise is seeded by (seed, i)")
    smp.add_argument("--batch_size", type=int, default=25, help="samples per sampling call and process")
    smp.add_argument("--balanced_labels", action="store_true",
                     help="class models: N / classes samples per class whatever the reference's proportions (ADM's "
                     "and LDM's ImageNet protocol; default: the proportions of a class-folder reference)")
    smp.add_argument("--captions_file", default=None, help="prompts for a text model, one per line")
    smp.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                     help="UNet / text encoder precision (the VAE decodes in fp32)")
    smp.add_argument("--text_encoder", default=None, help="override the stored text model (a local folder)")
    smp.add_argument("--hf_cache_dir", default=None, help="Hugging Face cache holding the text encoder")
    met = p.add_argument_group("metrics")
    met.add_argument("--inception_weights", default=None, help="pt_inception-2015-12-05-6726825d.pth "
                     "(default: $TORCH_HOME/hub/checkpoints)")
    met.add_argument("--kid_subset_size", type=int, default=1000)
    met.add_argument("--kid_subsets", type=int, default=100)
    met.add_argument("--feature_batch_size", type=int, default=50, help="reference images per Inception batch")
    met.add_argument("--num_workers", type=int, default=4, help="loader workers for the reference images")
    p.add_argument("--output", default="outputs/evaluate_ldm", help="folder for results.json and grid.png")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_samples < 2:
        parser.error("--num_samples must be at least 2 (FID needs a covariance)")
    if (args.num_steps is not None and args.num_steps < 1) or args.batch_size < 1 or args.feature_batch_size < 1:
        parser.error("--num_steps, --batch_size and --feature_batch_size must be at least 1")
    if args.kid_subset_size < 2 or args.kid_subsets < 1:  # found before hours of sampling, not after them
        parser.error("--kid_subset_size must be at least 2 (the unbiased MMD) and --kid_subsets at least 1")
    if problem := sampler_flags_error(args.sampler, args.num_steps, args.eta, args.guidance_rescale):
        parser.error(problem)
    if args.reference and args.dataset:
        parser.error("give either --reference or --dataset, not both (--path_to_dataset with --reference only "
                     "supplies the validation captions of a text model)")
    return args


def load_model(args, device) -> LatentDiffusion:
    """The pipeline with the UNet and text encoder in --dtype and the VAE in fp32: the images FID sees are decoded
    at full precision whatever --dtype is (as training's periodic FID decodes them)."""
    return load_pipeline(args.path_to_weights, device, DTYPES[args.dtype], args.text_encoder, args.hf_cache_dir,
                         vae_dtype=torch.float32)


def reference_source(args, pipe: LatentDiffusion) -> ImageSource | Path:
    """The .npz statistics file, or the images to compute statistics from (at the model's resolution)."""
    cfg = from_dict(Stage2TrainConfig, pipe.metadata["training_config"], f"{args.path_to_weights} training_config")
    img_size = pipe.vae.config.img_size
    if args.reference and Path(args.reference).suffix == ".npz":
        return Path(args.reference)
    if args.reference:
        return ImageSource("celebahq", args.reference, img_size, cfg, args.num_reference)  # any folder of images
    dataset = args.dataset or pipe.metadata["dataset"]
    if dataset != "shapes" and not args.path_to_dataset:
        raise FileNotFoundError(
            f"no reference: pass --reference (an image folder or a statistics .npz) or --path_to_dataset ({dataset})"
        )
    return ImageSource(dataset, args.path_to_dataset, img_size, cfg, args.num_reference)


def reference_class_labels(source: ImageSource | Path, class_names: list[str], num_classes: int) -> list[int] | None:
    """The labels of the reference images (the capped subset with --num_reference) when the reference is a class
    folder dataset with the model's classes; None when its labels are unknown (a statistics file, a plain folder)."""
    if not isinstance(source, ImageSource) or CONDITIONING.get(source.dataset) != "class":
        return None
    dataset = source.build()
    if (class_names and dataset.classes != class_names) or len(dataset.classes) > num_classes:
        logger.warning("the reference's class folders (%d) are not the model's (%d): samples are class-balanced",
                       len(dataset.classes), len(class_names) or num_classes)
        return None
    return [dataset.labels[i] for i in select_indices(len(dataset), source.max_images)]


def sample_conditions(args, pipe: LatentDiffusion, source: ImageSource | Path | None = None
                      ) -> tuple[list[str] | None, list[int] | None]:
    """One prompt or one class label per sample (None for what the model does not take). Class labels follow the
    reference's class proportions when its labels are known (FID compares the marginals: balanced samples against
    an imbalanced reference are penalised however good the model is), and are balanced otherwise."""
    meta = pipe.metadata
    if pipe.conditioning == "class":
        names = list(meta.get("class_names") or [])
        num_classes = len(names) or pipe.unet.num_classes
        known = source is not None and not args.balanced_labels
        reference = reference_class_labels(source, names, num_classes) if known else None
        if reference is None:
            return None, balanced_labels(args.num_samples, num_classes)
        return None, proportional_labels(args.num_samples, reference, num_classes)
    if pipe.conditioning == "text":
        cfg = from_dict(Stage2TrainConfig, meta["training_config"], "training_config")
        dataset = args.dataset or meta["dataset"]
        captions = read_prompts(args.captions_file) if args.captions_file else None
        return evaluation_prompts(dataset, args.path_to_dataset, cfg, args.num_samples, captions), None
    return None, None


def sample_features(args, pipe: LatentDiffusion, inception, accelerator, prompts, labels) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Inception features (N, 2048) of all samples in order, the first GRID_IMAGES samples (n, 3, H, W) gathered
    from whichever processes drew them, and this process's sampling seconds per image (generation alone, without
    the Inception)."""
    grid: list[tuple[torch.Tensor, torch.Tensor]] = []  # (images (b, 3, H, W), their sample indices (b,))
    timing = {"seconds": 0.0, "images": 0}

    def one_batch(k: int, start: int, end: int):
        t0 = time.perf_counter()
        images = pipe.generate(
            prompts=prompts[start:end] if prompts else None,
            labels=labels[start:end] if labels else None,
            num_per_condition=1 if (prompts or labels) else end - start,
            sampler=args.sampler, num_steps=args.num_steps, guidance_scale=args.guidance_scale, eta=args.eta,
            guidance_rescale=args.guidance_rescale, seed=args.seed, sample_indices=range(start, end),
        )  # (b, 3, H, W), sample i's noise from sample_seed(seed, i)
        if images.is_cuda:
            torch.cuda.synchronize()
        timing["seconds"] += time.perf_counter() - t0
        timing["images"] += end - start
        if start < GRID_IMAGES:  # batch k of several processes is process k % W's: not all on the main one
            keep = min(end, GRID_IMAGES) - start
            grid.append((images[:keep].cpu(), torch.arange(start, start + keep)))
        return inception(images), torch.arange(start, end)

    features = map_batches(args.num_samples, args.batch_size, one_batch, accelerator, desc="sampling")
    size = pipe.vae.config.img_size
    rows, indices = local_rows([g.flatten(1) for g, _ in grid], [i for _, i in grid], 3 * size * size)
    first = gather_in_order(rows, indices, accelerator).view(-1, 3, size, size)  # (min(N, GRID_IMAGES), 3, H, W)
    return features, first, timing["seconds"] / max(1, timing["images"])


def metrics(fake: torch.Tensor, reference, args) -> dict:
    fake_stats = stats_from_features(fake.numpy())
    result = {"fid": fid_from_stats(fake_stats, reference)}
    if reference.features is not None and len(reference.features) >= 2:
        mean, std = kernel_inception_distance(fake.numpy(), reference.features, args.kid_subset_size,
                                              args.kid_subsets, seed=args.seed)
        rows = kid_subset_rows(args.kid_subset_size, len(fake), len(reference.features))
        if rows < args.kid_subset_size:
            logger.warning("KID subsets of %d rows, not --kid_subset_size %d: %d samples, %d reference rows", rows,
                           args.kid_subset_size, len(fake), len(reference.features))
        result.update(kid=mean, kid_std=std, kid_subset_size=rows)
    else:
        result.update(kid=None, kid_std=None, kid_subset_size=None)
        logger.warning("KID needs reference features; the statistics file holds only mu and sigma")
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=launched_without_gpu())
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", force=True)
    inception = load_inception(args.inception_weights, accelerator.device)  # first: a missing file stops at once
    if accelerator.is_main_process:
        writable_folder(args.output)  # before hours of sampling, not after
    pipe = load_model(args, accelerator.device)
    num_steps = pipe.sampler_steps(args.sampler, args.num_steps)  # a count above T stops here, not after the reference
    source = reference_source(args, pipe)
    prompts, labels = sample_conditions(args, pipe, source)
    start = time.perf_counter()
    if isinstance(source, Path):
        reference, status, described = load_stats_file(source), "file", str(source)
    else:
        reference, status = reference_stats(source, inception, args.stats_cache, accelerator,
                                            args.feature_batch_size, args.num_workers)
        described = describe(source)
    reference_seconds = time.perf_counter() - start
    start = time.perf_counter()
    fake, grid, seconds_per_sample = sample_features(args, pipe, inception, accelerator, prompts, labels)
    total_seconds = time.perf_counter() - start
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return {}
    result = {
        **metrics(fake, reference, args),
        "num_samples": args.num_samples, "num_reference": reference.count, "reference": described,
        "reference_statistics": status, "model": str(args.path_to_weights), "dataset": pipe.metadata["dataset"],
        "conditioning": pipe.conditioning, "sampler": args.sampler,
        "samples_per_class": None if labels is None else np.bincount(labels, minlength=pipe.num_trained_classes).tolist(),
        "num_steps": num_steps,
        "guidance_scale": pipe.guidance_used(args.guidance_scale), "eta": args.eta, "seed": args.seed, "dtype": args.dtype,
        "guidance_rescale": args.guidance_rescale if pipe.guidance_used(args.guidance_scale) != 1 else 0.0,
        "image_size": pipe.vae.config.img_size, "num_processes": accelerator.num_processes,
        "inception_weights": str(inception.weights_path), "inception_sha256": inception.identity["weights_sha256"],
        "kid_subsets": args.kid_subsets,
        "seconds_reference": round(reference_seconds, 2), "seconds_sampling_and_features": round(total_seconds, 2),
        "seconds_per_sample_per_process": round(seconds_per_sample, 4),
    }
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    save_image_grid(grid, out / "grid.png", nrow=min(8, len(grid)))
    kid = "n/a" if result["kid"] is None else f"{result['kid']:.5f} +- {result['kid_std']:.5f}"
    print(f"FID {result['fid']:.3f}  KID {kid}  ({args.num_samples} samples, {args.sampler}-{result['num_steps']}, "
          f"guidance {result['guidance_scale']}; reference {described}, {status})")
    print(f"wrote {out / 'results.json'} and {out / 'grid.png'}")
    accelerator.wait_for_everyone()
    return result


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
