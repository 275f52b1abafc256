"""How long FID sampling takes at the design size: seconds per image and the time for 50k samples.

The design model (configs/ldm.yaml: UNet 320-640-1280-1280 over 4 x 32 x 32 latents, VAE 128-256-512-512 at
256 px), random weights (speed does not depend on them), runs the same path as evaluate_ldm.py: the pipeline's
sampler (one batched [uncond; cond] UNet forward per step with guidance), then the VAE decoder, then the FID
Inception's forward (architecture only; its weights do not change the time). Each sampler spec NAME:STEPS is
timed for one batch after a warm-up; a sampler the pipeline does not know (src.pipeline.SAMPLERS) is skipped.

    # GPU, the measurement the README quotes:
    python bench/bench_fid_sampling.py --device cuda --dtype bfloat16 --batch 50 --samplers ddim:50 dpmpp_2m:20
    # CPU estimate: time --measure_steps steps and extrapolate linearly to the full step count
    python bench/bench_fid_sampling.py --device cpu --batch 1 --measure_steps 2 --samplers ddim:50 dpmpp_2m:20

With --measure_steps the figures are an extrapolation (t = steps x t_step + t_decode + t_inception), printed as such.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.config import load_model_config  # noqa: E402
from src.diffusion.schedule import DiffusionProcess  # noqa: E402
from src.models.unet import Condition, build_unet  # noqa: E402
from src.models.vae import build_autoencoder  # noqa: E402
from src.pipeline import SAMPLERS, LatentDiffusion  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_config", default=str(ROOT / "configs" / "ldm.yaml"))
    p.add_argument("--conditioning", choices=["text", "class", "none"], default="text")
    p.add_argument("--samplers", nargs="+", default=["ddim:50", "dpmpp_2m:20"], help="NAME:STEPS")
    p.add_argument("--guidance_scale", type=float, default=4.0)
    p.add_argument("--batch", type=int, default=8, help="images per sampling call")
    p.add_argument("--measure_steps", type=int, default=None, help="time this many steps and extrapolate")
    p.add_argument("--num_samples", type=int, default=50000, help="extrapolate to this many samples")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="UNet precision (VAE fp32 for fp16)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    p.add_argument("--skip_inception", action="store_true")
    return p.parse_args()


def build_pipeline(args) -> LatentDiffusion:
    cfg = load_model_config(args.model_config)
    cfg.unet.class_conditioning = args.conditioning == "class"
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    vae = build_autoencoder(cfg.vae).to(args.device, torch.float32 if dtype == torch.float16 else dtype).eval()
    unet = build_unet(cfg.unet, cfg.vae.latent_dim, args.conditioning).to(args.device, dtype).eval()
    args.text_dim = cfg.unet.text_embed_dim
    return LatentDiffusion(vae, unet, DiffusionProcess(1000), args.conditioning, 1.0)


def conditions(pipe: LatentDiffusion, args):
    b, device = args.batch, args.device
    if args.conditioning == "text":  # CLIP-L-shaped embeddings: 77 tokens of 768
        mask = torch.ones(b, 77, dtype=torch.long)
        text = torch.randn(b, 77, args.text_dim)
        cond = Condition(text=text, text_mask=mask).to(device, pipe.unet.conv_in.weight.dtype)
    elif args.conditioning == "class":
        cond = Condition(labels=torch.arange(b, device=device) % pipe.unet.num_classes)
    else:
        return None, None
    return cond, pipe.unet.null_condition(b)


def timed(fn, device) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def inception_network(device):
    """The FID Inception's architecture (torchvision layout, 1008 classes), for its forward time only."""
    from torchvision.models import inception_v3

    return inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008).to(device).eval()


def flops_per_image(args) -> dict[str, float]:
    """GFLOP (multiply-add = 2) per image of one guided step, one VAE decode and one Inception forward, counted by
    torch.utils.flop_counter on shape-only (meta) copies of the models."""
    from argparse import Namespace

    from torch.utils.flop_counter import FlopCounterMode

    guided = args.conditioning != "none" and args.guidance_scale != 1.0
    meta = Namespace(**{**vars(args), "device": "meta", "dtype": "float32", "batch": 2 if guided else 1})
    with torch.device("meta"):
        pipe = build_pipeline(meta)
        cond, _ = conditions(pipe, meta)  # a guided step is one UNet forward over [uncond; cond]: batch 2
        net = inception_network("meta")
        z = torch.randn(pipe.latent_shape(1))
        x, t = torch.randn(pipe.latent_shape(meta.batch)), torch.zeros(meta.batch, dtype=torch.long)
        counts = {}
        with torch.no_grad():
            for name, fn in {
                "step": lambda: pipe.unet(x, t, cond),
                "decode": lambda: pipe.decode(z),
                "inception": lambda: net(torch.randn(1, 3, 299, 299)),
            }.items():
                with FlopCounterMode(display=False) as counter:
                    fn()
                counts[name] = counter.get_total_flops() / 1e9
    return counts


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = build_pipeline(args)
    cond, uncond = conditions(pipe, args)
    params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    print(f"device={args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}) "
          f"dtype={args.dtype} batch={args.batch} conditioning={args.conditioning} guidance={args.guidance_scale} "
          f"UNet {params:.0f} M params, latents {pipe.latent_shape(args.batch)[1:]}, images {pipe.vae.config.img_size} px")

    def sample(name: str, steps: int):
        g = torch.Generator(device=args.device).manual_seed(0)
        return pipe.sample_latents(args.batch, cond, uncond, name, steps, args.guidance_scale, generator=g)

    with torch.no_grad():
        sample("ddim", 1)  # warm-up
        z = sample("ddim", 1)
        t_decode = timed(lambda: pipe.decode(z), args.device) / args.batch
        t_inception = 0.0
        if not args.skip_inception:
            net = inception_network(args.device)
            x = torch.rand(args.batch, 3, 299, 299, device=args.device)
            net(x)
            t_inception = timed(lambda: net(x), args.device) / args.batch
    gflop = flops_per_image(args)
    print(f"GFLOP per image: {gflop['step']:.1f} per sampler step (guidance {args.guidance_scale:g}), "
          f"{gflop['decode']:.1f} per VAE decode, {gflop['inception']:.1f} per Inception forward")
    print(f"VAE decode {t_decode:.4f} s/image ({gflop['decode'] / t_decode:.1f} GFLOP/s), "
          f"Inception {t_inception:.4f} s/image")
    for spec in args.samplers:
        name, steps = spec.split(":")
        steps = int(steps)
        if name not in SAMPLERS:
            print(f"{spec:14s} skipped: this pipeline's samplers are {SAMPLERS}")
            continue
        run_steps = min(steps, args.measure_steps) if args.measure_steps else steps
        with torch.no_grad():
            t_sample = timed(lambda: sample(name, run_steps), args.device) / args.batch
        per_step = t_sample / run_steps
        per_image = steps * per_step + t_decode + t_inception
        label = f"extrapolated from {run_steps} steps" if run_steps != steps else "measured"
        hours = per_image * args.num_samples / 3600
        print(f"{spec:14s} {per_image:9.3f} s/image ({label}; {per_step:.4f} s/step/image, "
              f"{gflop['step'] / per_step:.1f} GFLOP/s)  {args.num_samples} samples: {hours:8.2f} h on one device")


if __name__ == "__main__":
    main()
