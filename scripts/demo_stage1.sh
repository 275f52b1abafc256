#!/usr/bin/env bash
# Stage 1 alone, offline, on CPU: train the tiny quickstart VAE on the built-in `shapes` dataset (32 px,
# 4x8x8 latents, 2000 steps, about three minutes) with the same flags as the design document's command, then say
# where the reconstruction grids and the model file are. Knobs: PYTHON, DEMO_OUT (default outputs/demo_stage1).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT=${DEMO_OUT:-outputs/demo_stage1}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1

rm -rf "$OUT"
start=$(date +%s)
$PY stage1_vae_trainer.py \
  --experiment_name "VAETrainer" \
  --wandb_run_name "vae_shapes" \
  --working_directory "$OUT/work" \
  --training_config "configs/quickstart/stage1_vae_train.yaml" \
  --model_config "configs/quickstart/ldm.yaml" \
  --dataset shapes \
  --path_to_save_gens "$OUT/gens"
elapsed=$(( $(date +%s) - start ))

last_grid=$(ls "$OUT"/gens/*.png | sort | tail -n 1)
echo
echo "stage 1 finished in ${elapsed}s"
echo "reconstruction grids (originals on top, reconstructions below): $OUT/gens/"
echo "latest grid:  $last_grid"
echo "autoencoder:  $OUT/work/model.safetensors   (stage 2: --path_to_vae_backbone $OUT/work/model.safetensors)"
echo "metrics:      $OUT/work/metrics.jsonl"
