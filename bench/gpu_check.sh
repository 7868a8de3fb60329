#!/usr/bin/env bash
# Issues 20's, 25's and the KD backend's GPU measurements on one H100/H200 in one call of at most 8 minutes
# (GPU_CHECK_SECONDS=480 over the whole script, the wheels' install included; each step also under its own limit, one
# failure or OOM keeps the rest, and a step that the deadline leaves under 15 s says it was skipped), a table of every
# result line last; full output in LOGDIR/gpu_check.log. In this order:
# - setup: the carried wheels where the image lacks kauldron or trl (below), and the versions every step runs on;
# - varlen-check: varlen attention against sdpa on the same packed rows and weights (Gemma 3 1B): both losses, the
#   attention gradients' difference, PASS/FAIL (bench/train_throughput.py --check-varlen);
# - training throughput (bench/train_throughput.py): 1B full and 1B LoRA-128, upstream style against ours with
#   varlen and with sdpa (1B full also varlen at 32 rows per device, and the benchmark's layout, data.packing=false,
#   beside packed varlen);
# - QA evaluation speed (bench/eval_speed.py);
# - the KD backend (backend=kd: kauldron, gemma, JAX): KD<->HF parity at step 0 on the same random-init weights
#   (eval_loss within bf16 tolerance, greedy answers at least 98% identical) with both backends' questions/s in the
#   same process (bench/kd_parity.py), then KD's training throughput, 1B full and 1B LoRA-128, at the HF steps'
#   sequence length and 16 rows per optimizer step (bench/train_throughput.py --backend kd), as 2 micro-batches of
#   KD_MICRO=8 rows: gemma's model computes the full 262k-vocabulary logits, which at 16 rows may not fit an H100;
# - 4B full, varlen against sdpa, with what the deadline leaves (issue 20's table has it).
#
#     bash bench/gpu_check.sh [LOGDIR]          # SMOKE=1 runs the same on the tiny model (CPU, about 3 minutes)
#
# On the lent GPU (the device tool): its image has torch, jax 0.11.2 and flax, but not kauldron, gemma, grain, trl,
# hydra or TensorFlow, and no network. So first, here, `bash bench/kd_wheels.sh --hf` (bench/wheels/, git-ignored,
# 27 MiB: with the working tree, about 1 MiB, well under the 64 MiB that travels), then one call
#     run(command="bash bench/gpu_check.sh $OUT", carry=["bench/wheels"], timeout_s=560)
# The setup step installs the carried wheels with pip (--no-index --no-deps --target) into a folder it puts on
# PYTHONPATH: the image's own packages stay as they are (flax and orbax-checkpoint too, unless older than jax 0.11 and
# kauldron 1.4.4 need: then bench/wheels/floor's). It does nothing where kauldron and trl import, e.g. here:
# `PYTHON=.venv/bin/python SMOKE=1 bash bench/gpu_check.sh /tmp/gc`. Where TensorFlow is not installed, the KD steps
# get bench/tf_stub's placeholders on their path (its docstring says why kauldron needs them and what they hold).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LOG=${1:-${OUT:-/tmp}}/gpu_check.log
mkdir -p "$(dirname "$LOG")"
PY=${PYTHON:-python3}
M1=gemma3_1b M4=gemma3_4b STEPS="--warmup 2 --steps 5" SEQ=1024 B1=16 B4=8 BIG=32 EQ=2048 EHQ=64
KD_MICRO=${KD_MICRO:-8} KQ=2048 KB=1024
if [ "${SMOKE:-0}" = 1 ]; then
  M1=tiny M4=tiny STEPS="--warmup 1 --steps 1" SEQ=128 B1=4 B4=2 BIG=8 EQ=48 EHQ=16 KD_MICRO=2 KQ=48 KB=16
fi
GPU_CHECK_SECONDS=${GPU_CHECK_SECONDS:-$([ "${SMOKE:-0}" = 1 ] && echo 600 || echo 480)}  # the whole script's limit
ATTN=backend.trainer.attn_implementation
VARLEN=varlen=$ATTN=varlen SDPA=sdpa=$ATTN=sdpa
BIG_VARLEN=varlen-b$BIG=$ATTN=varlen,training.per_device_batch_size=$BIG,training.effective_batch_size=$BIG
DOCS=documents=$ATTN=varlen,data.packing=false  # the benchmark's layout (issue 25: within 5% of packed varlen)
KD_ROWS=kd-b$B1-micro$KD_MICRO=training.per_device_batch_size=$KD_MICRO
RESULTS="^(device|ratio_vs_upstream|varlen-check|kd-parity|  differs|[a-z0-9_-]+: ([0-9,.]+ useful|failed))|q/s|speedup"
: > "$LOG"

step() {  # NAME LIMIT_S SCRIPT ARGS...: one bench process, its result lines prefixed with NAME in the table
  local name=$1 limit=$2 left=$((GPU_CHECK_SECONDS - SECONDS)); shift 2
  if [ "$left" -lt 15 ]; then
    echo "$name | skipped: the script's ${GPU_CHECK_SECONDS} s are spent" | tee -a "$LOG"
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout "$limit" $PY "$@" 2>&1 | tee -a "$LOG" | grep --line-buffered -E "$RESULTS" | sed -u "s/^/$name | /"
  local rc=${PIPESTATUS[0]}
  echo "=== $name exit $rc after ${SECONDS}s" | tee -a "$LOG"
  [ "$rc" = 124 ] && echo "$name | timed out: killed at its ${limit} s limit" | tee -a "$LOG"
  [ "$rc" != 0 ] && [ "$rc" != 124 ] && echo "$name | exit $rc (the log says why)" | tee -a "$LOG"
  return 0
}

train() {  # NAME LIMIT_S ARGS...: bench/train_throughput.py at this run's sequence length and step counts
  local name=$1 limit=$2; shift 2
  step "$name" "$limit" bench/train_throughput.py --seq $SEQ $STEPS "$@"
}

kd() {  # STEP-FUNCTION ARGS...: a KD step, with TensorFlow's placeholders where TensorFlow is not installed, and JAX
  # allowed most of the GPU (its default preallocates 75%)
  PYTHONPATH=$KD_PATH XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9} "$@"
}

setup() {  # the carried wheels, where the image lacks kauldron or trl; the versions the KD steps will run on
  local site=${CBE_SITE:-/tmp/cbe-site} missing floor
  missing=$($PY -c "import importlib.util as u; print(' '.join(m for m in ('kauldron', 'trl') if not u.find_spec(m)))")
  if [ -n "$missing" ]; then
    if compgen -G "bench/wheels/*.whl" > /dev/null; then
      # flax and orbax-checkpoint come from the image, unless older than what jax 0.11 and kauldron 1.4.4 need
      floor=$($PY - <<'EOF'
import importlib.metadata as md
from pathlib import Path

from packaging.version import Version

FLOORS = {"flax": "0.12.7", "orbax-checkpoint": "0.11.31"}  # see bench/kd_wheels.sh
wheels = []
for name, floor in FLOORS.items():
    try:
        too_old = Version(md.version(name)) < Version(floor)
    except md.PackageNotFoundError:
        too_old = True
    if too_old:
        wheels += Path("bench/wheels/floor").glob(f"{name.replace('-', '_')}-*.whl")
print(*wheels)
EOF
)
      echo "setup: $missing not installed: the carried bench/wheels into $site${floor:+, and $floor}"
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        bench/wheels/*.whl $floor || echo "setup: the install failed"
      export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    else
      echo "setup: $missing not installed, no bench/wheels/: run 'bash bench/kd_wheels.sh --hf', carry bench/wheels"
    fi
  fi
  KD_PATH=${PYTHONPATH:-}
  if ! $PY -c "import importlib.util as u, sys; sys.exit(not u.find_spec('tensorflow'))"; then
    KD_PATH=$PWD/bench/tf_stub${KD_PATH:+:$KD_PATH}
  fi
  PYTHONPATH=$KD_PATH $PY - <<'EOF'
import importlib.metadata as md
import importlib.util as u

names = ["torch", "transformers", "trl", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "kauldron", "gemma"]
versions = []
for name in names:
    try:
        versions.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        versions.append(f"{name} missing")
spec = u.find_spec("tensorflow")
tf = "placeholder (bench/tf_stub)" if spec and "tf_stub" in (spec.origin or "") else "installed" if spec else "missing"
print(f"setup: {', '.join(versions)}; tensorflow {tf}", flush=True)
EOF
}

setup > "$LOG.setup" 2>&1  # in this shell (not a pipe's subshell): it exports PYTHONPATH and sets KD_PATH
tee -a "$LOG" < "$LOG.setup" | grep "^setup" | sed "s/^/setup | /" > "$LOG.table"
rm -f "$LOG.setup"
{
  train varlen-check 45 --model $M1 --batch-size 4 --check-varlen
  train 1b-full 130 --model $M1 --batch-size $B1 --variant $VARLEN --variant $DOCS --variant $SDPA --variant $BIG_VARLEN
  train 1b-lora128 75 --model $M1 --adapter lora128 --batch-size $B1 --upstream-batch-size 8 --variant $VARLEN \
    --variant $SDPA
  # QA evaluation speed: ours (static cache, CUDA-graph decode, shared prefix) against HF generate at batch 32
  step 1b-eval 60 bench/eval_speed.py --model $M1 --questions $EQ --hf-questions $EHQ --batch-size 512 1024 --max-new-tokens 32
  # The KD backend: parity with HF and both backends' answering speed, then its training throughput (each process
  # draws the 1B weights and compiles its programs: most of its time)
  kd step kd-parity 90 bench/kd_parity.py --model $M1 --questions $KQ --batch-size $KB --max-new-tokens 32
  kd train kd-1b-full 75 --backend kd --model $M1 --batch-size $B1 --no-upstream --variant $KD_ROWS
  kd train kd-1b-lora128 70 --backend kd --model $M1 --adapter lora128 --batch-size $B1 --no-upstream --variant $KD_ROWS
  # Last, with what is left of the deadline (measured before: issue 20's table)
  train 4b-full 80 --model $M4 --batch-size $B4 --no-upstream --variant $VARLEN --variant $SDPA
} >> "$LOG.table"
echo
echo "config | mode: useful tok/s, padding, batch, MFU, peak memory (training); the checks; questions/s (evaluation)"
grep -v "^===" "$LOG.table"
echo "gpu_check: ${SECONDS}s"
