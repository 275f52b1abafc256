"""The full stage-1 training step of our autoencoder vs diffusers.AutoencoderKL with identical weights.

A step, as the trainer takes it once the discriminator is on:
    generator:      forward (encode, posterior sample, decode), L1 + LPIPS + KL + adaptive-weight PatchGAN term
                    (two extra gradient evaluations at the decoder's last layer), backward, AdamW
    discriminator:  hinge loss on real and detached reconstructed images, backward, AdamW
Both autoencoders hold the same weights (ours converted by src/models/diffusers_compat.py), so they compute the
same function (checked first); each has its own LPIPS, discriminator and optimisers with equal starting weights.
Our step can be compiled (src/training/performance.py: the VAE's blocks but the decoder's last layer, LPIPS and
the discriminator) and run channels_last; the twin runs eager as diffusers ships it. Prints ms per step, FLOPs,
TFLOP/s and MFU (against the GPU's dense bf16 spec and a bf16 matmul measured in the same run) and the ratio
ours / diffusers (< 1: ours faster). The VAE's only attention is mask-free self-attention (no --no_mask here).

    python bench/bench_vae.py                                   # quickstart size on CPU, then a wider one
    python bench/bench_vae.py --device cuda --dtype bf16 --channels 128 256 512 512 --img_size 256 \\
        --batch_size 8 --compile --channels_last                # the design's stage-1 step on a GPU
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_lock import gpu_exclusive  # noqa: E402
from mfu import count_flops, matmul_tflops, mfu_line, spec_peak_tflops, time_calls  # noqa: E402

from src.config import Stage1TrainConfig, VAEConfig  # noqa: E402
from src.losses.autoencoder import AutoencoderLoss  # noqa: E402
from src.models.discriminator import build_discriminator  # noqa: E402
from src.models.lpips import lpips_with_official_weights  # noqa: E402
from src.models.vae import build_autoencoder  # noqa: E402
from src.training.performance import compile_autoencoder, compile_in_place, to_memory_format  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def diffusers_twin(vae, cfg: VAEConfig):
    """diffusers.AutoencoderKL with our channels, loaded with our weights (src/models/diffusers_compat.py)."""
    from diffusers import AutoencoderKL

    from src.models.diffusers_compat import vae_config_to_diffusers, vae_state_to_diffusers

    device = next(vae.parameters()).device
    with torch.device(device):
        twin = AutoencoderKL(**vae_config_to_diffusers(cfg, scaling_factor=1.0))
    twin.load_state_dict(vae_state_to_diffusers(vae.state_dict()), strict=True)
    return twin


class DiffusersAdapter(torch.nn.Module):
    """Gives AutoencoderKL our output contract, so both models go through the same loss code."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, generator=None):
        from src.models.vae import AutoencoderOutput, DiagonalGaussian

        moments = self.model.quant_conv(self.model.encoder(x))  # (B, 2C, h, w)
        posterior = DiagonalGaussian(moments)
        z = posterior.sample(generator)
        return AutoencoderOutput(self.model.decode(z).sample, posterior, None)

    def last_layer(self):
        return self.model.decoder.conv_out.weight


@dataclass
class Stage1Models:
    """One side of the comparison: autoencoder, its loss (with LPIPS), discriminator and both optimisers."""

    model: torch.nn.Module
    last_layer: object  # () -> the decoder's output-layer weight
    loss_fn: AutoencoderLoss
    disc: torch.nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer


def build_side(model, last_layer, train_cfg: Stage1TrainConfig, perceptual, disc) -> Stage1Models:
    opt_g = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-5, fused=True)
    return Stage1Models(model, last_layer, AutoencoderLoss(train_cfg, perceptual), disc, opt_g, opt_d)


def stage1_step(side: Stage1Models, x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator, step: int):
    """One generator and one discriminator update on images x (B, 3, H, W), as the stage-1 trainer takes them."""
    enabled = dtype != torch.float32
    with torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
        out = side.model(x, generator=generator)
        loss, _ = side.loss_fn.generator_loss(x, out, side.disc, side.last_layer(), step=step)
    loss.backward()
    side.opt_g.step()
    side.opt_g.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
        d_loss, _ = side.loss_fn.discriminator_loss(side.disc, x, out.reconstruction.detach())
    d_loss.backward()
    side.opt_d.step()
    side.opt_d.zero_grad(set_to_none=True)


def build_pair(channels: list[int], img_size: int, device: torch.device, lpips: bool, compile_ours: bool,
               channels_last: bool, compile_mode: str = "default",
               backend: str = "inductor") -> tuple[Stage1Models, Stage1Models, float]:
    """(ours, diffusers twin, max |reconstruction difference| at equal weights)."""
    torch.manual_seed(0)
    cfg = VAEConfig(img_size=img_size, vae_channels_per_block=channels)
    with torch.device(device):
        ours = build_autoencoder(cfg)
    twin = DiffusersAdapter(diffusers_twin(ours, cfg))
    train_cfg = Stage1TrainConfig(disc_start=0, disc_start_dim=64, compile=compile_ours, compile_mode=compile_mode,
                                  channels_last=channels_last)
    x = torch.rand(2, 3, img_size, img_size, device=device) * 2 - 1
    with torch.no_grad():  # same weights -> same function
        gap = (ours(x, sample=False).reconstruction - twin.model(x, sample_posterior=False).sample).abs().max().item()
    disc = build_discriminator(train_cfg).to(device)
    perceptual = lpips_with_official_weights(pretrained_trunk=False).to(device) if lpips else None  # same cost either trunk
    twin_side = build_side(twin, twin.last_layer, train_cfg, copy.deepcopy(perceptual), copy.deepcopy(disc))
    for module in (ours, disc, perceptual):
        to_memory_format(module, train_cfg)
    compile_autoencoder(ours, train_cfg, backend)
    compile_in_place(disc, train_cfg, backend)
    compile_in_place(perceptual, train_cfg, backend)
    return build_side(ours, ours.last_layer, train_cfg, perceptual, disc), twin_side, gap


def step_flops(side: Stage1Models, x: torch.Tensor, dtype, generator) -> int:
    return count_flops(lambda: stage1_step(side, x, dtype, generator, step=1))


def bench(channels: list[int], img_size: int, batch_size: int, steps: int, device: torch.device, lpips: bool,
          dtype: torch.dtype = torch.float32, compile_ours: bool = False, channels_last: bool = False,
          warmup: int = 2, compile_mode: str = "default", spec: Optional[float] = None,
          measured: Optional[float] = None, backend: str = "inductor") -> dict:
    """Time both sides' full step, alternating who goes first; returns the figures as a dict."""
    ours, twin, gap = build_pair(channels, img_size, device, lpips, compile_ours, channels_last, compile_mode, backend)
    print(f"  same weights, max |ours - diffusers| on the reconstruction: {gap:.2e}")
    x = torch.rand(batch_size, 3, img_size, img_size, device=device) * 2 - 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gen = torch.Generator(device=device).manual_seed(0)
    with gpu_exclusive():
        flops = step_flops(twin, x, dtype, gen)  # eager twin: the same arithmetic as ours
    runs = {"ours": lambda: stage1_step(ours, x, dtype, gen, 1), "diffusers": lambda: stage1_step(twin, x, dtype, gen, 1)}
    times = {"ours": [], "diffusers": []}
    for name in ("ours", "diffusers"):  # warm-up (compilation, allocator, cudnn autotune)
        time_calls(runs[name], device, warmup, 0)
    with gpu_exclusive():
        for i in range(steps):  # interleaved, alternating who goes first, so load changes hit both alike
            for name in (("ours", "diffusers") if i % 2 == 0 else ("diffusers", "ours")):
                times[name] += time_calls(runs[name], device, 0, 1)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    for name in ("ours", "diffusers"):
        print(f"  {name:9s} {med[name] * 1e3:8.1f} ms/step  {batch_size / med[name]:7.1f} img/s  "
              f"{mfu_line(flops, med[name], spec, measured)}")
    ratio = med["ours"] / med["diffusers"]
    print(f"  FLOPs per step {flops / 1e12:.3f} TFLOP; ratio ours/diffusers {ratio:.3f}")
    return {"ours_ms": 1e3 * med["ours"], "diffusers_ms": 1e3 * med["diffusers"], "ratio": ratio, "flops": flops,
            "gap": gap}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="autocast dtype (weights stay fp32)")
    p.add_argument("--channels", type=int, nargs="+", default=None)
    p.add_argument("--img_size", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="compile our side (VAE blocks, LPIPS, discriminator)")
    p.add_argument("--compile_mode", default="default")
    p.add_argument("--channels_last", action="store_true", help="our side in NHWC")
    p.add_argument("--without_lpips", action="store_true", help="leave LPIPS out of the loss (isolates the autoencoder)")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    spec, name = spec_peak_tflops(device)
    measured = matmul_tflops(device)
    print(f"device {name}: spec {spec or 'unknown'} TFLOP/s dense bf16, measured bf16 matmul {measured:.1f} TFLOP/s")
    if args.channels:
        sizes = [(args.channels, args.img_size or 64, args.batch_size or 4)]
    else:  # the quickstart VAE, then the design's channels at a CPU-friendly size
        sizes = [([32, 64, 64], 32, 16), ([128, 256, 512, 512], 64, 2)]
    for channels, img_size, batch in sizes:
        print(f"channels {channels}, {img_size}px, batch {batch}, {args.dtype}, LPIPS {not args.without_lpips}, "
              f"compile {args.compile}, channels_last {args.channels_last}:")
        bench(channels, img_size, batch, args.steps, device, not args.without_lpips, DTYPES[args.dtype], args.compile,
              args.channels_last, args.warmup, args.compile_mode, spec, measured)


if __name__ == "__main__":
    main()
