#!/usr/bin/env bash
# Everything the README's GPU figures need, in one ten-minute call on a lent GPU, from the repository root:
#   1. bench/gpu_session.sh (the "Speed on a GPU" table; BUDGET_S of it), 2. `make demo` on the GPU (bf16, the
#   stage-2 UNet compiled with CUDA graphs; eager bf16 if that fails early), 3. bench_fid_sampling.py at the design
#   size ("Evaluating a model", "How long").
# Needs .device/ from ../shared/device/prepare.sh (the packages the GPU image lacks); writes at most 8 files to $OUT:
# env.txt, table.txt, results.json, results.jsonl, log.txt, demo.txt, demo_gpu_tail.txt, fid_sampling.txt.
#   device tool: run(command="bash bench/gpu_all.sh", carry=[".device"], timeout_s=590)
set -u
T0=$(date +%s)
left() { echo $(( 575 - ($(date +%s) - T0) )); }
source .device/setup.sh || { echo "setup failed"; exit 1; }
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$OUT/env.txt" 2>&1

# 1. issue 10 (results: table.txt, results.json, results.jsonl, log.txt)
BUDGET_S=${BUDGET_S:-275} OUT="$OUT" bash bench/gpu_session.sh > /dev/null 2>&1
echo "gpu_session done at $(( $(date +%s) - T0 )) s" | tee -a "$OUT/env.txt"

# 2. make demo on the GPU: bf16 + compiled stage-2 UNet (CUDA graphs); without compile if that fails early
export LDM_PROGRESS_INTERVAL=1000000
run_demo() {  # run_demo <out> <cap seconds> [env...]
  local out=$1 cap=$2; shift 2
  env "$@" QUICKSTART_OUT="$out" PYTHON=python3 timeout -k 5 "$cap" bash scripts/quickstart.sh > "$out.log" 2>&1
  local rc=$?
  { echo "== demo $out rc=$rc $*"; cat "$out/stage_times.txt" 2>/dev/null; grep -A6 "Prompt adherence" "$out.log"; } >> "$OUT/demo.txt"
  grep -q "prompt adherence" "$out/stage_times.txt" 2>/dev/null  # the curves stage needs matplotlib, absent here
}
cap=$(( $(left) - 60 )); [ "$cap" -gt 200 ] && cap=200
run_demo /tmp/demo_gpu "$cap" QUICKSTART_GPU=1
if [ $? -ne 0 ] && [ "$(left)" -gt 150 ]; then
  run_demo /tmp/demo_gpu_eager $(( $(left) - 45 )) ACCELERATE_MIXED_PRECISION=bf16
fi
tail -c 3000 /tmp/demo_gpu.log > "$OUT/demo_gpu_tail.txt" 2>/dev/null
echo "demo done at $(( $(date +%s) - T0 )) s" | tee -a "$OUT/env.txt"

# 3. issue 13: sampling time at the design size
cap=$(( $(left) - 5 ))
if [ "$cap" -gt 20 ]; then
  timeout -k 5 "$cap" python3 bench/bench_fid_sampling.py --device cuda --dtype bfloat16 --batch 50 \
    --samplers ddim:50 dpmpp_2m:20 > "$OUT/fid_sampling.txt" 2>&1
fi
echo "all done at $(( $(date +%s) - T0 )) s" | tee -a "$OUT/env.txt"
