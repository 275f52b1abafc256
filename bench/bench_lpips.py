"""Forward throughput of src.models.lpips.LPIPS against the `lpips` package (its peer), same VGG16 trunk.

    python bench/bench_lpips.py                       # CPU, 64x64, batch 25 (the design's training shape)
    python bench/bench_lpips.py --device cuda --iters 50

Both networks share one random trunk (copied from the package) and the official v0.1 linear layers; the
script checks they agree, then times them interleaved (so load on a shared machine hits both alike) and prints
the ratio: > 1 means ours is faster. Not a test: never run by pytest.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.models.lpips import lpips_with_official_weights, official_to_ours  # noqa: E402


def build_pair(device: torch.device):
    import lpips

    torch.manual_seed(0)
    peer = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval().to(device)
    ours = lpips_with_official_weights(pretrained_trunk=False)
    trunk = {k: v for k, v in official_to_ours(peer.state_dict()).items() if k.startswith("trunk.")}
    ours.load_state_dict({**ours.state_dict(), **trunk})
    return ours.to(device), peer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def time_once(fn, x, y, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn(x, y)
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch_size", type=int, default=25)
    p.add_argument("--img_size", type=int, default=64)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    device = torch.device(args.device)
    ours, peer = build_pair(device)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(args.batch_size, 3, args.img_size, args.img_size, generator=g) * 2 - 1).to(device)
    y = (x + 0.2 * torch.randn(x.shape, generator=g).to(device)).clamp(-1, 1)
    fns = {"ours": lambda a, b: ours(a, b), "lpips": lambda a, b: peer(a, b)}
    with torch.inference_mode():
        diff = (fns["ours"](x, y) - fns["lpips"](x, y).flatten()).abs().max().item()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(args.warmup + args.iters):
        order = list(fns) if i % 2 == 0 else list(reversed(fns))
        for name in order:
            t = time_once(fns[name], x, y, device)
            if i >= args.warmup:
                times[name].append(t)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"device {device}, batch {args.batch_size}, {args.img_size}x{args.img_size}, {args.iters} timed iters, "
          f"max |d_ours - d_lpips| = {diff:.2e}")
    for name, t in med.items():
        print(f"  {name:6s} median {t * 1e3:8.1f} ms/batch  {args.batch_size / t:9.1f} pairs/s")
    print(f"throughput ratio ours / lpips = {med['lpips'] / med['ours']:.3f}  (> 1: ours faster)")


if __name__ == "__main__":
    main()
