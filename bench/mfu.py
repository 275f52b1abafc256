"""FLOPs, throughput and model FLOPs utilisation (MFU) for the benches.

    flops = count_flops(lambda: train_step())           # torch.utils.flop_counter over one call
    peak = spec_peak_tflops(device)                      # the GPU's dense bf16 spec, None when unknown
    measured = matmul_tflops(device)                     # a bf16 matmul timed here, the practical ceiling
    print(mfu_line(flops, seconds, peak, measured))

MFU = achieved FLOP/s / peak FLOP/s, where the FLOPs are those of the model's matmuls and convolutions (forward
and backward, as torch.utils.flop_counter counts them; attention included) and peak is the dense (no sparsity)
bf16 tensor-core figure of the data sheet. Against the measured matmul it says how close the step gets to what
this very card delivers today.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch

from gpu_lock import gpu_exclusive

# Dense bf16 tensor-core TFLOP/s (no 2:4 sparsity), from the vendors' data sheets; longest name match wins.
GPU_BF16_TFLOPS: dict[str, float] = {
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,  # the SXM part's device name
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 756.0,  # unnamed variants: the smallest
    "H200": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}


def spec_peak_tflops(device: torch.device) -> tuple[Optional[float], str]:
    """(dense bf16 TFLOP/s of the data sheet or None, device name)."""
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    matches = [key for key in GPU_BF16_TFLOPS if key.lower() in name.lower()]
    if not matches:
        return None, name
    return GPU_BF16_TFLOPS[max(matches, key=len)], name


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, steps: int) -> list[float]:
    """Seconds of each of `steps` calls after `warmup` untimed ones, the device synchronised around each. The first
    warm-up call (where torch.compile compiles) runs outside gpu_exclusive(), the rest inside it (gpu_lock.py)."""
    if warmup:
        fn()
        synchronize(device)
    with gpu_exclusive():
        for _ in range(warmup - 1):
            fn()
        synchronize(device)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
    return times


def time_per_call(fn: Callable[[], object], device: torch.device, warmup: int, steps: int) -> float:
    """Median seconds per call (the device synchronised around each)."""
    return statistics.median(time_calls(fn, device, warmup, steps))


def matmul_tflops(device: torch.device, n: Optional[int] = None, dtype=torch.bfloat16, iters: int = 20) -> float:
    """TFLOP/s of an n x n x n matmul (8192 on a GPU, 512 on a CPU) in `dtype`, measured now."""
    n = n or (8192 if device.type == "cuda" else 512)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    per_call = time_per_call(lambda: a @ b, device, warmup=3, steps=iters if device.type == "cuda" else 3)
    return 2 * n**3 / per_call / 1e12


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of `fn` (matmuls, convolutions and attention, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def mfu(flops: float, seconds: float, peak_tflops: Optional[float]) -> Optional[float]:
    if not peak_tflops or seconds <= 0:
        return None
    return flops / seconds / (peak_tflops * 1e12)


def mfu_line(flops: float, seconds: float, spec: Optional[float], measured: Optional[float]) -> str:
    """'X TFLOP/s, MFU a % of the spec (S), b % of the measured matmul (M)'."""
    achieved = flops / seconds / 1e12
    parts = [f"{achieved:7.1f} TFLOP/s"]
    if spec:
        parts.append(f"MFU {100 * mfu(flops, seconds, spec):5.1f} % of spec {spec:.0f}")
    if measured:
        parts.append(f"{100 * mfu(flops, seconds, measured):5.1f} % of matmul {measured:.0f}")
    return ", ".join(parts)
