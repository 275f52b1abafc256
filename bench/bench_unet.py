"""One UNet training step, ours against diffusers.UNet2DConditionModel with identical weights: time, FLOPs, MFU.

A step = forward under autocast, MSE to the DiffusionProcess target in fp32, backward, fused AdamW, on the same
batch for both models (text 77 x text_dim, the first --real_tokens real, the rest padding). FLOPs are counted
once per workload with torch.utils.flop_counter (forward + backward of the useful work: the real tokens), and
MFU is reported against the detected GPU's dense bf16 spec and against a bf16 matmul measured in this run.

How our UNet sees the text (--attention):
    trimmed  (default) what the trainer feeds it: Condition.trimmed() cuts the padding no caption reaches; here
             every caption has --real_tokens tokens, so the mask goes too and SDPA can use its flash kernel
    varied   captions of 4 to 20 tokens, trimmed: 24 positions and a mask (the trainer on real captions)
    padded   all 77 positions with the padding mask (what a padded text encoder output gives)
    none     all 77 positions, no mask (different output; the speed of an unmasked 77-token step)
diffusers gets the 77 positions with encoder_attention_mask, or without a mask under --no_mask.

    .venv/bin/python bench/bench_unet.py                                        # CPU-sized default
    python bench/bench_unet.py --design --latent_size 32 --batch 64 --device cuda --dtype bf16 \\
        --compile --channels_last --attention_backend cudnn                     # the design's UNet on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_lock import gpu_exclusive  # noqa: E402
from mfu import count_flops, matmul_tflops, mfu, mfu_line, spec_peak_tflops, time_per_call  # noqa: E402

from src.config import UNetConfig  # noqa: E402
from src.diffusion.schedule import DiffusionProcess, diffusion_loss  # noqa: E402
from src.models.unet import Condition, UNet, build_unet  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DESIGN_CHANNELS = [320, 640, 1280, 1280]
ATTENTION = ("trimmed", "varied", "padded", "none")


@dataclass
class Workload:
    batch: int
    latent_size: int
    latent_channels: int = 4
    text_len: int = 77
    real_tokens: int = 12
    text_dim: int = 768

    @property
    def name(self) -> str:
        return f"{self.latent_size}x{self.latent_size} b{self.batch}"


@dataclass
class Variant:
    """How one model runs a step."""

    model: str = "ours"  # ours | diffusers
    attention: str = "trimmed"  # trimmed | padded | none (ours); diffusers: padded | none
    compile: bool = False
    compile_mode: str = "default"
    channels_last: bool = False
    gradient_checkpointing: bool = False
    sdpa_backend: Optional[str] = None  # the SDPA kernel tried first (attention_backend): flash | efficient | cudnn | math
    dynamic: bool = False  # compile once for every batch size and latent size (marks those dims dynamic)
    fp32_norms: bool = False  # ours: the norms as torch.nn runs them (fp32 under CUDA autocast), the ablation

    @property
    def label(self) -> str:
        parts = [self.model, self.attention]
        if self.compile:
            parts.append("compile" if self.compile_mode == "default" else self.compile_mode)
        if self.channels_last:
            parts.append("channels_last")
        if self.gradient_checkpointing:
            parts.append("grad_ckpt")
        if self.sdpa_backend:
            parts.append(f"sdpa={self.sdpa_backend}")
        if self.dynamic:
            parts.append("dynamic")
        if self.fp32_norms:
            parts.append("fp32_norms")
        return " ".join(parts)


@dataclass
class Result:
    workload: str
    variant: str
    ms_per_step: Optional[float] = None
    img_per_s: Optional[float] = None
    tflops: Optional[float] = None
    mfu_spec: Optional[float] = None
    mfu_matmul: Optional[float] = None
    peak_mem_gb: Optional[float] = None
    error: Optional[str] = None
    extra: dict = field(default_factory=dict)


def unet_config(channels: list[int], layers_per_block: int = 2, head_dim: int = 64, text_dim: int = 768) -> UNetConfig:
    """The design's layout (AttnDown x (n-1), Down / Up, AttnUp x (n-1)) at the given widths."""
    n = len(channels)
    return UNetConfig(
        down_block_types=["AttnDown"] * (n - 1) + ["Down"], up_block_types=["Up"] + ["AttnUp"] * (n - 1),
        unet_channels_per_block=list(channels), unet_residual_layers_per_block=layers_per_block,
        attention_head_dim=head_dim, time_embed_start_dim=channels[0], time_embed_proj_dim=channels[0] * 4,
        text_embed_dim=text_dim,
    )


def build_ours(cfg: UNetConfig, latent_channels: int, device: torch.device) -> UNet:
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: seconds instead of a minute for 860 M parameters
        return build_unet(cfg, latent_channels, "text").train()


def build_diffusers_twin(ours: UNet, latent_size: int, device: torch.device):
    """diffusers.UNet2DConditionModel with our layout and our weights."""
    from diffusers import UNet2DConditionModel

    from src.models.diffusers_compat import unet_config_to_diffusers, unet_state_to_diffusers

    with torch.device(device):
        theirs = UNet2DConditionModel(**unet_config_to_diffusers(ours, latent_size))
    theirs.load_state_dict(unet_state_to_diffusers(ours), strict=True)
    return theirs.train()


@dataclass
class Batch:
    xt: torch.Tensor  # (B, C, h, w)
    t: torch.Tensor  # (B,)
    target: torch.Tensor  # (B, C, h, w)
    text: torch.Tensor  # (B, L, D)
    mask: torch.Tensor  # (B, L)

    def condition(self, attention: str) -> Condition:
        """The text as our UNet gets it (computed once, before timing)."""
        if attention == "trimmed":
            return trimmed_on_device(self.text, self.mask)
        if attention == "varied":  # captions of 4 to 20 tokens: trimmed to 24 positions, the mask stays
            g = torch.Generator().manual_seed(1)
            lengths = torch.randint(4, 21, (self.text.shape[0],), generator=g)  # (B,)
            mask = (torch.arange(self.text.shape[1])[None] < lengths[:, None]).long()  # (B, L)
            return trimmed_on_device(self.text * mask[..., None].to(self.text), mask)
        if attention == "padded":
            return Condition(text=self.text, text_mask=self.mask)
        return Condition(text=self.text)


def trimmed_on_device(text: torch.Tensor, mask: torch.Tensor) -> Condition:
    """Condition.trimmed() on the CPU mask (as the data path does), the result on text's device."""
    cond = Condition(text=text.cpu(), text_mask=mask.cpu()).trimmed()
    return cond.to(text.device)


def make_batch(w: Workload, device: torch.device) -> Batch:
    g = torch.Generator().manual_seed(0)
    shape = (w.batch, w.latent_channels, w.latent_size, w.latent_size)
    x0, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.randint(0, 1000, (w.batch,), generator=g)
    process = DiffusionProcess(1000)
    text = torch.randn(w.batch, w.text_len, w.text_dim, generator=g)
    mask = torch.zeros(w.batch, w.text_len, dtype=torch.long)
    mask[:, : w.real_tokens] = 1  # realistic captions: most of the 77 positions are padding
    text = text * mask[..., None]  # padding embeddings are zeros (they are masked anyway)
    xt, target = process.add_noise(x0, noise, t), process.training_target(x0, noise, t)
    return Batch(*(v.to(device) for v in (xt, t, target, text, mask)))


def sdpa_context(backend: Optional[str]):
    """The trainer's `attention_backend` key: SDPA tries `backend` first, the other kernels stay behind it."""
    from src.training.performance import attention_kernels

    return attention_kernels(backend or "auto")


def norms_context(fp32_norms: bool):
    """With fp32_norms, our GroupNorm / LayerNorm run torch.nn's forward: under CUDA autocast in float32, with the
    activation copied up and back (src/models/layers.py says why ours keep the compute dtype)."""
    if not fp32_norms:
        return contextlib.nullcontext()
    from unittest import mock

    from src.models import layers

    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(layers.GroupNorm, "forward", torch.nn.GroupNorm.forward))
    stack.enter_context(mock.patch.object(layers.LayerNorm, "forward", torch.nn.LayerNorm.forward))
    return stack


def apply_inductor_options(options: list[str]) -> str:
    """Set torch._inductor.config from "key=value" strings (values read as YAML: 1, true, 0.5, text); returns them
    as a label suffix ("" for none). An unknown key stops with its name."""
    import yaml
    from torch._inductor import config

    for option in options:
        key, _, value = option.partition("=")
        if not hasattr(config, key):
            raise SystemExit(f"--inductor {option}: torch._inductor.config has no {key!r}")
        setattr(config, key, yaml.safe_load(value))
    return "".join(f" inductor {option}" for option in options)


def compiled(model, variant: Variant, backend: str = "inductor"):
    """The model, or torch.compile(model) in the variant's mode (another backend, e.g. aot_eager, takes no mode)."""
    if not variant.compile:
        return model
    from src.config import TrainConfig
    from src.training.performance import compile_module

    return compile_module(model, TrainConfig(compile=True, compile_mode=variant.compile_mode), backend)


def make_forward(model, variant: Variant, batch: Batch, backend: str = "inductor") -> Callable[[], torch.Tensor]:
    """The model's call on the batch (compiled, channels_last, checkpointed as the variant says)."""
    fn = compiled(model, variant, backend)
    if variant.compile and variant.dynamic:
        for tensor, dims in ((batch.xt, (0, 2, 3)), (batch.t, (0,)), (batch.text, (0,)), (batch.mask, (0,))):
            for dim in dims:
                torch._dynamo.maybe_mark_dynamic(tensor, dim)
    if variant.model == "ours":
        model.set_gradient_checkpointing(variant.gradient_checkpointing)
        cond = batch.condition(variant.attention)
        if variant.compile and variant.dynamic and cond.text is not batch.text:
            torch._dynamo.maybe_mark_dynamic(cond.text, 0)
        return lambda: fn(batch.xt, batch.t, cond)
    if variant.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    mask = batch.mask if variant.attention == "padded" else None
    return lambda: fn(batch.xt, batch.t, encoder_hidden_states=batch.text, encoder_attention_mask=mask).sample


def make_step(model, forward: Callable[[], torch.Tensor], batch: Batch, dtype: torch.dtype, device: torch.device,
              optimizer: Optional[torch.optim.Optimizer], cudagraphs: bool, backend: Optional[str],
              fp32_norms: bool = False):
    """forward (autocast) + fp32 MSE + backward + AdamW step, as a closure."""

    def step():
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        with sdpa_context(backend), norms_context(fp32_norms), \
                torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = forward()
        loss = diffusion_loss(pred, batch.target, "mse")
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)

    return step


def fused_adamw(model) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure(model, variant: Variant, w: Workload, batch: Batch, dtype, device, flops: Optional[int],
            spec: Optional[float], measured: Optional[float], warmup: int, steps: int, optimizer=True,
            backend: str = "inductor", raise_errors: bool = False,
            inspect: Optional[Callable[[Callable[[], None]], dict]] = None) -> Result:
    """Time one variant's training step on `batch`. A failure (e.g. out of memory) is recorded in the result, or
    raised after cleaning up with `raise_errors`. `inspect(step)`, run after the timing on the same (compiled,
    warm) step, fills result.extra: a profile without a second compile."""
    result = Result(w.name, variant.label)
    opt = None
    try:
        free_memory(device)
        if variant.channels_last:
            model.to(memory_format=torch.channels_last)
        opt = fused_adamw(model) if optimizer else None
        forward = make_forward(model, variant, batch, backend)
        step = make_step(model, forward, batch, dtype, device, opt,
                         variant.compile and "reduce-overhead" in variant.compile_mode, variant.sdpa_backend,
                         variant.fp32_norms)
        seconds = time_per_call(step, device, warmup, steps)  # its first call (the compile) outside gpu_exclusive()
        if inspect is not None:
            with gpu_exclusive():
                result.extra = inspect(step)
        result.ms_per_step = 1000 * seconds
        result.img_per_s = w.batch / seconds
        if device.type == "cuda":
            result.peak_mem_gb = torch.cuda.max_memory_allocated(device) / 2**30
        if flops:
            result.tflops = flops / seconds / 1e12
            result.mfu_spec, result.mfu_matmul = mfu(flops, seconds, spec), mfu(flops, seconds, measured)
    except Exception as err:  # noqa: BLE001  (reported in the table, the next measurement goes on)
        result.error = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        if raise_errors:
            raise
    finally:
        if variant.channels_last:
            model.to(memory_format=torch.contiguous_format)
        if opt is not None:
            del opt
        model.zero_grad(set_to_none=True)
        free_memory(device)
    return result


def workload_flops(ours: UNet, w: Workload, batch: Batch, dtype, device) -> int:
    """FLOPs of one training step of the useful work (text trimmed to the real tokens), counted once."""
    step = make_step(ours, make_forward(ours, Variant(), batch), batch, dtype, device, None, False, None)
    with gpu_exclusive():
        flops = count_flops(step)
    ours.zero_grad(set_to_none=True)
    return flops


def format_result(r: Result, ratio_to: Optional[float] = None) -> str:
    if r.error:
        return f"{r.workload:12s} {r.variant:45s} FAILED {r.error}"
    line = f"{r.workload:12s} {r.variant:45s} {r.ms_per_step:8.1f} ms {r.img_per_s:8.1f} img/s"
    if r.tflops is not None:
        line += f" {r.tflops:7.1f} TFLOP/s"
    if r.mfu_spec is not None:
        line += f"  MFU {100 * r.mfu_spec:5.1f} %"
    if r.mfu_matmul is not None:
        line += f" ({100 * r.mfu_matmul:5.1f} % of matmul)"
    if r.peak_mem_gb is not None:
        line += f"  {r.peak_mem_gb:5.1f} GiB"
    if ratio_to:
        line += f"  ours/diffusers {r.ms_per_step / ratio_to:.3f}"
    return line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--design", action="store_true", help=f"the design's channels {DESIGN_CHANNELS} (860 M parameters)")
    p.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128, 128])
    p.add_argument("--layers_per_block", type=int, default=2)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--text_dim", type=int, default=768)
    p.add_argument("--text_len", type=int, default=77)
    p.add_argument("--real_tokens", type=int, default=12, help="real caption tokens; the rest is padding")
    p.add_argument("--latent_channels", type=int, default=4)
    p.add_argument("--latent_size", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="autocast dtype (weights stay fp32)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: CPU time is a clean measure)")
    p.add_argument("--compile", action="store_true", help="torch.compile our UNet")
    p.add_argument("--compile_mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    p.add_argument("--channels_last", action="store_true", help="NHWC weights and activations for our UNet")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="a torch._inductor.config setting for --compile (repeatable), e.g. coordinate_descent_tuning=1")
    p.add_argument("--no_mask", action="store_true", help="both models: the 77 positions unmasked")
    p.add_argument("--attention", choices=ATTENTION, default="trimmed", help="how our UNet sees the text (above)")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--attention_backend", choices=["auto", "cudnn", "flash", "efficient", "math"], default="auto",
                   help="the SDPA kernel our UNet tries first (the training key of the same name)")
    p.add_argument("--fp32_norms", action="store_true",
                   help="our norms as torch.nn runs them (fp32 under CUDA autocast): the ablation of keeping bf16")
    p.add_argument("--no_diffusers", action="store_true", help="time our UNet only")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.design:
        args.channels = DESIGN_CHANNELS
    torch.set_num_threads(args.threads)
    apply_inductor_options(args.inductor)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    w = Workload(args.batch, args.latent_size, args.latent_channels, args.text_len, args.real_tokens, args.text_dim)
    ours = build_ours(unet_config(args.channels, args.layers_per_block, args.head_dim, args.text_dim),
                      args.latent_channels, device)
    theirs = None if args.no_diffusers else build_diffusers_twin(ours, args.latent_size, device)
    spec, name = spec_peak_tflops(device)
    measured = matmul_tflops(device)
    batch = make_batch(w, device)
    flops = workload_flops(ours, w, batch, dtype, device)
    attention = "none" if args.no_mask else args.attention
    ours_variant = Variant("ours", attention, args.compile, args.compile_mode, args.channels_last, args.gradient_checkpointing,
                           None if args.attention_backend == "auto" else args.attention_backend,
                           fp32_norms=args.fp32_norms)
    results = [measure(ours, ours_variant, w, batch, dtype, device, flops, spec, measured, args.warmup, args.steps)]
    if theirs is not None:
        twin = Variant("diffusers", "none" if args.no_mask else "padded", gradient_checkpointing=args.gradient_checkpointing)
        results.append(measure(theirs, twin, w, batch, dtype, device, flops, spec, measured, args.warmup, args.steps))

    n_params = sum(p.numel() for p in ours.parameters())
    print(f"device {name}, dtype {args.dtype}, channels {args.channels}, {n_params / 1e6:.0f} M parameters, "
          f"latent {args.latent_channels}x{w.latent_size}x{w.latent_size}, batch {w.batch}, "
          f"text {w.text_len}x{w.text_dim} ({w.real_tokens} real)")
    print(f"FLOPs per step {flops / 1e12:.3f} TFLOP ({flops / w.batch / 1e12:.3f} per image); "
          f"peak: spec {spec or 'unknown'} TFLOP/s, measured bf16 matmul {measured:.1f} TFLOP/s")
    diffusers_ms = results[1].ms_per_step if len(results) > 1 and not results[1].error else None
    print(format_result(results[0], diffusers_ms))
    for r in results[1:]:
        print(format_result(r))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "flops": flops, "spec_tflops": spec,
                                               "matmul_tflops": measured, "device": name,
                                               "results": [asdict(r) for r in results]}, indent=2))


if __name__ == "__main__":
    main()
