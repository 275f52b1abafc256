"""Issue 10's target table in one GPU session: run by bench/gpu_session.sh, one phase per process.

    python3 bench/gpu_session.py --phase unet_eager --out $OUT --deadline <epoch s>   # one phase
    python3 bench/gpu_session.py --report --out $OUT                                  # table.txt, results.json
    python bench/gpu_session.py --device cpu --tiny --out /tmp/dry --phase all         # dry run of every phase

Every measurement appends one JSON line to $OUT/results.jsonl as soon as it is taken, so a phase that fails or
runs out of time keeps what it measured; a measurement that raises is recorded with its error and the next one
goes on. Before each measurement the phase checks that its estimated cost fits before --deadline, and records
it as skipped otherwise. Phases, in order of value:

    unet_eager            design UNet (860 M), 32x32 b64, 32x32 b16, 64x64 b32: FLOPs; ours eager (SDPA's kernel, cuDNN
                          attention first, + channels_last, and each with torch.nn's fp32 norms as the ablation),
                          diffusers eager (same weights); attention options at b64 (ATTENTION_OPTIONS=0 skips them);
                          per-operator profiles; gradient checkpointing memory vs speed
    unet_compiled_static  torch.compile + channels_last + cuDNN attention, static shapes, one compile per workload
                          (COMPILED_RUNS, default "b64:default b16:reduce-overhead 64px:default": what `compile: True`
                          trains with, and CUDA graphs where the host's launches bound the step)
    stage1_eager          stage-1 step at 256 px b8 (VAE + LPIPS + PatchGAN, G and D updates), ours vs diffusers twin
    trainer_eager         the stage-2 trainer from the latent cache, img/s beside the isolated UNet step (b64, b16)
    unet_compiled         torch.compile reduce-overhead (CUDA graphs), compiled once for all three workloads (batch
                          and latent size dynamic), then timed on each
    stage1_compiled       the stage-1 step with our side compiled and channels_last
    trainer_compiled      the trainer with compile: True (TRAINER_MODES, default reduce-overhead), b64 and b16

On the H200 (2026-11-27) the design UNet's first compiled step had not finished after 94 s (reduce-overhead,
dynamic): give the compiled phases minutes (CAP_unet_compiled_static=300), and resume the eager rows with
PREVIOUS=bench/results/h200_2026-11-27.jsonl on the same kind of GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_unet as bu  # noqa: E402
from gpu_report import measurement_key  # noqa: E402
from mfu import matmul_tflops, spec_peak_tflops  # noqa: E402

PHASES = ["unet_eager", "unet_compiled_static", "stage1_eager", "trainer_eager", "unet_compiled", "stage1_compiled",
          "trainer_compiled"]


class Session:
    """Results file, deadline and sizes shared by the phases."""

    def __init__(self, args):
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results = self.out / "results.jsonl"
        self.deadline = args.deadline or time.time() + 3600
        self.device = torch.device(args.device)
        self.tiny = args.tiny
        self.backend = args.compile_backend
        self.phase = ""
        self.compile_estimate = self.observed_compile_time() or (8.0 if args.tiny else 60.0)  # seconds, a lower bound
        self.done = self.measured_rows()

    def rows(self) -> list[dict]:
        if not self.results.is_file():
            return []
        return [json.loads(line) for line in self.results.read_text().splitlines() if line.strip()]

    def measured_rows(self) -> dict[tuple, dict]:
        """Rows already measured in this results file (an earlier call's, resumed): (section, workload, row) -> row."""
        return {measurement_key(r): r for r in self.rows()
                if not r.get("skipped") and not r.get("error") and r.get("section") not in ("phase", "env", "peak")}

    def observed_compile_time(self) -> Optional[float]:
        """The longest compiled measurement an earlier phase took (its compile included), as the estimate."""
        seconds = [r["seconds"] for r in self.rows() if r.get("section") == "compile_time"]
        return max(seconds) if seconds else None

    # sizes: the design's on a GPU, a few-second stand-in for the CPU dry run
    @property
    def channels(self) -> list[int]:
        return [32, 64] if self.tiny else bu.DESIGN_CHANNELS

    def unet_cfg(self):
        if self.tiny:
            return bu.unet_config([32, 64], layers_per_block=1, head_dim=16, text_dim=32)
        return bu.unet_config(bu.DESIGN_CHANNELS)

    def workloads(self) -> dict[str, bu.Workload]:
        if self.tiny:
            return {"b64": bu.Workload(4, 8, text_dim=32), "b16": bu.Workload(2, 8, text_dim=32),
                    "64px": bu.Workload(2, 16, text_dim=32)}
        return {"b64": bu.Workload(64, 32), "b16": bu.Workload(16, 32), "64px": bu.Workload(32, 64)}

    @property
    def steps(self) -> tuple[int, int]:
        return (1, 2) if self.tiny else (3, 8)  # (warm-up, timed)

    def left(self) -> float:
        return self.deadline - time.time()

    def fits(self, estimate: float) -> bool:
        return self.left() > estimate

    def record(self, section: str, **fields) -> dict:
        row = {"phase": self.phase, "section": section, "time": round(time.time(), 1), **fields}
        with open(self.results, "a") as f:
            f.write(json.dumps(row) + "\n")
        shown = {k: v for k, v in fields.items() if k != "traceback"}
        print(f"[{self.phase}] {section}: {json.dumps(shown)}", flush=True)
        return row

    def guarded(self, section: str, estimate: float, fn: Callable[[], Optional[dict]], **labels) -> Optional[dict]:
        """Run fn() if `estimate` seconds fit before the deadline; record its dict, its error or the skip. A row an
        earlier call measured (same section, workload and row) is returned as it was, not measured again."""
        done = self.done.get(measurement_key({"section": section, **labels}))
        if done is not None:
            print(f"[{self.phase}] {section}: {labels} measured earlier ({done.get('phase')}), kept", flush=True)
            return done
        if not self.fits(estimate):
            self.record(section, skipped=f"{self.left():.0f} s left, needs ~{estimate:.0f} s", **labels)
            return None
        start = time.time()
        try:
            out = fn() or {}
        except Exception as err:  # noqa: BLE001  (one failure must not stop the others)
            self.record(section, error=f"{type(err).__name__}: {str(err)[:300]}",
                        traceback=traceback.format_exc()[-2000:], seconds=round(time.time() - start, 1), **labels)
            free(self.device)
            return None
        return self.record(section, seconds=round(time.time() - start, 1), **{**out, **labels})


def free(device: torch.device, compiled: bool = False) -> None:
    """Release what a measurement left on the device; compiled code and CUDA-graph pools too when `compiled`."""
    if compiled:
        torch._dynamo.reset()
    bu.free_memory(device)


def configure(device: torch.device) -> None:
    """What the trainers set on CUDA (src/training/performance.py), plus room for many compiled variants."""
    import torch._dynamo

    for name, value in (("recompile_limit", 64), ("cache_size_limit", 64), ("accumulated_recompile_limit", 512),
                        ("accumulated_cache_size_limit", 512)):
        if hasattr(torch._dynamo.config, name):  # the names changed across torch versions
            setattr(torch._dynamo.config, name, value)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")


def inductor_options() -> str:
    """INDUCTOR_OPTIONS="key=value;key=value" applied to torch._inductor.config (a job's compile variant, e.g.
    coordinate_descent_tuning=1); returns the label suffix that names them."""
    import re

    return bu.apply_inductor_options([o for o in re.split(r"[;\s]+", os.environ.get("INDUCTOR_OPTIONS", "")) if o])


# --------------------------------------------------------------------------------------------------- UNet phases


def result_fields(r: bu.Result, flops: Optional[int], w: bu.Workload) -> dict:
    if r.error:
        raise RuntimeError(r.error)
    d = asdict(r)
    d.update(batch=w.batch, latent=w.latent_size, flops_per_img=flops / w.batch if flops else None)
    return d


class UNetBench:
    """Our design UNet (and, on demand, the diffusers twin) on the device, with FLOPs per workload."""

    def __init__(self, s: Session, with_diffusers: bool):
        self.s = s
        self.ours = bu.build_ours(s.unet_cfg(), 4, s.device)
        self.theirs = bu.build_diffusers_twin(self.ours, 32, s.device) if with_diffusers else None
        self.spec, self.name = spec_peak_tflops(s.device)
        self.matmul = matmul_tflops(s.device)
        self.flops: dict[str, int] = {r["workload"]: int(r["flops_per_img"] * s.workloads()[r["workload"]].batch)
                                      for (section, *_), r in s.done.items() if section == "flops"}
        self.batches: dict[str, bu.Batch] = {}
        self.step_s: dict[str, float] = {}  # seconds per step last measured on each workload
        self.inspected: Optional[dict] = None  # what the last run's `inspect` returned

    def estimate(self, key: str, first: float) -> float:
        """Seconds a measurement on `key` needs: `first` before any step there ran (cuDNN autotunes new shapes),
        then warm-up + timed steps at the observed step time, twice over, plus model moves and clean-up."""
        if key not in self.step_s:
            return first
        return 3 + 2 * sum(self.s.steps) * self.step_s[key]

    def batch(self, key: str) -> bu.Batch:
        if key not in self.batches:
            self.batches = {key: bu.make_batch(self.s.workloads()[key], self.s.device)}  # one resident at a time
        return self.batches[key]

    def workload_flops(self, key: str) -> Optional[int]:
        """FLOPs of one step of the workload, counted once; None when counting failed (e.g. out of memory)."""
        if key not in self.flops:
            try:
                self.flops[key] = bu.workload_flops(self.ours, self.s.workloads()[key], self.batch(key),
                                                    torch.bfloat16, self.s.device)
            except Exception as err:  # noqa: BLE001  (the timings still count without MFU)
                print(f"counting FLOPs of {key} failed: {type(err).__name__}: {err}", flush=True)
                self.ours.zero_grad(set_to_none=True)
                free(self.s.device)
                self.flops[key] = None
        return self.flops[key]

    def run(self, key: str, variant: bu.Variant, inspect: Optional[Callable] = None) -> dict:
        """One timed measurement; `inspect(step)` (e.g. a profile of the same, already compiled step) goes to
        self.inspected."""
        w = self.s.workloads()[key]
        model = self.ours if variant.model == "ours" else self.theirs
        flops = self.workload_flops(key)
        warmup, steps = self.s.steps
        result = bu.measure(model, variant, w, self.batch(key), torch.bfloat16, self.s.device, flops, self.spec,
                            self.matmul, warmup, steps, backend=self.s.backend, raise_errors=True, inspect=inspect)
        if result.ms_per_step and not variant.compile:
            self.step_s[key] = max(self.step_s.get(key, 0.0), result.ms_per_step / 1000)
        fields = result_fields(result, flops, w)
        self.inspected = fields.pop("extra", None)
        return fields


def phase_unet_eager(s: Session) -> None:
    s.guarded("env", 30, lambda: env_info(s))
    bench = UNetBench(s, with_diffusers=True)
    s.record("peak", device=bench.name, spec_tflops=bench.spec, matmul_tflops=round(bench.matmul, 1),
             params_m=round(sum(p.numel() for p in bench.ours.parameters()) / 1e6, 1))
    first = 4 if s.tiny else 35  # seconds for the first step on a workload: cuDNN autotunes its shapes
    keys = os.environ.get("UNET_KEYS", "b64 b16 64px").split()
    for key in keys:
        s.guarded("flops", first, lambda: {"flops_per_img": (bench.workload_flops(key) or 0) / s.workloads()[key].batch},
                  workload=key)
        rows = [("ours eager", bu.Variant("ours", "trimmed")),
                ("ours eager, cuDNN attention", bu.Variant("ours", "trimmed", sdpa_backend="cudnn")),
                ("ours eager, channels_last + cuDNN attention (GPU config without compile)",
                 bu.Variant("ours", "trimmed", channels_last=True, sdpa_backend="cudnn")),
                ("ours eager, cuDNN attention, fp32 norms (ablation)",
                 bu.Variant("ours", "trimmed", sdpa_backend="cudnn", fp32_norms=True)),
                ("ours eager, channels_last + cuDNN attention, fp32 norms (ablation)",
                 bu.Variant("ours", "trimmed", channels_last=True, sdpa_backend="cudnn", fp32_norms=True)),
                ("diffusers eager", bu.Variant("diffusers", "padded"))]
        for label, variant in rows:
            s.guarded("unet", bench.estimate(key, first) * (1.3 if variant.model == "diffusers" else 1),
                      lambda v=variant: bench.run(key, v), workload=key, row=label)
        if key == "b64":
            if os.environ.get("ATTENTION_OPTIONS", "1") == "1":
                attention_options(s, bench)
                s.guarded("unet", bench.estimate(key, first), lambda: bench.run(key, bu.Variant("ours", "trimmed",
                          channels_last=True)), workload=key, row="ours eager channels_last")
        s.guarded("checkpointing", 1.5 * bench.estimate(key, first),
                  lambda: bench.run(key, bu.Variant("ours", "trimmed", gradient_checkpointing=True)), workload=key,
                  row="ours eager gradient_checkpointing")
    # profiles last: after torch.profiler with CUDA activity, CUPTI can stay attached and slow the process's later
    # steps by 10-20 % (pytorch/pytorch#144455); the one row timed after the profiles in the second H200 session
    # (checkpointing at b64) was an outlier
    if "b64" in keys:
        for label, variant in PROFILED:
            s.guarded("profile", bench.estimate("b64", first) + 5, lambda v=variant: profile(bench, "b64", v),
                      workload="b64", row=f"{label}: device time by operator")


# the eager steps profiled at b64: the GPU config without compile, and the step before it (NCHW)
PROFILED = [("ours eager, channels_last + cuDNN attention", bu.Variant("ours", "trimmed", channels_last=True,
                                                                      sdpa_backend="cudnn")),
            ("ours eager, cuDNN attention", bu.Variant("ours", "trimmed", sdpa_backend="cudnn"))]


def profile(bench: UNetBench, key: str, variant: bu.Variant) -> dict:
    """Where one eager step's device time goes: the operators with the most self time (torch.profiler)."""
    b = bench.batch(key)
    if bench.s.device.type != "cuda":
        variant = replace(variant, sdpa_backend=None)
    if variant.channels_last:
        bench.ours.to(memory_format=torch.channels_last)
    step = bu.make_step(bench.ours, bu.make_forward(bench.ours, variant, b), b, torch.bfloat16, bench.s.device,
                        None, False, variant.sdpa_backend)
    step()  # warm
    out = profile_step(step, bench.s.device, by="operator")
    bench.ours.zero_grad(set_to_none=True)
    bench.ours.to(memory_format=torch.contiguous_format)
    free(bench.s.device)
    return {**out, "batch": bench.s.workloads()[key].batch}


def profile_step(step: Callable[[], None], device: torch.device, by: str, steps: int = 2) -> dict:
    """The top 20 of a warm step's device time (torch.profiler, `steps` steps averaged), by "operator" (eager:
    aten::mm, ...) or by "kernel" (compiled: inductor's fused triton_* kernels launch no operator)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    # a kernel's time ("void at::native::...<...>", "sm90_xmma_...", "triton_...") is also the self device time of
    # the operator ("aten::mm") that launched it: list one or the other, or every kernel is counted twice. Kernels
    # have no host time; ranges (CompiledFunction, ...) do, and span many kernels. A CPU has operators only.
    by = "kernel" if by == "kernel" and device.type == "cuda" else "operator"
    if by == "kernel":
        chosen = lambda e: not is_operator(e.key) and e.self_cpu_time_total == 0  # noqa: E731
    else:
        chosen = lambda e: is_operator(e.key)  # noqa: E731
    events = [e for e in prof.key_averages() if chosen(e) and getattr(e, attr, 0) > 0]
    events = sorted(events, key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in events) or 1
    top = [{"op": e.key, "ms_per_step": round(getattr(e, attr) / 1000 / steps, 2),
            "share": round(getattr(e, attr) / total, 3), "calls_per_step": e.count // steps} for e in events[:20]]
    return {"device_ms_per_step": round(total / 1000 / steps, 1), "by": by, "top": top}


def is_operator(name: str) -> bool:
    """A dispatcher operator's profiler name (namespace::op, e.g. aten::convolution_backward), not a kernel's."""
    return "::" in name and not any(c in name for c in " <(")


def attention_options(s: Session, bench: UNetBench) -> None:
    """Cross-attention to padded text at 32x32 b64: what each way of handing SDPA the text costs."""
    key = "b64"
    s.guarded("attention", bench.estimate(key, 35), lambda: same_output(bench, key), workload=key,
              row="max |padded - trimmed| (bf16)")
    rows = [
        ("ours padded 77 + mask (SDPA's choice)", bu.Variant("ours", "padded")),
        ("ours padded 77 + mask, cuDNN attention", bu.Variant("ours", "padded", sdpa_backend="cudnn")),
        ("ours varied 4-20 tokens, trimmed to 24 + mask", bu.Variant("ours", "varied")),
        ("ours varied, trimmed + mask, cuDNN attention", bu.Variant("ours", "varied", sdpa_backend="cudnn")),
        ("ours 77 unmasked (reference, other output)", bu.Variant("ours", "none")),
        ("diffusers 77 unmasked (reference, other output)", bu.Variant("diffusers", "none")),
    ]
    for label, variant in rows:
        s.guarded("attention", bench.estimate(key, 35), lambda v=variant: bench.run(key, v), workload=key, row=label)


@torch.no_grad()
def same_output(bench: UNetBench, key: str) -> dict:
    """Our UNet's output with the padded text + mask against the trimmed text (the trainer's path)."""
    b = bench.batch(key)
    with torch.autocast(bench.s.device.type, dtype=torch.bfloat16):
        padded = bench.ours(b.xt, b.t, b.condition("padded")).float()
        trimmed = bench.ours(b.xt, b.t, b.condition("trimmed")).float()
        varied_full = bu.Condition(text=b.condition("varied").text, text_mask=b.condition("varied").full_mask())
    return {"max_abs_diff": (padded - trimmed).abs().max().item(), "output_std": padded.std().item(),
            "varied_len": varied_full.text.shape[1]}


def phase_unet_compiled(s: Session, runs: list[tuple[str, str]], dynamic: bool) -> None:
    """Time our compiled UNet on each (workload, compile mode) of `runs`, channels_last and cuDNN attention first,
    as the GPU config trains. Dynamic: compiled once (the first measurement pays for it) for every workload.
    Static: each workload compiles its own graph, from a reset (otherwise a second shape would make dynamo
    recompile with dynamic sizes)."""
    bench = UNetBench(s, with_diffusers=False)
    options = inductor_options()
    for i, (key, mode) in enumerate(runs):
        label = f"ours compile {mode}" + (" dynamic" if dynamic else "") + " channels_last + cuDNN attention" + options
        variant = bu.Variant("ours", "trimmed", compile=True, compile_mode=mode, channels_last=True, dynamic=dynamic,
                             sdpa_backend="cudnn")
        first = i == 0 or not dynamic
        if first and i:
            free(s.device, compiled=True)
        last = i == len(runs) - 1  # profiled after the phase's last timing (see phase_unet_eager)
        inspect = (lambda step: profile_step(step, s.device, by="kernel")) if last else None
        row = s.guarded("unet", s.compile_estimate if first else 30,
                        lambda k=key, v=variant, fn=inspect: bench.run(k, v, fn), workload=key, row=label)
        if row is not None and s.done.get(measurement_key(row)) is row:
            continue  # resumed from an earlier call: its compile time is in that call's rows
        if first and row and row.get("seconds"):
            s.record("compile_time", workload=key, row=label, seconds=row["seconds"])
            s.compile_estimate = max(s.compile_estimate, row["seconds"])  # the next compile is skipped if it won't fit
        if row and bench.inspected:  # the compiled step's kernels, profiled in the same call as its timing
            s.record("profile", workload=key, row=f"{label}: device time by {bench.inspected['by']}", **bench.inspected)
            bench.inspected = None


def compiled_runs(default: str) -> list[tuple[str, str]]:
    """COMPILED_RUNS="b64:default b16:reduce-overhead" (workload:mode, in order), or `default`."""
    return [tuple(item.split(":")) for item in os.environ.get("COMPILED_RUNS", default).split()]


# --------------------------------------------------------------------------------------------------- stage 1


def phase_stage1(s: Session, compiled: bool) -> None:
    import bench_vae as bv

    channels, size, batch = ([32, 32], 32, 2) if s.tiny else ([128, 256, 512, 512], 256, 8)
    spec, _ = spec_peak_tflops(s.device)
    measured = matmul_tflops(s.device)
    warmup, steps = s.steps
    variants = [(True, True, "ours compile channels_last")] if compiled else \
        [(False, False, "ours eager"), (False, True, "ours eager channels_last")]
    for compile_ours, channels_last, label in variants:
        estimate = s.compile_estimate if compile_ours else (5 if s.tiny else 25)
        s.guarded("stage1", estimate, lambda c=compile_ours, cl=channels_last: bv.bench(
            channels, size, batch, steps, s.device, True, torch.bfloat16, c, cl, warmup, "default", spec, measured,
            backend=s.backend), row=label, img_size=size, batch=batch)
        free(s.device, compiled)


# --------------------------------------------------------------------------------------------------- trainer


def phase_trainer(s: Session, compiled: bool) -> None:
    import bench_stage2_step as bt

    batches = [2] if s.tiny else [int(b) for b in os.environ.get("TRAINER_BATCHES", "64 16").split()]
    # TRAINER_SET="key=value;key=value": training keys over the GPU config's (an A/B row, e.g. ema_update_every=1)
    overrides = bt.parse_overrides(item for item in os.environ.get("TRAINER_SET", "").split(";") if item)
    suffix = "".join(f" {k}={v}" for k, v in overrides.items())
    # ten timed steps hold one log step (log_every) and one move of the EMA (ema_update_every) of the GPU config
    steps = s.steps if s.tiny else (s.steps[0], max(s.steps[1], 10))
    for batch in batches:
        for mode in (os.environ.get("TRAINER_MODES", "reduce-overhead").split() if compiled else ["default"]):
            estimate = (15 if s.tiny else 60) + (s.compile_estimate if compiled else 0)
            label = f"trainer b{batch}" + (f" compile {mode}" if compiled else " eager") + suffix
            s.guarded("trainer", estimate, lambda b=batch, m=mode: bt.run(
                batch=b, device=s.device, compiled=compiled, compile_mode=m, tiny=s.tiny,
                work_dir=Path(os.environ.get("GPU_SESSION_WORK", "/tmp/gpu_session_work")),
                steps=steps, backend=s.backend, overrides=overrides), row=label, batch=batch)
            free(s.device, compiled)


# --------------------------------------------------------------------------------------------------- misc


def env_info(s: Session) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(s.device)}
    if s.device.type == "cuda":
        props = torch.cuda.get_device_properties(s.device)
        info.update(name=props.name, memory_gb=round(props.total_memory / 2**30, 1), sm=props.multi_processor_count,
                    cudnn=torch.backends.cudnn.version())
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    info["cpus"] = os.cpu_count()
    return info


def run_phase(s: Session, phase: str) -> None:
    s.phase = phase
    configure(s.device)
    if phase == "unet_eager":
        phase_unet_eager(s)
    elif phase == "stage1_eager":
        phase_stage1(s, compiled=False)
    elif phase == "trainer_eager":
        phase_trainer(s, compiled=False)
    elif phase == "unet_compiled":
        phase_unet_compiled(s, compiled_runs("b64:reduce-overhead b16:reduce-overhead 64px:reduce-overhead"), True)
    elif phase == "stage1_compiled":
        phase_stage1(s, compiled=True)
    elif phase == "unet_compiled_static":
        phase_unet_compiled(s, compiled_runs("b64:default b16:reduce-overhead 64px:default"), False)
    elif phase == "trainer_compiled":
        phase_trainer(s, compiled=True)
    else:
        raise SystemExit(f"unknown phase {phase!r}; one of {PHASES}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", default=None, help=f"one of {PHASES}, or 'all'")
    p.add_argument("--report", action="store_true", help="write table.txt and results.json from results.jsonl")
    p.add_argument("--out", required=True)
    p.add_argument("--deadline", type=float, default=None, help="epoch seconds by which the phase must end")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="CPU dry run: tiny models, same code paths")
    p.add_argument("--compile_backend", default="inductor", help="aot_eager: a dry run without inductor's compile time")
    args = p.parse_args(argv)
    s = Session(args)
    if args.phase:
        for phase in (PHASES if args.phase == "all" else [args.phase]):
            run_phase(s, phase)
    if args.report:
        from gpu_report import write_report

        write_report(Path(args.out))


if __name__ == "__main__":
    main()
