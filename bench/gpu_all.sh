#!/usr/bin/env bash
# Everything the README's GPU figures need, in one or two calls on a lent GPU, from the repository root:
#   part 1 (PART=1, ~9 minutes): bench/gpu_session.sh, the "Speed on a GPU" table: the eager UNet rows (with the
#          fp32-norm ablation), the eager stage-1 step, then the compiled UNet (static shapes, one compile per
#          workload: ~170 s each on the H200, over 190 s at 64x64, so it gets the rest of the call). An H200
#          resumes what the second session of 2026-11-27 measured, and measures what it lacks.
#   part 2 (PART=2, ~5 minutes): `make demo` on the GPU (bf16, the stage-2 UNet compiled with CUDA graphs; eager bf16
#          if that fails early), with time to finish and read its scores, then (FID=1) bench_fid_sampling.py.
#   part 3 (PART=3, ~5 minutes): compiled rows as parallel jobs (JOBS, default below: what is still to measure),
#          each its own bench/gpu_session.sh under `nice`: their compiles overlap on the host's cores, their timings
#          take turns on the GPU (bench/gpu_lock.py); all at once on an H200, two at a time on a GPU of under
#          120 GB (an H100: the default jobs need ~100 GiB together; PARALLEL=n overrides). bench_update.py first,
#          alone. In the third H200 session (2026-11-27) four jobs (64x64 UNet, both trainers, stage 1) took 294 s.
#          A job's first, compiling step runs outside the lock and can overlap another job's timing: rerun alone
#          (JOBS="name:...") any row that looks off. Compile variants are A/B'd the same way, e.g.
#          JOBS="base:PHASES=unet_compiled_static,COMPILED_RUNS=b64:default,RESERVE_unet_compiled_static=0
#          cdt:PHASES=unet_compiled_static,COMPILED_RUNS=b64:default,RESERVE_unet_compiled_static=0,INDUCTOR_OPTIONS=coordinate_descent_tuning=1"
#   PART=all (default): parts 1 and 2, with part 1 shortened to fit one 10-minute call.
# Needs .device/ from ../shared/device/prepare.sh (the packages the GPU image lacks); writes at most 8 files to $OUT:
# env.txt (with bench_update.py's rows), table.txt, results.json, results.jsonl, log.txt, demo.txt, demo_gpu_tail.txt,
# fid_sampling.txt.
#   device tool: run(command="PART=1 bash bench/gpu_all.sh", carry=[".device"], timeout_s=590), then PART=2
set -u
T0=$(date +%s)
PART=${PART:-all}
LIMIT=${LIMIT:-575}  # seconds this call may take
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
source .device/setup.sh || { echo "setup failed"; exit 1; }
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$OUT/env.txt" 2>&1
# the update around the step at the design size (gradient norm, clipping, fused AdamW, EMA): ~20 s, into env.txt
update_rows() { timeout -k 5 60 python3 bench/bench_update.py --device cuda --steps 10 >> "$OUT/env.txt" 2>&1; }

if [ "$PART" = 1 ] || [ "$PART" = all ]; then
  update_rows
  budget=$(( $(left) - 20 )); [ "$PART" = all ] && budget=255
  # Resumes the rows the second H200 session measured with this code (bench/results/h200_2026-11-27_session2.jsonl:
  # b64 eager, b64 and b16 compiled, stage 1 eager); after a change to the models, pass PREVIOUS= (empty) or a file
  # of its env and flops rows only (FLOP counts don't change with kernels). Attention options are not measured again.
  PREVIOUS=${PREVIOUS-bench/results/h200_2026-11-27_session2.jsonl} BUDGET_S=$budget \
    ATTENTION_OPTIONS=${ATTENTION_OPTIONS:-0} CAP_unet_eager=${CAP_unet_eager:-170} \
    PHASES=${PHASES:-"unet_eager stage1_eager unet_compiled_static"} CAP_stage1_eager=${CAP_stage1_eager:-70} \
    RESERVE_unet_compiled_static=${RESERVE_unet_compiled_static:-0} \
    OUT="$OUT" bash bench/gpu_session.sh > /dev/null 2>&1
  echo "gpu_session done at $(( $(date +%s) - T0 )) s" | tee -a "$OUT/env.txt"
fi

if [ "$PART" = 3 ]; then
  update_rows
  export BENCH_GPU_LOCK=/tmp/bench_gpu.lock
  # one inductor cache for every job and call: a rerun on the still-warm machine loads its compiled graphs (the
  # 64x64 step: 222 s cold, 27 s warm on the H200), the trainer's too (its compile_cache key yields to this)
  export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/bench_inductor_cache}
  # name:VAR=value,VAR=value (the gpu_session.sh settings of one job)
  # default: what the third H200 session left: the trainers again, with the EMA that no longer reads back its weight
  # and moves every 10 steps (the GPU config's ema_update_every), b16 against every step (TRAINER_SET, an A/B), and
  # the b64 row alone. Roughly 100 GiB of GPU memory together: an H200's, not an H100's (PARALLEL below). The third
  # session's other jobs were unet64 (COMPILED_RUNS=64px:default) and stage1 (PHASES=stage1_compiled); the inductor
  # A/B above (cdt) is left for a call of its own.
  JOBS=${JOBS:-"trainer64:PHASES=trainer_compiled,TRAINER_BATCHES=64,TRAINER_MODES=default
trainer16:PHASES=trainer_compiled,TRAINER_BATCHES=16,TRAINER_MODES=reduce-overhead
trainer16ema1:PHASES=trainer_compiled,TRAINER_BATCHES=16,TRAINER_MODES=reduce-overhead,TRAINER_SET=ema_update_every=1
b64:PHASES=unet_compiled_static,COMPILED_RUNS=b64:default,RESERVE_unet_compiled_static=0"}
  # jobs at once (PARALLEL): every job where the GPU holds what the default jobs need together (~100 GiB, an H200),
  # two at a time on a smaller one (an H100's 80 GiB) or where nvidia-smi gives no size; a job started later gets
  # the time then left
  mem_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1 | tr -dc 0-9)
  PARALLEL=${PARALLEL:-$([ "${mem_mib:-0}" -ge 120000 ] && echo 99 || echo 2)}
  [ "$PARALLEL" -ge 1 ] 2>/dev/null || PARALLEL=1  # 0 or text would wait for a free slot forever
  echo "PART=3: GPU memory ${mem_mib:-unknown} MiB, up to $PARALLEL job(s) at once" | tee -a "$OUT/env.txt"
  for job in $JOBS; do
    while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do wait -n; done
    name=${job%%:*}
    IFS=, read -r -a settings <<< "${job#*:}"
    rm -rf "/tmp/job_$name"  # a warm machine keeps an earlier call's rows, which gpu_session.sh would resume
    budget=$(( $(left) - 25 ))
    env "${settings[@]}" OUT="/tmp/job_$name" GPU_SESSION_WORK="/tmp/work_$name" BUDGET_S=$budget \
      nice -n 10 bash bench/gpu_session.sh > /dev/null 2>&1 &
  done
  wait
  for job in $JOBS; do
    name=${job%%:*}
    sed "s/^{/{\"job\": \"$name\", /" "/tmp/job_$name/results.jsonl" >> "$OUT/results.jsonl" 2>/dev/null  # rows name their job
    { echo "==== job $name"; cat "/tmp/job_$name/log.txt"; } >> "$OUT/log.txt" 2>/dev/null
  done
  python3 bench/gpu_report.py "$OUT" >> "$OUT/log.txt" 2>&1
  echo "jobs done at $(( $(date +%s) - T0 )) s" | tee -a "$OUT/env.txt"
fi

if [ "$PART" = 2 ] || [ "$PART" = all ]; then
  export LDM_PROGRESS_INTERVAL=1000000
  run_demo() {  # run_demo <out> <cap seconds> [env...]
    local out=$1 cap=$2; shift 2
    env "$@" QUICKSTART_OUT="$out" PYTHON=python3 timeout -k 5 "$cap" bash scripts/quickstart.sh > "$out.log" 2>&1
    local rc=$?
    { echo "== demo $out rc=$rc $*"; cat "$out/stage_times.txt" 2>/dev/null; grep -A6 "Prompt adherence" "$out.log"; } >> "$OUT/demo.txt"
    grep -q "prompt adherence" "$out/stage_times.txt" 2>/dev/null  # the curves stage needs matplotlib, absent here
  }
  cap=$(( $(left) - 40 )); [ "${FID:-}" = 1 ] && cap=$(( cap - 30 ))
  run_demo /tmp/demo_gpu "$cap" QUICKSTART_GPU=1
  if [ $? -ne 0 ] && [ "$(left)" -gt 200 ]; then
    run_demo /tmp/demo_gpu_eager $(( $(left) - 45 )) ACCELERATE_MIXED_PRECISION=bf16
  fi
  tail -c 3000 /tmp/demo_gpu.log > "$OUT/demo_gpu_tail.txt" 2>/dev/null
  echo "demo done at $(( $(date +%s) - T0 )) s" | tee -a "$OUT/env.txt"
  # sampling time at the design size (README "Evaluating a model"; measured on the H200 on 2026-11-27)
  cap=$(( $(left) - 5 ))
  if [ "${FID:-}" = 1 ] && [ "$cap" -gt 20 ]; then
    timeout -k 5 "$cap" python3 bench/bench_fid_sampling.py --device cuda --dtype bfloat16 --batch 50 \
      --samplers ddim:50 dpmpp_2m:20 > "$OUT/fid_sampling.txt" 2>&1
  fi
fi
echo "all done at $(( $(date +%s) - T0 )) s" | tee -a "$OUT/env.txt"
