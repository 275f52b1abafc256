"""One stage-1 training step of our autoencoder vs diffusers.AutoencoderKL at equal architecture, same process.

A step = forward (encode, posterior sample, decode), the full loss (L1 + LPIPS + KL + adaptive-weight PatchGAN
term, which needs two extra gradient evaluations at the decoder's last layer) and backward. Both models hold
the same weights (ours converted by src/models/diffusers_compat.py), so they compute the same function; the
script checks that first. Timings interleave the two models and report medians; ratio = ours / diffusers (< 1: ours faster).

    python bench/bench_vae.py                                   # quickstart size on CPU, then a wider one
    python bench/bench_vae.py --device cuda --channels 128 256 512 512 --img_size 256 --batch_size 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.config import Stage1TrainConfig, VAEConfig  # noqa: E402
from src.losses.autoencoder import AutoencoderLoss  # noqa: E402
from src.models.diffusers_compat import vae_config_to_diffusers, vae_state_to_diffusers  # noqa: E402
from src.models.discriminator import build_discriminator  # noqa: E402
from src.models.lpips import lpips_with_official_weights  # noqa: E402
from src.models.vae import build_autoencoder  # noqa: E402


def diffusers_twin(vae, cfg: VAEConfig):
    """diffusers.AutoencoderKL with our channels, loaded with our weights (src/models/diffusers_compat.py)."""
    from diffusers import AutoencoderKL

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


def make_step(model, last_layer, loss_fn, disc, x):
    params = [p for p in model.parameters()]

    def step():
        for p in params:
            p.grad = None
        out = model(x)
        loss, _ = loss_fn.generator_loss(x, out, disc, last_layer(), step=1)
        loss.backward()

    return step


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def bench(channels: list[int], img_size: int, batch_size: int, steps: int, device: torch.device, lpips: bool) -> float:
    torch.manual_seed(0)
    cfg = VAEConfig(img_size=img_size, vae_channels_per_block=channels)
    ours = build_autoencoder(cfg).to(device)
    twin = DiffusersAdapter(diffusers_twin(ours, cfg)).to(device)
    train_cfg = Stage1TrainConfig(disc_start=0, disc_start_dim=64)
    perceptual = lpips_with_official_weights(pretrained_trunk=False).to(device) if lpips else None  # same cost either trunk
    loss_fn = AutoencoderLoss(train_cfg, perceptual)
    disc = build_discriminator(train_cfg).to(device)
    x = (torch.rand(batch_size, 3, img_size, img_size, device=device) * 2 - 1)
    with torch.no_grad():  # same weights -> same function
        a = ours(x, sample=False).reconstruction
        b = twin.model(x, sample_posterior=False).sample
    gap = (a - b).abs().max().item()
    print(f"  same weights, max |ours - diffusers| on the reconstruction: {gap:.2e}")
    step_ours = make_step(ours, ours.last_layer, loss_fn, disc, x)
    step_twin = make_step(twin, twin.last_layer, loss_fn, disc, x)
    for _ in range(2):  # warm-up (allocator, cudnn autotune)
        step_ours(), step_twin()
    t_ours, t_twin = [], []
    for i in range(steps):  # interleaved, alternating who goes first, so load changes hit both alike
        if i % 2:
            t_twin.append(timed(step_twin, device))
        t_ours.append(timed(step_ours, device))
        if not i % 2:
            t_twin.append(timed(step_twin, device))
    mo, mt = statistics.median(t_ours), statistics.median(t_twin)
    print(f"  ours {mo * 1e3:8.1f} ms/step   diffusers {mt * 1e3:8.1f} ms/step   ratio ours/diffusers {mo / mt:.3f}")
    return mo / mt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--channels", type=int, nargs="+", default=None)
    p.add_argument("--img_size", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--without_lpips", action="store_true", help="leave LPIPS out of the loss (isolates the autoencoder)")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.channels:
        sizes = [(args.channels, args.img_size or 64, args.batch_size or 4)]
    else:  # the quickstart VAE, then the design's channels at a CPU-friendly size
        sizes = [([32, 64, 64], 32, 16), ([128, 256, 512, 512], 64, 2)]
    for channels, img_size, batch in sizes:
        print(f"channels {channels}, {img_size}px, batch {batch}, device {device}, LPIPS {not args.without_lpips}:")
        bench(channels, img_size, batch, args.steps, device, lpips=not args.without_lpips)


if __name__ == "__main__":
    main()
