"""Benchmark (a): one UNet training step, ours against diffusers.UNet2DConditionModel at equal channels.

Both networks get the same layout (channels, resnets per level, attention levels, head width, text width),
the same weights (ours converted by src/models/diffusers_compat.py), the same DiffusionProcess noising and
target, the same loss and AdamW step. Steps alternate between the two so that load from other processes hits both alike. Prints
seconds per step for each and the ratio ours / diffusers (below 1 = ours faster). Not part of the test run.

    .venv/bin/python bench/bench_unet.py                              # CPU-sized default
    .venv/bin/python bench/bench_unet.py --channels 320 640 1280 1280 --latent_size 32 --batch 8 \
        --device cuda --dtype bf16                                    # the design's UNet on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.config import UNetConfig  # noqa: E402
from src.diffusion.schedule import DiffusionProcess, diffusion_loss  # noqa: E402
from src.models.diffusers_compat import unet_config_to_diffusers, unet_state_to_diffusers  # noqa: E402
from src.models.unet import Condition, build_unet  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128, 128])
    p.add_argument("--layers_per_block", type=int, default=2)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--text_dim", type=int, default=768)
    p.add_argument("--text_len", type=int, default=77)
    p.add_argument("--latent_channels", type=int, default=4)
    p.add_argument("--latent_size", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="autocast dtype (weights stay fp32)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: CPU time is a clean measure)")
    return p.parse_args()


def build_pair(args):
    from diffusers import UNet2DConditionModel

    n = len(args.channels)
    cfg = UNetConfig(
        down_block_types=["AttnDown"] * (n - 1) + ["Down"], up_block_types=["Up"] + ["AttnUp"] * (n - 1),
        unet_channels_per_block=args.channels, unet_residual_layers_per_block=args.layers_per_block,
        attention_head_dim=args.head_dim, time_embed_start_dim=args.channels[0],
        time_embed_proj_dim=args.channels[0] * 4, text_embed_dim=args.text_dim,
    )
    torch.manual_seed(0)
    ours = build_unet(cfg, args.latent_channels, "text")
    theirs = UNet2DConditionModel(**unet_config_to_diffusers(ours, args.latent_size))
    theirs.load_state_dict(unet_state_to_diffusers(ours), strict=True)
    return ours, theirs


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ours, theirs = build_pair(args)
    ours.to(device).train()
    theirs.to(device).train()
    process = DiffusionProcess(1000)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.latent_channels, args.latent_size, args.latent_size)
    x0 = torch.randn(shape, generator=g).to(device)
    noise = torch.randn(shape, generator=g).to(device)
    t = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    text = torch.randn(args.batch, args.text_len, args.text_dim, generator=g).to(device)
    mask = torch.ones(args.batch, args.text_len, dtype=torch.long)
    mask[:, 12:] = 0  # realistic caption lengths: most of the 77 positions are padding
    mask = mask.to(device)
    xt, target = process.add_noise(x0, noise, t), process.training_target(x0, noise, t)
    cond = Condition(text=text, text_mask=mask)

    forwards = {
        "ours": lambda: ours(xt, t, cond),
        "diffusers": lambda: theirs(xt, t, encoder_hidden_states=text, encoder_attention_mask=mask).sample,
    }
    optims = {"ours": torch.optim.AdamW(ours.parameters(), 1e-4), "diffusers": torch.optim.AdamW(theirs.parameters(), 1e-4)}
    dtype = DTYPES[args.dtype]

    def step(name: str) -> tuple[float, float]:
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = forwards[name]()
        loss = diffusion_loss(pred, target, "mse")
        loss.backward()
        optims[name].step()
        optims[name].zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start, time.process_time() - cpu_start

    times = {"ours": [], "diffusers": []}
    cpu_times = {"ours": [], "diffusers": []}
    for i in range(args.warmup + args.steps):
        for name in (("ours", "diffusers") if i % 2 == 0 else ("diffusers", "ours")):
            elapsed, cpu = step(name)
            if i >= args.warmup:
                times[name].append(elapsed)
                cpu_times[name].append(cpu)

    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    print(f"device={device} dtype={args.dtype} threads={args.threads} channels={args.channels} "
          f"layers={args.layers_per_block} head_dim={args.head_dim} batch={args.batch} "
          f"latent={args.latent_channels}x{args.latent_size}x{args.latent_size} text={args.text_len}x{args.text_dim}")
    print(f"parameters: ours {n_ours / 1e6:.2f} M, diffusers {n_theirs / 1e6:.2f} M")
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu = {k: statistics.median(v) for k, v in cpu_times.items()}
    for name in ("ours", "diffusers"):
        print(f"{name:10s} {med[name] * 1000:8.1f} ms wall, {cpu[name] * 1000:8.1f} ms CPU / training step "
              f"(median of {args.steps})")
    print(f"ratio ours / diffusers: wall {med['ours'] / med['diffusers']:.3f}, "
          f"CPU time {cpu['ours'] / cpu['diffusers']:.3f}  (< 1: ours faster; on a shared CPU trust CPU time)")


if __name__ == "__main__":
    main()
