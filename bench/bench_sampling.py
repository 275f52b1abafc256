"""Benchmark (c): DDIM-50 with classifier-free guidance against the design's DDPM-1000, time per image.

A text-conditional UNet at latent size (random weights: speed does not depend on what the weights are) samples
the same batch with
    ddpm   all T = 1000 ancestral steps, no guidance (what the design did)       1000 forwards of B
    ddim   50 steps, guidance scale 4: [uncond; cond] in one batched forward     50 forwards of 2B
    ddim   50 steps without guidance, for reference                               50 forwards of B
and prints seconds per image and the speed-up over DDPM-1000. Not part of the test run.

    .venv/bin/python bench/bench_sampling.py                                  # quickstart-sized, CPU
    .venv/bin/python bench/bench_sampling.py --channels 320 640 1280 1280 --latent_size 32 --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.config import UNetConfig  # noqa: E402
from src.diffusion.samplers import ddim_sample, ddpm_sample  # noqa: E402
from src.diffusion.schedule import DiffusionProcess  # noqa: E402
from src.models.unet import Condition, build_unet  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--channels", type=int, nargs="+", default=[64, 128])
    p.add_argument("--layers_per_block", type=int, default=1)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--text_dim", type=int, default=384)
    p.add_argument("--text_len", type=int, default=77)
    p.add_argument("--latent_channels", type=int, default=4)
    p.add_argument("--latent_size", type=int, default=8)
    p.add_argument("--batch", type=int, default=4, help="images per sampling call")
    p.add_argument("--ddim_steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=4.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: CPU time is a clean measure)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n = len(args.channels)
    cfg = UNetConfig(
        down_block_types=["AttnDown"] * (n - 1) + ["Down"], up_block_types=["Up"] + ["AttnUp"] * (n - 1),
        unet_channels_per_block=args.channels, unet_residual_layers_per_block=args.layers_per_block,
        attention_head_dim=args.head_dim, time_embed_start_dim=args.channels[0],
        time_embed_proj_dim=args.channels[0] * 4, text_embed_dim=args.text_dim,
    )
    torch.manual_seed(0)
    unet = build_unet(cfg, args.latent_channels, "text").to(device).eval()
    process = DiffusionProcess(1000)
    shape = (args.batch, args.latent_channels, args.latent_size, args.latent_size)
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(args.batch, args.text_len, dtype=torch.long)
    mask[:, :12] = 1
    cond = Condition(text=torch.randn(args.batch, args.text_len, args.text_dim, generator=g), text_mask=mask).to(device)
    uncond = unet.null_condition(args.batch)

    runs = {
        "ddpm-1000": lambda gen: ddpm_sample(unet, process, shape, cond=cond, generator=gen, device=device),
        f"ddim-{args.ddim_steps} cfg {args.guidance_scale:g}": lambda gen: ddim_sample(
            unet, process, shape, cond=cond, uncond=uncond, guidance_scale=args.guidance_scale,
            num_steps=args.ddim_steps, generator=gen, device=device),
        f"ddim-{args.ddim_steps} no cfg": lambda gen: ddim_sample(
            unet, process, shape, cond=cond, num_steps=args.ddim_steps, generator=gen, device=device),
    }
    ddim_sample(unet, process, shape, cond=cond, num_steps=2, generator=torch.Generator().manual_seed(0), device=device)

    print(f"device={device} threads={args.threads} channels={args.channels} layers={args.layers_per_block} "
          f"latent={args.latent_channels}x{args.latent_size}x{args.latent_size} batch={args.batch} "
          f"params={sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M")
    results = {}
    for name, run in runs.items():
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        out = run(torch.Generator().manual_seed(1))
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        assert out.shape == shape and torch.isfinite(out).all()
        results[name] = (wall / args.batch, cpu / args.batch)
        print(f"{name:22s} {wall / args.batch:8.3f} s wall, {cpu / args.batch:8.3f} s CPU per image")
    base_wall, base_cpu = results["ddpm-1000"]
    for name, (wall, cpu) in results.items():
        if name != "ddpm-1000":
            print(f"speed-up of {name} over ddpm-1000: wall x{base_wall / wall:.1f}, CPU time x{base_cpu / cpu:.1f}")


if __name__ == "__main__":
    main()
