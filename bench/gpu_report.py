"""The compact table of a GPU session: $OUT/results.jsonl -> $OUT/table.txt and $OUT/results.json.

    python3 bench/gpu_report.py $OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

MFU_TARGETS = {"b64": 0.40, "b16": 0.25, "64px": 0.40}
WORKLOADS = {"b64": "32x32 latents, batch 64", "b16": "32x32 latents, batch 16", "64px": "64x64 latents, batch 32"}
RATIO_TARGET = 0.6  # ours / diffusers eager, UNet and stage 1
TRAINER_TARGET = 0.9  # trainer img/s / isolated step img/s


def load(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    if not path.is_file():
        return []
    return merge([json.loads(line) for line in path.read_text().splitlines() if line.strip()])


def measurement_key(row: dict) -> tuple:
    """What one measurement is, whichever call took it: (section, workload, row)."""
    return row.get("section"), row.get("workload"), row.get("row")


def merge(rows: list[dict]) -> list[dict]:
    """One row per measurement when a session resumed an earlier one (gpu_session.sh PREVIOUS=...): a row that was
    skipped or failed is replaced by the same measurement taken later, in the earlier row's place."""
    def key(r: dict) -> tuple:  # a phase's own row (its failure or skip) is one per phase and job (PART=3's jobs)
        return ((r.get("phase"), r.get("job")) if r.get("section") == "phase" else None, *measurement_key(r))

    good = lambda r: not r.get("skipped") and not r.get("error")  # noqa: E731
    merged: dict[tuple, dict] = {}
    for r in rows:
        k = key(r)
        if r.get("section") in ("env", "peak", "compile_time"):
            k = (*k, len(merged))  # kept as they are
        if k not in merged or good(r) or not good(merged[k]):
            merged[k] = r
    return list(merged.values())


def pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def ms(row: Optional[dict]) -> str:
    if row is None:
        return "not run"
    if row.get("skipped"):
        return "skipped"
    if row.get("error"):
        return "failed"
    return f"{row['ms_per_step']:.1f} ms ({pct(row.get('mfu_spec'))})"


def ok(row: Optional[dict]) -> bool:
    return row is not None and not row.get("error") and not row.get("skipped") and row.get("ms_per_step") is not None


def unet_table(rows: list[dict]) -> list[str]:
    lines = ["| workload | ours eager | ours best | best variant | diffusers eager | best / diffusers | MFU target |",
             "|---|---|---|---|---|---|---|"]
    for key, name in WORKLOADS.items():
        mine = [r for r in rows if r.get("section") == "unet" and r.get("workload") == key]
        eager = next((r for r in mine if r.get("row") == "ours eager"), None)
        theirs = next((r for r in mine if r.get("row") == "diffusers eager"), None)
        ours = [r for r in mine if ok(r) and not r["row"].startswith("diffusers") and "(ablation)" not in r["row"]]
        best = min(ours, key=lambda r: r["ms_per_step"]) if ours else None
        ratio = f"{best['ms_per_step'] / theirs['ms_per_step']:.3f}" if ok(best) and ok(theirs) else "-"
        met = ""
        if ok(best) and best.get("mfu_spec") is not None:
            met = " (met)" if best["mfu_spec"] >= MFU_TARGETS[key] else " (missed)"
        lines.append(f"| {name} | {ms(eager)} | {ms(best)} | {best['row'] if best else '-'} | {ms(theirs)} | "
                     f"{ratio} | >= {pct(MFU_TARGETS[key])}{met} |")
    return lines


def section_rows(rows: list[dict], section: str, spec: Optional[float] = None) -> list[str]:
    out = []
    for r in rows:
        if r.get("section") != section:
            continue
        label = f"{r.get('workload', '')} {r.get('row', '')}".strip() or r.get("phase", "")
        if r.get("job"):
            label += f" (job {r['job']})"
        if r.get("skipped"):
            out.append(f"  {label}: skipped ({r['skipped']})")
        elif r.get("error"):
            out.append(f"  {label}: FAILED {r['error']}")
        elif "trainer_img_s" in r:
            out.append(f"  {label}: trainer {r['trainer_img_s']:.1f} img/s ({r['trainer_ms']:.1f} ms/step), isolated UNet "
                       f"step {r['isolated_img_s']:.1f} img/s ({r['isolated_ms']:.1f} ms); trainer / isolated "
                       f"{r['ratio']:.3f} (target >= {TRAINER_TARGET}); text {r.get('text_len')} positions, "
                       f"{r.get('mixed_precision')}, attention {r.get('attention_backend', 'auto')}"
                       + (f"; {r['windows_with_a_recompile']} window(s) re-timed after a recompile"
                          if r.get("windows_with_a_recompile") else ""))
        elif "ours_ms" in r:
            out.append(f"  {label}: ours {r['ours_ms']:.1f} ms, diffusers {r['diffusers_ms']:.1f} ms, ours / diffusers "
                       f"{r['ratio']:.3f} (target <= {RATIO_TARGET}); {r['flops'] / 1e12:.2f} TFLOP per step, "
                       f"ours {r['flops'] / r['ours_ms'] / 1e9:.0f} TFLOP/s"
                       + (f" (MFU {pct(r['flops'] / r['ours_ms'] / 1e9 / spec)})" if spec else "")
                       + f"; reconstructions agree to {r['gap']:.1e}")
        elif "ms_per_step" in r:
            mem = f", peak {r['peak_mem_gb']:.1f} GiB" if r.get("peak_mem_gb") is not None else ""
            out.append(f"  {label}: {r['ms_per_step']:.1f} ms, {r['img_per_s']:.0f} img/s, MFU {pct(r.get('mfu_spec'))}"
                       f" ({pct(r.get('mfu_matmul'))} of the measured matmul){mem}")
        else:
            shown = {k: v for k, v in r.items() if k not in ("phase", "section", "time", "workload", "row", "traceback")}
            out.append(f"  {label}: {json.dumps(shown)}")
    return out


def profile_rows(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r.get("section") != "profile" or not r.get("top"):
            continue
        out.append(f"  {r.get('workload')} {r.get('row')}: {r['device_ms_per_step']} ms of device time per step"
                   f" ({r.get('by', 'operator')}s)")
        out += [f"    {t['share']:6.1%} {t['ms_per_step']:8.2f} ms {t['calls_per_step']:5d} calls  {t['op'][:70]}"
                for t in r["top"]]
    return out or ["  not run"]


def report(rows: list[dict]) -> str:
    env = next((r for r in rows if r.get("section") == "env" and not r.get("error")), {})
    peak = next((r for r in rows if r.get("section") == "peak"), {})
    flops = {r["workload"]: r.get("flops_per_img") for r in rows if r.get("section") == "flops" and r.get("flops_per_img")}
    lines = [
        f"GPU session on {env.get('name', peak.get('device', '?'))} (torch {env.get('torch', '?')}, "
        f"diffusers {env.get('diffusers', '?')}), bf16 autocast, fused AdamW",
        f"dense bf16 spec {peak.get('spec_tflops', '?')} TFLOP/s, bf16 matmul measured {peak.get('matmul_tflops', '?')} "
        f"TFLOP/s; design UNet {peak.get('params_m', '?')} M parameters",
        "FLOPs per image (training step): " + ", ".join(f"{WORKLOADS[k]} {v / 1e9:.1f} GFLOP" for k, v in flops.items()),
        "",
        "UNet training step (MFU against the dense bf16 spec):",
        *unet_table(rows),
        "",
        "Every UNet row:", *section_rows(rows, "unet"),
        "", "Attention options (32x32 b64, ours eager unless named):", *section_rows(rows, "attention"),
        "", "Gradient checkpointing (memory vs speed):", *section_rows(rows, "checkpointing"),
        "", "Compile time (first step included):", *section_rows(rows, "compile_time"),
        "", f"Stage-2 trainer from the latent cache (target: >= {TRAINER_TARGET:.0%} of the isolated step's img/s):",
        *section_rows(rows, "trainer"),
        "", f"Stage-1 step, 256 px batch 8, VAE + LPIPS + PatchGAN (target: ours / diffusers <= {RATIO_TARGET}):",
        *section_rows(rows, "stage1", peak.get("spec_tflops")),
        "", "Where the step's device time goes (torch.profiler: eager by operator, compiled by kernel):",
        *profile_rows(rows),
        "", "Phases that were cut short or skipped:", *(section_rows(rows, "phase") or ["  none"]),
    ]
    failed = [r for r in rows if r.get("error")]
    if failed:
        lines += ["", "Tracebacks of failures (last lines):"]
        for r in failed:
            tail = (r.get("traceback") or "").strip().splitlines()[-3:]
            lines.append(f"  [{r['phase']}] {r['section']} {r.get('row', '')}: " + " | ".join(tail))
    return "\n".join(lines) + "\n"


def write_report(out: Path) -> str:
    rows = load(out)
    text = report(rows)
    (out / "table.txt").write_text(text)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(text)
    return text


if __name__ == "__main__":
    write_report(Path(sys.argv[1]))
