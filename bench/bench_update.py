"""The update around the model's step, on the design UNet's parameters: gradient norm and clipping, fused AdamW,
the EMA. These cost the same at every batch size (they touch each fp32 parameter a fixed number of times), so at
small batches they are a large share of a step; they are memory-bound, so they are given in ms and GB/s.

Rows (each on freshly made fp32 gradients of the same values):
    clip_grad_norm_ + step   torch.nn.utils.clip_grad_norm_ (norm, then one multiply of every gradient), then the
                             fused AdamW step
    guarded_update           what the trainers run (src/training/optim.py): the norm, then the fused step, which
                             divides each gradient by the clip divisor as it reads it
    step, no clipping        the fused AdamW step alone: the floor of the two above
    EMA update               the trainers' EMA (src/training/ema.py), a lerp of every parameter
    EMA every 10, per step   ema_update_every: 10, ten steps timed together, divided by ten (nine steps record
                             their decay, the tenth moves the shadow)

Bytes per parameter, by the kernels' reads and writes: norm 4; multiply 8; fused AdamW 28 (32 with a divisor: it
writes the divided gradient back); EMA 12. For the design's 860 M parameters one more pass of 4 bytes is 3.4 GB.

    .venv/bin/python bench/bench_update.py                       # CPU: a quarter of the parameters
    python bench/bench_update.py --device cuda --fraction 1      # the whole design UNet on a GPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_unet import DESIGN_CHANNELS, unet_config  # noqa: E402
from mfu import time_calls  # noqa: E402

from src.models.unet import build_unet  # noqa: E402
from src.training.ema import EMA  # noqa: E402
from src.training.optim import LRSchedule, Trainable, build_adamw, guarded_update  # noqa: E402
from src.training.precision import MixedPrecision  # noqa: E402

BYTES_PER_PARAM = {"clip_grad_norm_ + step": 4 + 8 + 28, "guarded_update": 4 + 32, "step, no clipping": 28,
                   "EMA update": 12, "EMA every 10, per step": 1.2}


def design_model(fraction: float, device: torch.device) -> torch.nn.Module:
    """A module holding the design UNet's parameter shapes, in its order, up to `fraction` of its parameter count."""
    with torch.device("meta"):
        shapes = [p.shape for p in build_unet(unet_config(DESIGN_CHANNELS), 4, "text").parameters()]
    budget, kept, count = fraction * sum(s.numel() for s in shapes), [], 0
    for shape in shapes:
        if kept and count + shape.numel() > budget:
            break
        kept.append(shape)
        count += shape.numel()
    module = torch.nn.Module()
    module.params = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in kept])
    return module


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fraction", type=float, default=None, help="share of the design UNet's parameters "
                        "(default: 1 on a GPU, 0.25 on a CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed calls per row (default 20 GPU, 3 CPU)")
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    fraction = args.fraction if args.fraction is not None else (1.0 if on_gpu else 0.25)
    steps = args.steps or (20 if on_gpu else 3)

    torch.manual_seed(0)
    model = design_model(fraction, device)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    grads = [torch.randn_like(p) for p in params]  # norm ~ sqrt(n): far above max_grad_norm, so clipping acts
    buffers = [torch.empty_like(p) for p in params]  # what .grad points to; refilled before each call
    opt = build_adamw(model, 1e-4, (0.9, 0.999), 1e-8, 0.01, device)
    unit = Trainable("unet", params, opt, LRSchedule(opt, "constant", 1e-4, 0, 10**6), args.max_grad_norm)
    precision = MixedPrecision("no", device)
    ema = EMA(model, decay=0.9999).to(device)
    no_flag = torch.zeros((), dtype=torch.bool, device=device)

    def with_grads(update):
        def call():  # the same gradients every call (clipping and the fused divisor change them in place)
            torch._foreach_copy_(buffers, grads)
            for p, b in zip(params, buffers):
                p.grad = b
            update()
        return call

    def reference():
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def plain_step():
        opt.step()
        opt.zero_grad(set_to_none=True)

    rows = {
        "clip_grad_norm_ + step": with_grads(reference),
        "guarded_update": with_grads(lambda: guarded_update([unit], precision, no_flag)),
        "step, no clipping": with_grads(plain_step),
    }
    copy_ms = min(time_calls(with_grads(lambda: None), device, 1, steps)) * 1e3  # making the gradients
    print(f"{device.type}: {len(params)} parameter tensors, {n / 1e6:.1f} M parameters (the design UNet's first "
          f"{fraction:.0%}); min of {steps} calls, the time to refill the gradients taken off")
    def report(name: str, ms: float) -> None:
        print(f"  {name:24s} {ms:8.2f} ms  {BYTES_PER_PARAM[name] * n / ms / 1e6:7.1f} GB/s by the byte model")

    for name, call in rows.items():
        report(name, min(time_calls(call, device, 1, steps)) * 1e3 - copy_ms)
    report("EMA update", min(time_calls(lambda: ema.update(model, no_flag), device, 1, steps)) * 1e3)
    every_10 = EMA(model, decay=0.9999, update_every=10).to(device)

    def ten_steps():
        for step in range(1, 11):
            every_10.update(model, no_flag, step=step)

    report("EMA every 10, per step", min(time_calls(ten_steps, device, 1, steps)) * 1e3 / 10)


if __name__ == "__main__":
    main()
