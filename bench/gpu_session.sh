#!/usr/bin/env bash
# Issue 10's GPU measurements in one session of at most ~6 minutes; phases and what each measures:
# bench/gpu_session.py. On the lent machine, from the repository root, with .device/ carried:
#
#     source .device/setup.sh && bash bench/gpu_session.sh        # results in $OUT (4 files)
#
# $OUT/table.txt       the compact table (also printed at the end)
# $OUT/results.json    every measurement as JSON; results.jsonl the same, appended as they were taken
# $OUT/log.txt         everything the phases printed
#
# Each phase runs in its own process under `timeout`, within its share of the budget, so a crash or a slow
# compile costs that phase only; the compiled UNet may not eat the time kept for the eager stage-1 and trainer
# phases after it. Environment: BUDGET_S (seconds for the phases, default 330), PHASES (a subset, in order),
# CAP_<phase> (seconds one phase may take), RESERVE_<phase> (seconds it leaves for the phases after it),
# UNET_KEYS (workloads of unet_eager, in order: "b64 b16 64px"), ATTENTION_OPTIONS (0: skip those rows),
# INDUCTOR_OPTIONS ("key=value;key=value": torch._inductor.config for the compiled UNet rows, named in their label),
# COMPILED_RUNS (unet_compiled_static's "workload:mode" list), TRAINER_BATCHES ("64 16"), TRAINER_MODES
# (trainer_compiled's compile modes: "reduce-overhead"), PREVIOUS (an earlier session's results.jsonl, taken on a GPU
# of the same name: its measured rows are kept and not measured again; the report merges both). CPU dry run of every
# code path:
#     TINY=1 OUT=/tmp/dry PYTHON=.venv/bin/python bash bench/gpu_session.sh
set -u
cd "$(dirname "$0")/.."
start=$(date +%s)
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${BUDGET_S:-330}
PHASES=${PHASES:-"unet_eager unet_compiled_static stage1_eager trainer_eager unet_compiled stage1_compiled trainer_compiled"}
declare -A CAP=([unet_eager]=150 [stage1_eager]=40 [trainer_eager]=72)
declare -A RESERVE=([unet_compiled_static]=110)  # seconds kept for the phases after it (stage1_eager, trainer_eager)
EXTRA=()
if [ -n "${TINY:-}" ]; then
  EXTRA=(--tiny --device "${DEVICE:-cpu}" --compile_backend "${BACKEND:-aot_eager}")
fi
export LDM_PROGRESS_INTERVAL=1000000 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
  TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
export GPU_SESSION_WORK=${GPU_SESSION_WORK:-/tmp/gpu_session_work}  # caches, VAE files: never under $OUT
if [ -n "${PREVIOUS:-}" ]; then  # resume an earlier session: what it measured is kept, not measured again
  same=$("$PY" - "$PREVIOUS" <<'PY'
import json, sys, torch
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
before = {r.get("name") for r in rows if r.get("section") == "env" and r.get("name")}
now = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
print("yes" if now is not None and before == {now} else f"no: {sorted(before)} measured, this is {now}")
PY
)
  if [ "$same" = "yes" ]; then
    cat "$PREVIOUS" >> "$OUT/results.jsonl"
  else
    echo "PREVIOUS=$PREVIOUS not resumed ($same): every row is measured again" | tee -a "$OUT/log.txt"
  fi
fi
deadline=$((start + BUDGET))
{ echo "gpu_session: $(date -u), budget ${BUDGET} s, phases: $PHASES"; nvidia-smi -L 2>/dev/null; } | tee -a "$OUT/log.txt"

for phase in $PHASES; do
  now=$(date +%s)
  left=$((deadline - now))
  if [ "$left" -lt 15 ]; then
    echo "== $phase: skipped ($left s left)" | tee -a "$OUT/log.txt"
    echo "{\"phase\": \"$phase\", \"section\": \"phase\", \"skipped\": \"$left s of the budget left\"}" >> "$OUT/results.jsonl"
    continue
  fi
  var="CAP_$phase"
  cap=${!var:-${CAP[$phase]:-$left}}
  reserve="RESERVE_$phase"
  room=$((left - ${!reserve:-${RESERVE[$phase]:-0}}))
  [ "$cap" -gt "$room" ] && cap=$room
  [ "$cap" -lt 15 ] && cap=15
  echo "== $phase: up to $cap s ($left s left)" | tee -a "$OUT/log.txt"
  timeout -k 5 "$cap" "$PY" bench/gpu_session.py --phase "$phase" --out "$OUT" --deadline $((now + cap - 2)) \
    "${EXTRA[@]}" >> "$OUT/log.txt" 2>&1
  rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "== $phase: exited with status $rc after $(($(date +%s) - now)) s (124: out of time)" | tee -a "$OUT/log.txt"
    echo "{\"phase\": \"$phase\", \"section\": \"phase\", \"error\": \"exit status $rc after $(($(date +%s) - now)) s\"}" >> "$OUT/results.jsonl"
  fi
done
"$PY" bench/gpu_report.py "$OUT" 2>&1 | tee -a "$OUT/log.txt"
echo "gpu_session: $(($(date +%s) - start)) s in all" | tee -a "$OUT/log.txt"
