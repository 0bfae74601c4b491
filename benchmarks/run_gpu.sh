#!/usr/bin/env bash
# Issue 7's measurements in ONE bounded run on a GPU machine (the device tool's H100/H200).
#
#   bash benchmarks/run_gpu.sh            # writes $OUT/train_step.jsonl and $OUT/run_gpu.log
#
# In order of need (what comes last is what a spent budget skips):
# 1. zkd_jax's real train step (benchmarks/train_step.py), resnet32x4 -> resnet8x4, KD+LS, one JSON
#    line per row of the issue: fp32 b64, then fp32 b64 again with the yardstick (issue 18: the
#    plain Flax/optax step of benchmarks/yardstick.py timed in the same run: ratio_to_yardstick)
#    and a jax.profiler trace of 5 steps in $OUT/profile_fp32_b64, mixed b64, mixed b512, and the
#    yardstick at mixed b64.
# 2. The PyTorch baseline (torch_kd_step.py: eager fp32, bf16 + channels_last, torch.compile; b64
#    and b512) when the script and a CUDA torch are there; otherwise one "skipped" line.
# 3. K = 4 students (mixed b64; compare with the mixed b64 row) in the forms of
#    zkd_jax.step.multi: "loop", "vmap_matmul", and later "vmap" (issue 7 measured a naive vmap).
# 4. Measured epochs of the real trainer (benchmarks/epoch_time.py: zkd-train with the on-device
#    input path on synthetic CIFAR-100-shaped data, evaluation and checkpoints included), fp32 b64
#    (before the vmap row), mixed b64, and last mixed b64 with 8 steps per call
#    (zkd_jax.step.scan), projected to 240 epochs.
#
# Bounded: the whole script ends within BUDGET_S seconds (default 540, for a 600 s device call):
# every command runs under `timeout` min(its own limit, time left), and an item with under 20 s left
# is skipped with a JSON line saying so. Environment: PYTHON (default python3), OUT (default
# /tmp/zkd_bench), BUDGET_S, ROW_TIMEOUT_S (default 90), K4_TIMEOUT_S (default 120: K = 4 compiles
# four students), TORCH_TIMEOUT_S (default 120), EPOCH_TIMEOUT_S (default 150),
# BENCH_CONFIG / BENCH_EXTRA / EPOCH_EXTRA (another pair; extra flags of train_step.py and of
# epoch_time.py, e.g. for a CPU smoke test),
# TORCH_BENCH (path of torch_kd_step.py; default benchmarks/torch_kd_step.py, then
# ../shared/bench/torch_kd_step.py; ../shared does not travel to the device machine: copy it into
# benchmarks/ first). ml_collections is not in the device image: put its wheel in .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-/tmp/zkd_bench}
BUDGET_S=${BUDGET_S:-540}
ROW_TIMEOUT_S=${ROW_TIMEOUT_S:-90}
K4_TIMEOUT_S=${K4_TIMEOUT_S:-120}
TORCH_TIMEOUT_S=${TORCH_TIMEOUT_S:-120}
EPOCH_TIMEOUT_S=${EPOCH_TIMEOUT_S:-150}
BENCH_EXTRA=${BENCH_EXTRA:-}
EPOCH_EXTRA=${EPOCH_EXTRA:-}
mkdir -p "$OUT_DIR"
RESULTS="$OUT_DIR/train_step.jsonl"
LOG="$OUT_DIR/run_gpu.log"
: >"$RESULTS"
export PYTHONUNBUFFERED=1

if ! "$PY" -c "import ml_collections" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/zkd_site .whl/*.whl \
      && export PYTHONPATH=/tmp/zkd_site
  fi
  if ! PYTHONPATH=${PYTHONPATH:-} "$PY" -c "import ml_collections" 2>/dev/null; then
    echo '{"error": "ml_collections missing: put ml_collections-1.1.0-py3-none-any.whl in .whl/ and carry .whl"}' | tee -a "$RESULTS"
    exit 2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/zkd_jax_cache}
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
  "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1
} | tee -a "$LOG"

CONFIG=${BENCH_CONFIG:-configs/cifar100.py:kd_ls,resnet32x4,resnet8x4}
limit() {  # limit SECONDS: min(SECONDS, time left); prints 0 when under 20 s are left
  local left=$(( BUDGET_S - SECONDS ))
  if (( left < 20 )); then echo 0; elif (( left < $1 )); then echo "$left"; else echo "$1"; fi
}
row() {  # row TAG ARGS...: one train_step.py line (+ BENCH_EXTRA), or a JSON line saying why not
  # shellcheck disable=SC2086
  run_script "$ROW_TIMEOUT_S" benchmarks/train_step.py "$@" $BENCH_EXTRA
}
epoch_row() {  # epoch_row TAG ARGS...: one epoch_time.py line (+ EPOCH_EXTRA)
  # shellcheck disable=SC2086
  run_script "$EPOCH_TIMEOUT_S" benchmarks/epoch_time.py "$@" $EPOCH_EXTRA
}
run_script() {  # run_script TIMEOUT SCRIPT TAG ARGS...: its last stdout line if JSON, else an error
  local timeout_s=$1 script=$2 tag=$3; shift 3
  local t; t=$(limit "$timeout_s")
  if (( t == 0 )); then
    echo "{\"tag\": \"$tag\", \"skipped\": \"time budget of ${BUDGET_S}s spent\"}" | tee -a "$RESULTS"
    return
  fi
  echo "== $tag: $script $* (timeout ${t}s)" | tee -a "$LOG"
  local line
  # shellcheck disable=SC2086
  line=$(timeout "$t" "$PY" "$script" --config="$CONFIG" --tag="$tag" \
         "$@" 2>>"$LOG" | tail -n 1)
  local rc=$?
  if [[ $rc -eq 0 && $line == "{"* ]]; then
    echo "$line" | tee -a "$RESULTS"
  else
    echo "{\"tag\": \"$tag\", \"error\": \"exit $rc (see run_gpu.log)\"}" | tee -a "$RESULTS"
  fi
}

row fp32_b64 --batch=64
row yardstick_fp32_b64 --batch=64 --noepoch_projection --yardstick \
    --profile="$OUT_DIR/profile_fp32_b64" --profile_steps=5
row mixed_b64 --batch=64 --mixed_precision
row mixed_b512 --batch=512 --mixed_precision
row yardstick_mixed_b64 --batch=64 --mixed_precision --noepoch_projection --yardstick

TORCH_BENCH=${TORCH_BENCH:-}
for candidate in "$TORCH_BENCH" benchmarks/torch_kd_step.py ../shared/bench/torch_kd_step.py; do
  if [[ -n $candidate && -f $candidate ]]; then TORCH_BENCH=$candidate; break; fi
done
if [[ -z $TORCH_BENCH || ! -f $TORCH_BENCH ]]; then
  echo '{"impl": "torch", "skipped": "torch_kd_step.py not found"}' | tee -a "$RESULTS"
elif ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>>"$LOG"; then
  echo '{"impl": "torch", "skipped": "torch with CUDA not importable"}' | tee -a "$RESULTS"
else
  for mode in eager_fp32 bf16_cl compile_bf16; do
    t=$(limit "$TORCH_TIMEOUT_S")
    if (( t == 0 )); then
      echo "{\"impl\": \"torch\", \"mode\": \"$mode\", \"skipped\": \"time budget spent\"}" | tee -a "$RESULTS"
      continue
    fi
    echo "== torch $mode (timeout ${t}s)" | tee -a "$LOG"
    timeout "$t" "$PY" "$TORCH_BENCH" "$mode" 64,512 2>>"$LOG" | tee -a "$RESULTS" \
      || echo "{\"impl\": \"torch\", \"mode\": \"$mode\", \"error\": \"timed out or failed\"}" | tee -a "$RESULTS"
  done
fi
k4() {  # k4 FORM: K = 4 students at mixed b64 (compare images_per_sec with the mixed_b64 row)
  # shellcheck disable=SC2086
  run_script "$K4_TIMEOUT_S" benchmarks/train_step.py "k4_${1}_mixed_b64" --batch=64 \
      --mixed_precision --students=4 --students_form="$1" --noepoch_projection $BENCH_EXTRA
}
k4 loop
k4 vmap_matmul
epoch_row epoch_fp32_b64 --batch=64
k4 vmap
epoch_row epoch_mixed_b64 --batch=64 --mixed_precision
epoch_row epoch_mixed_b64_scan8 --batch=64 --mixed_precision --config.steps_per_call=8
echo "done in ${SECONDS}s; results in $RESULTS" | tee -a "$LOG"
