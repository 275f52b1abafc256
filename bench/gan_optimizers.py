"""Stage-1 optimiser settings compared on the quickstart: reconstruction L1 and LPIPS on held-out images at equal steps.

    .venv/bin/python bench/gan_optimizers.py --out outputs/gan_optimizers [--steps 500] [--seeds 0]

Runs stage1_vae_trainer.py on the quickstart configs (configs/quickstart/stage1_vae_train.yaml + ldm.yaml, 32 px
shapes, the GAN from step 400) once per setting, with the LPIPS checkpoint the demo trains (made here first, as
`make demo` makes it, unless --lpips_checkpoint is given), then scores each autoencoder on 512 shapes images the
training set does not contain: mean |x - x_hat| and mean LPIPS (that same checkpoint), reconstructions from the
posterior mode. Prints a Markdown table (the README's "Long runs" section holds the one measured on this machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> training-YAML overrides (generator betas, discriminator betas, weight decay)
SETTINGS = {
    "G AdamW(0.9, 0.999), D AdamW(0.9, 0.999)": dict(adam_beta1=0.9, adam_beta2=0.999, disc_adam_beta1=0.9,
                                                     disc_adam_beta2=0.999),
    "G AdamW(0.9, 0.999), D Adam(0.5, 0.9)": dict(adam_beta1=0.9, adam_beta2=0.999, disc_adam_beta1=0.5,
                                                  disc_adam_beta2=0.9),
    "G Adam(0.5, 0.9), D AdamW(0.9, 0.999)": dict(adam_beta1=0.5, adam_beta2=0.9, disc_adam_beta1=0.9,
                                                  disc_adam_beta2=0.999),
    "G Adam(0.5, 0.9), D Adam(0.5, 0.9)": dict(adam_beta1=0.5, adam_beta2=0.9, disc_adam_beta1=0.5,
                                               disc_adam_beta2=0.9),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="working folder")
    p.add_argument("--steps", type=int, default=None, help="default: the quickstart's total_training_iterations")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--weight_decay", type=float, default=None, help="default: the quickstart's")
    p.add_argument("--lpips_checkpoint", default=None, help="default: train the demo's LPIPS into --out")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--num_eval", type=int, default=512)
    return p.parse_args()


def run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    subprocess.run(cmd, cwd=ROOT, check=True, env=env)


def demo_lpips(out: Path) -> Path:
    """The demo's LPIPS: a BAPPS-format set generated here, lpips_trainer.py with scripts/quickstart.sh's flags."""
    ckpt = out / "lpips" / "lpips_quickstart.pt"
    if ckpt.is_file():
        return ckpt
    run([sys.executable, "-m", "src.data.bapps_synth", "--out", str(out / "bapps"), "--num_train", "200",
         "--num_val", "50", "--patch_size", "32", "--seed", "0"])
    run([sys.executable, "lpips_trainer.py", "--path_to_root", str(out / "bapps"), "--work_dir", str(out / "lpips"),
         "--checkpoint_name", ckpt.name, "--img_size", "32", "--batch_size", "25", "--num_workers", "0",
         "--num_epochs", "2", "--decay_epochs", "1", "--logging_steps", "50", "--use_dropout", "--initial_lr", "1e-3",
         "--img_range", "minus_one_to_one", "--middle_channels", "32", "--val_sets", "cnn", "--jnd_sets"])
    return ckpt


def train(out: Path, name: str, overrides: dict, seed: int, args, lpips_ckpt: Path) -> Path:
    work = out / f"{list(SETTINGS).index(name)}_seed{seed}"
    if (work / "model.safetensors").is_file():
        return work
    shutil.rmtree(work, ignore_errors=True)  # an interrupted attempt: start over (the trainer refuses its checkpoints)
    cfg = yaml.safe_load((ROOT / "configs/quickstart/stage1_vae_train.yaml").read_text())
    cfg.update(overrides, seed=seed, use_lpips=True, lpips_checkpoint=str(lpips_ckpt), val_generation_freq=0)
    if args.steps:
        cfg["total_training_iterations"] = args.steps
    if args.weight_decay is not None:
        cfg["weight_decay"] = args.weight_decay
    work.mkdir(parents=True, exist_ok=True)
    (work / "train.yaml").write_text(yaml.safe_dump(cfg))
    run([sys.executable, "stage1_vae_trainer.py", "--working_directory", str(work), "--training_config",
         str(work / "train.yaml"), "--model_config", str(ROOT / "configs/quickstart/ldm.yaml"), "--dataset", "shapes"])
    return work


def evaluate(work: Path, lpips_ckpt: Path, num_eval: int) -> dict:
    import torch

    from src.data.shapes import ShapesDataset
    from src.models.lpips import load_lpips_checkpoint
    from src.models.vae import load_autoencoder

    vae = load_autoencoder(work / "model.safetensors").eval()
    lpips = load_lpips_checkpoint(lpips_ckpt)
    data = ShapesDataset(num_eval, vae.config.img_size, seed=987654)  # the training set uses seed 0
    l1, lp = [], []
    with torch.no_grad():
        for start in range(0, num_eval, 64):
            x = torch.stack([data[i]["image"] for i in range(start, min(num_eval, start + 64))])
            x_hat = vae(x, sample=False).reconstruction.clamp(-1, 1)
            l1.append((x - x_hat).abs().mean(dim=(1, 2, 3)))
            lp.append(lpips(x, x_hat).flatten())
    return {"l1": torch.cat(l1).mean().item(), "lpips": torch.cat(lp).mean().item()}


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lpips_ckpt = Path(args.lpips_checkpoint) if args.lpips_checkpoint else demo_lpips(out)
    rows = []
    for name in args.settings:
        scores = [evaluate(train(out, name, SETTINGS[name], seed, args, lpips_ckpt), lpips_ckpt, args.num_eval)
                  for seed in args.seeds]
        row = {"setting": name, **{k: sum(s[k] for s in scores) / len(scores) for k in ("l1", "lpips")}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n| stage-1 optimisers ({len(args.seeds)} seed(s)) | held-out L1 | held-out LPIPS |\n|---|---|---|")
    for row in rows:
        print(f"| {row['setting']} | {row['l1']:.4f} | {row['lpips']:.4f} |")


if __name__ == "__main__":
    main()
