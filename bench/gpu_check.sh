#!/usr/bin/env bash
# Training throughput on one H100/H200 in one short call (about 7 minutes): Gemma 3 1B full and LoRA-128, then
# Gemma 3 4B full, each ours (packed, compiled; sdpa and flex attention) against the upstream style, measured
# side by side by bench/train_throughput.py. Each config has its own time limit, so one failure or OOM keeps
# the others; the table of every measured line comes last. Full output in LOGDIR/gpu_check.log.
#
#     bash bench/gpu_check.sh [LOGDIR]          # SMOKE=1 runs the same on the tiny model (CPU, a few minutes)
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LOG=${1:-${OUT:-/tmp}}/gpu_check.log
PY=${PYTHON:-python3}
M1=gemma3_1b M4=gemma3_4b STEPS="--warmup 2 --steps 5" SEQ=1024
[ "${SMOKE:-0}" = 1 ] && M1=tiny M4=tiny STEPS="--warmup 1 --steps 1" SEQ=128
FLEX=flex=backend.trainer.attn_implementation=flex_attention
: > "$LOG"

config() {  # NAME LIMIT_S ARGS...: one bench run, its lines prefixed with NAME in the table
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*" | tee -a "$LOG"
  timeout "$limit" $PY bench/train_throughput.py --seq $SEQ $STEPS "$@" 2>&1 | tee -a "$LOG" \
    | grep --line-buffered -E "^(device|ratio_vs_upstream|[a-z_-]+: ([0-9,.]+ useful|failed))" | sed -u "s/^/$name | /"
  echo "=== $name exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}

{
  config 1b-full 170 --model $M1 --batch-size 16 --variant sdpa= --variant $FLEX
  config 1b-lora128 120 --model $M1 --adapter lora128 --batch-size 16 --upstream-batch-size 8 --variant sdpa= --variant $FLEX
  config 4b-full 150 --model $M4 --batch-size 8 --variant sdpa= --variant $FLEX
} > "$LOG.table"
echo
echo "config | mode: useful tok/s, padding, batch, MFU, peak memory"
grep -v "^===" "$LOG.table"
