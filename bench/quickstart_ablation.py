"""Ablation of the stage-2 recipe levers on the quickstart: each variant trains the demo's diffusion model from the
same stage-1 autoencoder and latent cache, then evaluate_shapes.py scores it on the demo's 64 held-out prompts.

    python bench/quickstart_ablation.py --demo outputs/quickstart --out outputs/ablation \
        --variants shipped no_min_snr epsilon --steps 2800

--demo is a finished `make demo` output folder (its work/vae/model.safetensors, work/ldm.yaml with the scaling
constant, and work/latent_cache are reused, so only stage 2 and the evaluation run per variant). A variant is the
shipped configs/quickstart/stage2_diffusion_train.yaml with the overrides in VARIANTS; --set key=value adds
overrides to every variant (e.g. --set seed=1). Prints a markdown table and writes --out/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "quickstart" / "stage2_diffusion_train.yaml"

# name -> overrides of the shipped training config (each lever switched against what the demo ships)
VARIANTS: dict[str, dict] = {
    "shipped": {},
    "design_recipe": {"prediction_type": "epsilon", "snr_gamma": None},  # the design's eps + uniform weights
    "no_min_snr": {"snr_gamma": None},
    "min_snr_1": {"snr_gamma": 1.0},
    "epsilon": {"prediction_type": "epsilon", "rescale_betas_zero_snr": False},
    "v_prediction": {"prediction_type": "v_prediction", "rescale_betas_zero_snr": False},
    "zero_terminal_snr": {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True},
    "offset_noise_0.05": {"noise_offset": 0.05},
    "no_offset_noise": {"noise_offset": 0.0},
    "cosine_schedule": {"beta_schedule": "cosine"},
    "lr_1e-3": {"learning_rate": 1.0e-3},
    "batch_64": {"per_gpu_batch_size": 64},
    "ema_every_10": {"ema_update_every": 10},  # same training trajectory as shipped: only the EMA differs
}
SCORES = ("shape_color", "background_color", "shape", "clean")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default="outputs/quickstart", help="a finished make demo output folder")
    p.add_argument("--out", default="outputs/ablation")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=None, help="total_training_iterations (default: the shipped value)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every variant (YAML value), e.g. --set seed=1")
    p.add_argument("--eval", action="append", default=[], metavar="FLAGS",
                   help="evaluate_shapes.py flags of one evaluation (repeatable), e.g. "
                        "--eval '--sampler dpmpp_2m --guidance_scale 3'; default: the demo's evaluation")
    p.add_argument("--python", default=sys.executable)
    return p.parse_args(argv)


def demo_eval_flags() -> list[str]:
    """The evaluation flags scripts/quickstart.sh uses (its SAMPLER, SAMPLE_STEPS and GUIDANCE defaults)."""
    text = (ROOT / "scripts" / "quickstart.sh").read_text()

    def default(name: str) -> str:
        line = next(ln for ln in text.splitlines() if ln.startswith(f"{name}=${{{name}:-"))
        return line.split(":-", 1)[1].split("}", 1)[0]

    return ["--sampler", default("SAMPLER"), "--num_steps", default("SAMPLE_STEPS"),
            "--guidance_scale", default("GUIDANCE")]


def variant_config(name: str, extra: dict, steps, out: Path) -> Path:
    cfg = yaml.safe_load(BASE_CONFIG.read_text())
    cfg.update(VARIANTS[name])
    cfg.update(extra)
    if steps is not None:
        cfg["total_training_iterations"] = steps
        cfg["checkpoint_iterations"] = steps
    cfg["val_generation_freq"] = 0  # no grids: the evaluation is the measurement
    path = out / name / "stage2.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run(cmd: list[str], log: Path) -> float:
    start = time.time()
    with open(log, "w") as f:
        subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True,
                       env={**os.environ, "LDM_PROGRESS_INTERVAL": "60"})
    return time.time() - start


def main(argv=None) -> None:
    args = parse_args(argv)
    demo, out = Path(args.demo) / "work", Path(args.out)
    extra = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    evals = [e.split() for e in args.eval] or [demo_eval_flags()]
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    for name in args.variants:
        cfg = variant_config(name, extra, args.steps, out)
        work = out / name / "diffusion"
        shutil.rmtree(work, ignore_errors=True)  # trained afresh: the trainers refuse to start over a run's checkpoints
        seconds = run([
            args.python, "stage2_diffusion_trainer.py", "--working_directory", str(work), "--training_config", str(cfg),
            "--model_config", str(demo / "ldm.yaml"), "--path_to_vae_backbone", str(demo / "vae" / "model.safetensors"),
            "--dataset", "shapes", "--cache_latents", str(demo / "latent_cache"),
            "--val_prompts", str(ROOT / "configs" / "quickstart" / "prompts.txt"),
        ], out / name / "train.log")
        for i, flags in enumerate(evals):
            ev = out / name / f"eval_{i}"
            run([args.python, "evaluate_shapes.py", "--path_to_weights", str(work / "model.safetensors"),
                 "--exclude_prompts", str(ROOT / "configs" / "quickstart" / "prompts.txt"), "--output", str(ev),
                 *flags], out / name / f"eval_{i}.log")
            scores = json.loads((ev / "results.json").read_text())
            key = name if len(evals) == 1 else f"{name} [{' '.join(flags)}]"
            results[key] = {"train_seconds": round(seconds), "overrides": {**VARIANTS[name], **extra},
                            **{s: scores[s] for s in SCORES}}
        (out / "results.json").write_text(json.dumps(results, indent=2))
        print(f"{name}: trained in {seconds:.0f} s", flush=True)
    print("\n| variant | stage-2 s | " + " | ".join(SCORES) + " |")
    print("|---|---|" + "---|" * len(SCORES))
    for key, r in results.items():
        print(f"| {key} | {r['train_seconds']} | " + " | ".join(f"{r[s]:.3f}" for s in SCORES) + " |")


if __name__ == "__main__":
    main()
