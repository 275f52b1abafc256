#!/usr/bin/env bash
# Export the quickstart's text-conditional model to diffusers and sample the same prompts and seed both ways:
# inference_ldm.py (ours) and StableDiffusionPipeline (examples/diffusers_sampling.py). Writes both grids and
# one picture with ours on the left and diffusers' on the right, and prints how far apart the two grids are.
#
#   bash scripts/export_demo.sh [MODEL] [OUT] [IMAGE]
#     MODEL  stage-2 model.safetensors      (default outputs/quickstart/work/diffusion/model.safetensors)
#     OUT    working folder                 (default outputs/export_demo: diffusers/, ours/, theirs/)
#     IMAGE  the side-by-side picture       (default docs/images/diffusers_export_grid.png)
# Knobs (environment): SAMPLE_STEPS (50), GUIDANCE (2.0), NUM_IMAGES (4), SEED (0).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
MODEL=${1:-outputs/quickstart/work/diffusion/model.safetensors}
OUT=${2:-outputs/export_demo}
IMAGE=${3:-docs/images/diffusers_export_grid.png}
SAMPLE_STEPS=${SAMPLE_STEPS:-50}
GUIDANCE=${GUIDANCE:-2.0}
NUM_IMAGES=${NUM_IMAGES:-4}
SEED=${SEED:-0}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
PROMPTS=(--prompt "a red circle on a blue background" --prompt "a yellow triangle on a black background"
         --prompt "a white square on a green background" --prompt "an orange circle on a purple background")
SAMPLING=(--num_images "$NUM_IMAGES" --seed "$SEED" --num_steps "$SAMPLE_STEPS" --guidance_scale "$GUIDANCE")

echo "=== export ==="
$PY export_diffusers.py --path_to_weights "$MODEL" --output "$OUT/diffusers" --overwrite
echo "=== ours: inference_ldm.py ==="
$PY inference_ldm.py --path_to_weights "$MODEL" --text_conditional "${PROMPTS[@]}" "${SAMPLING[@]}" \
  --output "$OUT/ours"
echo "=== diffusers: StableDiffusionPipeline ==="
$PY examples/diffusers_sampling.py --model "$OUT/diffusers" "${PROMPTS[@]}" "${SAMPLING[@]}" --output "$OUT/theirs"

$PY - "$OUT/ours/grid.png" "$OUT/theirs/grid.png" "$IMAGE" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ours, theirs = (np.asarray(Image.open(p).convert("RGB")).astype(int) for p in sys.argv[1:3])
gap = 16
both = np.full((ours.shape[0], ours.shape[1] * 2 + gap, 3), 255, dtype=np.uint8)
both[:, : ours.shape[1]] = ours
both[:, ours.shape[1] + gap:] = theirs
Path(sys.argv[3]).parent.mkdir(parents=True, exist_ok=True)
Image.fromarray(both).save(sys.argv[3])
diff = np.abs(ours - theirs)
print(f"ours vs diffusers, 8-bit pixel values: max |diff| {diff.max()} of 255; {(diff > 0).sum()} of {diff.size} "
      f"values differ ({(diff > 0).mean() * 100:.3f} %), {(diff > 1).sum()} by more than 1")
print(f"wrote {sys.argv[3]} (left: inference_ldm.py, right: diffusers)")
EOF
