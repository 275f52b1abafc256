#!/usr/bin/env bash
# `make demo`: the whole latent diffusion pipeline, offline, on CPU, with the real stage scripts and the tiny
# configs in configs/quickstart/. Outputs land in outputs/quickstart/.
#
#   stage1_vae_trainer.py (shapes, 32 px -> 4x8x8 latents) -> evaluate_shapes.py --source reconstructions
#   -> compute_vae_scaling.py --update_config -> stage2_diffusion_trainer.py (text-conditional, MiniLM)
#   -> inference_ldm.py -> evaluate_shapes.py -> plot_metrics.py (outputs/quickstart/curves.png)
#
# Knobs (environment): QUICKSTART_OUT, QUICKSTART_CONFIGS (a folder with ldm.yaml, stage1_vae_train.yaml,
# stage2_diffusion_train.yaml, prompts.txt), QUICKSTART_SEED (the `seed:` of both training configs: the README's
# figures are the minimum and mean over seeds 0, 1 and 2), SAMPLER, SAMPLE_STEPS and GUIDANCE (inference and
# evaluation), EVAL_PROMPTS, and for a GPU, QUICKSTART_GPU=1 (bf16, and scripts/quickstart_gpu_configs.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT=${QUICKSTART_OUT:-outputs/quickstart}
CONFIGS=${QUICKSTART_CONFIGS:-configs/quickstart}
SEED=${QUICKSTART_SEED:-0}
EVAL_PROMPTS=${EVAL_PROMPTS:-64}
SAMPLER=${SAMPLER:-dpmpp_2m}  # DPM-Solver++(2M): DDIM-50's scores in 20 steps (README)
SAMPLE_STEPS=${SAMPLE_STEPS:-20}
STEPS=(--num_steps "$SAMPLE_STEPS")
[ "$SAMPLER" = ddpm ] && STEPS=()  # DDPM runs every training step; the sampling scripts refuse a step count
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

# The configs are copied: compute_vae_scaling.py --update_config writes the demo's own scaling constant into
# ldm.yaml, and QUICKSTART_SEED sets both training seeds.
cp "$CONFIGS/ldm.yaml" "$WORK/ldm.yaml"
for name in stage1_vae_train stage2_diffusion_train; do
  sed -e "s|^seed: [0-9]*|seed: $SEED|" "$CONFIGS/$name.yaml" > "$WORK/$name.yaml"
done
if [ -n "${QUICKSTART_GPU:-}" ]; then  # one GPU: bf16; stage 1 as on the CPU, stage 2's UNet in CUDA graphs
  export ACCELERATE_MIXED_PRECISION=bf16  # with its EMA every 10 steps (the script says why)
  bash scripts/quickstart_gpu_configs.sh "$WORK"
fi

stage "1. stage 1 (VAE)" $PY stage1_vae_trainer.py --experiment_name quickstart --wandb_run_name vae_shapes \
  --working_directory "$WORK/vae" --training_config "$WORK/stage1_vae_train.yaml" --model_config "$WORK/ldm.yaml" \
  --dataset shapes --path_to_save_gens "$OUT/vae_reconstructions"

# Where the shape would be lost (README, "Where the shape was lost"): what the evaluator reads back from the
# autoencoder's reconstructions of held-out drawings bounds what any diffusion model on it can reach.
stage "2. reconstructions" $PY evaluate_shapes.py --path_to_weights "$WORK/vae/model.safetensors" \
  --source reconstructions --num_prompts "$EVAL_PROMPTS" --exclude_prompts "$CONFIGS/prompts.txt" \
  --output "$OUT/vae_evaluation"

stage "3. scaling factor" $PY compute_vae_scaling.py --path_to_pretrained_weights "$WORK/vae/model.safetensors" \
  --model_config "$WORK/ldm.yaml" --dataset shapes --batch_size 64 --num_batches 8 --num_workers 0 --update_config

stage "4. stage 2 (diffusion)" $PY stage2_diffusion_trainer.py --experiment_name quickstart \
  --wandb_run_name diffusion_shapes --working_directory "$WORK/diffusion" \
  --training_config "$WORK/stage2_diffusion_train.yaml" --model_config "$WORK/ldm.yaml" \
  --path_to_vae_backbone "$WORK/vae/model.safetensors" --dataset shapes \
  --path_to_save_gens "$OUT/diffusion_samples" --cache_latents "$WORK/latent_cache" \
  --val_prompts "$CONFIGS/prompts.txt"

stage "5. inference" $PY inference_ldm.py --model_config "$WORK/ldm.yaml" \
  --path_to_weights "$WORK/diffusion/model.safetensors" --text_conditional --training_dataset shapes \
  --prompt "a red circle on a blue background" --prompt "a yellow triangle on a black background" \
  --prompt "a white square on a green background" --prompt "an orange circle on a purple background" \
  --num_images 4 --seed 0 --sampler "$SAMPLER" ${STEPS[@]+"${STEPS[@]}"} --guidance_scale "$GUIDANCE" \
  --output "$OUT/generations"

stage "6. prompt adherence" $PY evaluate_shapes.py --path_to_weights "$WORK/diffusion/model.safetensors" \
  --num_prompts "$EVAL_PROMPTS" --sampler "$SAMPLER" ${STEPS[@]+"${STEPS[@]}"} --guidance_scale "$GUIDANCE" \
  --exclude_prompts "$CONFIGS/prompts.txt" --output "$OUT/evaluation"

# The training curves of the runs above (stage 1, stage 2), one panel per metric family.
RUNS=()
for run in "$WORK/vae" "$WORK/diffusion"; do
  [ -f "$run/metrics.jsonl" ] && RUNS+=("$run/metrics.jsonl")
done
stage "7. training curves" $PY plot_metrics.py "${RUNS[@]}" --output "$OUT/curves.png" --exclude 'skipped_*' \
  --title "make demo: training curves (stage 1, stage 2)"

TOTAL=$(( $(date +%s) - TOTAL_START ))
printf '%-28s %5d s\n' "total" "$TOTAL" | tee -a "$TIMES"
echo
echo "Quickstart finished in ${TOTAL} s. Outputs:"
echo "  $OUT/vae_reconstructions/   stage-1 grids: originals above reconstructions"
echo "  $OUT/vae_evaluation/        results.json: what the evaluator reads back from the autoencoder's reconstructions"
echo "  $OUT/diffusion_samples/     stage-2 validation samples during training (EMA)"
echo "  $OUT/generations/           inference_ldm.py: grid.png and one PNG per image"
echo "  $OUT/evaluation/            results.json (prompt adherence) and grid.png"
echo "  $OUT/curves.png             training curves of the stage-1 and stage-2 runs"
echo "  $OUT/stage_times.txt        wall time of each stage"
echo "  $WORK/                      checkpoints, VAE and LDM model files, metrics.jsonl logs"
echo "Watch or replay the runs in TensorBoard: tensorboard --logdir $WORK"
