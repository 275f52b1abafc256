#!/usr/bin/env bash
# `make demo`: the whole pipeline, offline, on CPU, with the real stage scripts and the tiny configs in
# configs/quickstart/. Outputs land in outputs/quickstart/.
#
#   BAPPS-format set -> lpips_trainer.py -> stage1_vae_trainer.py (shapes, with that LPIPS)
#   -> compute_vae_scaling.py --update_config -> stage2_diffusion_trainer.py (text-conditional, MiniLM)
#   -> inference_ldm.py -> evaluate_shapes.py -> plot_metrics.py (outputs/quickstart/curves.png)
#
# Knobs (environment) for a smaller run, as the test does: QUICKSTART_OUT, QUICKSTART_CONFIGS (a folder with
# ldm.yaml, stage1_vae_train.yaml, stage2_diffusion_train.yaml, prompts.txt), BAPPS_NUM_TRAIN, BAPPS_NUM_VAL,
# LPIPS_EPOCHS, SAMPLE_STEPS (DDIM steps of inference and evaluation), EVAL_PROMPTS.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT=${QUICKSTART_OUT:-outputs/quickstart}
CONFIGS=${QUICKSTART_CONFIGS:-configs/quickstart}
BAPPS_NUM_TRAIN=${BAPPS_NUM_TRAIN:-200}
BAPPS_NUM_VAL=${BAPPS_NUM_VAL:-50}
LPIPS_EPOCHS=${LPIPS_EPOCHS:-2}
EVAL_PROMPTS=${EVAL_PROMPTS:-64}
SAMPLE_STEPS=${SAMPLE_STEPS:-50}
GUIDANCE=${GUIDANCE:-2.0}  # classifier-free guidance for inference and evaluation (measured best for this model)
WORK="$OUT/work"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1

rm -rf "$OUT"
mkdir -p "$WORK"
TIMES="$OUT/stage_times.txt"
: > "$TIMES"
TOTAL_START=$(date +%s)

stage() {  # stage <name> <command...>: run it, print and record its wall time
  local name=$1; shift
  echo
  echo "=== $name ==="
  local start=$(date +%s)
  "$@"
  local secs=$(( $(date +%s) - start ))
  printf '%-28s %5d s\n' "$name" "$secs" | tee -a "$TIMES"
}

# The model config is copied: compute_vae_scaling.py --update_config writes the demo's own scaling constant.
cp "$CONFIGS/ldm.yaml" "$WORK/ldm.yaml"
# Stage 1 uses the LPIPS checkpoint this run trains.
sed -e "s|^use_lpips: .*|use_lpips: True|" -e "s|^lpips_checkpoint: .*|lpips_checkpoint: $WORK/lpips/lpips_quickstart.pt|" \
  "$CONFIGS/stage1_vae_train.yaml" > "$WORK/stage1_vae_train.yaml"

stage "1. BAPPS-format data" $PY -m src.data.bapps_synth --out "$WORK/bapps" \
  --num_train "$BAPPS_NUM_TRAIN" --num_val "$BAPPS_NUM_VAL" --patch_size 32 --seed 0

stage "2. LPIPS" $PY lpips_trainer.py --path_to_root "$WORK/bapps" --work_dir "$WORK/lpips" \
  --checkpoint_name lpips_quickstart.pt --img_size 32 --batch_size 25 --num_workers 0 \
  --num_epochs "$LPIPS_EPOCHS" --decay_epochs 1 --logging_steps 50 --use_dropout --initial_lr 1e-3 \
  --img_range minus_one_to_one --middle_channels 32

stage "3. stage 1 (VAE)" $PY stage1_vae_trainer.py --experiment_name quickstart --wandb_run_name vae_shapes \
  --working_directory "$WORK/vae" --training_config "$WORK/stage1_vae_train.yaml" --model_config "$WORK/ldm.yaml" \
  --dataset shapes --path_to_save_gens "$OUT/vae_reconstructions"

stage "4. scaling factor" $PY compute_vae_scaling.py --path_to_pretrained_weights "$WORK/vae/model.safetensors" \
  --model_config "$WORK/ldm.yaml" --dataset shapes --batch_size 64 --num_batches 8 --num_workers 0 --update_config

stage "5. stage 2 (diffusion)" $PY stage2_diffusion_trainer.py --experiment_name quickstart \
  --wandb_run_name diffusion_shapes --working_directory "$WORK/diffusion" \
  --training_config "$CONFIGS/stage2_diffusion_train.yaml" --model_config "$WORK/ldm.yaml" \
  --path_to_vae_backbone "$WORK/vae/model.safetensors" --dataset shapes \
  --path_to_save_gens "$OUT/diffusion_samples" --cache_latents "$WORK/latent_cache" \
  --val_prompts "$CONFIGS/prompts.txt"

stage "6. inference" $PY inference_ldm.py --model_config "$WORK/ldm.yaml" \
  --path_to_weights "$WORK/diffusion/model.safetensors" --text_conditional --training_dataset shapes \
  --prompt "a red circle on a blue background" --prompt "a yellow triangle on a black background" \
  --prompt "a white square on a green background" --prompt "an orange circle on a purple background" \
  --num_images 4 --seed 0 --num_steps "$SAMPLE_STEPS" --guidance_scale "$GUIDANCE" --output "$OUT/generations"

stage "7. prompt adherence" $PY evaluate_shapes.py --path_to_weights "$WORK/diffusion/model.safetensors" \
  --num_prompts "$EVAL_PROMPTS" --num_steps "$SAMPLE_STEPS" --guidance_scale "$GUIDANCE" --exclude_prompts "$CONFIGS/prompts.txt" --output "$OUT/evaluation"

# The training curves of the runs above (LPIPS, stage 1, stage 2), one panel per metric family.
RUNS=()
for run in "$WORK/lpips" "$WORK/vae" "$WORK/diffusion"; do
  [ -f "$run/metrics.jsonl" ] && RUNS+=("$run/metrics.jsonl")
done
stage "8. training curves" $PY plot_metrics.py "${RUNS[@]}" --output "$OUT/curves.png" --exclude 'skipped_*' \
  --title "make demo: training curves (LPIPS, stage 1, stage 2)"

TOTAL=$(( $(date +%s) - TOTAL_START ))
printf '%-28s %5d s\n' "total" "$TOTAL" | tee -a "$TIMES"
echo
echo "Quickstart finished in ${TOTAL} s. Outputs:"
echo "  $OUT/vae_reconstructions/   stage-1 grids: originals above reconstructions"
echo "  $OUT/diffusion_samples/     stage-2 validation samples during training (EMA, DDIM)"
echo "  $OUT/generations/           inference_ldm.py: grid.png and one PNG per image"
echo "  $OUT/evaluation/            results.json (prompt adherence) and grid.png"
echo "  $OUT/curves.png            training curves of the LPIPS, stage-1 and stage-2 runs"
echo "  $OUT/stage_times.txt        wall time of each stage"
echo "  $WORK/                      checkpoints, LPIPS, VAE and LDM model files, metrics.jsonl logs"
echo "Watch or replay the runs in TensorBoard: tensorboard --logdir $WORK"
