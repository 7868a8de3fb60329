#!/usr/bin/env bash
# Issue 20's and 25's GPU measurements on one H100/H200 in one call of at most 7 minutes, each step under its own limit
# (one failure or OOM keeps the rest), a table of every result line last; full output in LOGDIR/gpu_check.log:
# - varlen-check: varlen attention against sdpa on the same packed rows and weights (Gemma 3 1B): both losses, the
#   attention gradients' difference, PASS/FAIL (bench/train_throughput.py --check-varlen);
# - training throughput (bench/train_throughput.py): 1B full and 1B LoRA-128, upstream style against ours with
#   varlen and with sdpa (1B full also varlen at 32 rows per device, and the benchmark's layout, data.packing=false,
#   beside packed varlen); 4B full, varlen against sdpa;
# - QA evaluation speed (bench/eval_speed.py).
#
#     bash bench/gpu_check.sh [LOGDIR]          # SMOKE=1 runs the same on the tiny model (CPU, about two minutes)
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LOG=${1:-${OUT:-/tmp}}/gpu_check.log
mkdir -p "$(dirname "$LOG")"
PY=${PYTHON:-python3}
M1=gemma3_1b M4=gemma3_4b STEPS="--warmup 2 --steps 5" SEQ=1024 B1=16 B4=8 BIG=32 EQ=2048 EHQ=64
[ "${SMOKE:-0}" = 1 ] && M1=tiny M4=tiny STEPS="--warmup 1 --steps 1" SEQ=128 B1=4 B4=2 BIG=8 EQ=48 EHQ=16
ATTN=backend.trainer.attn_implementation
VARLEN=varlen=$ATTN=varlen SDPA=sdpa=$ATTN=sdpa
BIG_VARLEN=varlen-b$BIG=$ATTN=varlen,training.per_device_batch_size=$BIG,training.effective_batch_size=$BIG
DOCS=documents=$ATTN=varlen,data.packing=false  # the benchmark's layout (issue 25: within 5% of packed varlen)
: > "$LOG"

step() {  # NAME LIMIT_S SCRIPT ARGS...: one bench process, its result lines prefixed with NAME in the table
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*" | tee -a "$LOG"
  timeout "$limit" $PY "$@" 2>&1 | tee -a "$LOG" \
    | grep --line-buffered -E "^(device|ratio_vs_upstream|varlen-check|[a-z0-9_-]+: ([0-9,.]+ useful|failed))|q/s|speedup" \
    | sed -u "s/^/$name | /"
  echo "=== $name exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}

train() {  # NAME LIMIT_S ARGS...: bench/train_throughput.py at this run's sequence length and step counts
  local name=$1 limit=$2; shift 2
  step "$name" "$limit" bench/train_throughput.py --seq $SEQ $STEPS "$@"
}

{
  train varlen-check 45 --model $M1 --batch-size 4 --check-varlen
  train 1b-full 130 --model $M1 --batch-size $B1 --variant $VARLEN --variant $DOCS --variant $SDPA --variant $BIG_VARLEN
  train 1b-lora128 75 --model $M1 --adapter lora128 --batch-size $B1 --upstream-batch-size 8 --variant $VARLEN \
    --variant $SDPA
  train 4b-full 80 --model $M4 --batch-size $B4 --no-upstream --variant $VARLEN --variant $SDPA
  # QA evaluation speed: ours (static cache, CUDA-graph decode, shared prefix) against HF generate at batch 32
  step 1b-eval 60 bench/eval_speed.py --model $M1 --questions $EQ --hf-questions $EHQ --batch-size 512 1024 --max-new-tokens 32
} > "$LOG.table"
echo
echo "config | mode: useful tok/s, padding, batch, MFU, peak memory (training); the check; questions/s (evaluation)"
grep -v "^===" "$LOG.table"
echo "gpu_check: ${SECONDS}s"
