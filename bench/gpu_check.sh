#!/usr/bin/env bash
# The GPU measurements on one H100/H200 in one call of at most 8 minutes (GPU_CHECK_SECONDS=480 over the whole script,
# the wheels' install included; each step also under its own limit, one failure or OOM keeps the rest, and a step that
# the deadline leaves under 15 s says it was skipped), a table of every result line last; full output in
# LOGDIR/gpu_check.log. Issue 30's steps first, then the earlier issues' still unmeasured ones:
# - setup: the carried wheels where the image lacks kauldron, trl or torchao (below), and the versions steps run on;
# - each training lever on its own and together (bench/train_throughput.py, sequence 1024, one process per model):
#   `before` is the previous default (TRL's loss head, which recomputes its logits in backward, and each decoder layer
#   compiled); `fused-head` (cbe's loss head: backend.trainer.loss_head=fused), `model-compile` (the whole decoder
#   stack as one program: backend.trainer.torch_compile=model), `both` (today's default), and for 1B full also the
#   benchmark's layout (data.packing=false) beside packed, for 4B full `fp8` (both + backend.trainer.fp8=true). Each
#   line has its useful tokens/s, MFU, peak memory and the torch.compile graphs compiled in its timed steps (0 expected);
# - memory: the news recipes of 1B and 4B, full and LoRA-128, at their own sequence length and per-device batch, with
#   the checkpointing a 40 GB card's plan picks (the README's table), measured peak beside the plan's estimate;
# - fp8-check: does FP8 keep the numbers (bench/fp8_check.py: two 300-step runs of 4B, eval_loss within 1%, QA exact
#   match within the 95% CI);
# - varlen-check, QA evaluation speed (bench/eval_speed.py) and the KD backend (issue 27: KD<->HF parity at step 0
#   and both backends' questions/s, bench/kd_parity.py; KD's 1B full and LoRA-128 training throughput), with what the
#   deadline leaves. GPU_CHECK_STEPS="speed memory fp8 kd" (the default) picks groups, e.g. for a second call.
#
#     bash bench/gpu_check.sh [LOGDIR]          # SMOKE=1 runs the same on the tiny model (CPU, several minutes)
#
# On the lent GPU (the device tool): its image has torch, jax 0.11.2 and flax, but not kauldron, gemma, grain, trl,
# torchao, hydra or TensorFlow, and no network. So first, here, `bash bench/kd_wheels.sh --hf` (bench/wheels/,
# git-ignored, about 31 MiB: with the working tree, about 1 MiB, well under the 64 MiB that travels), then one call
#     run(command="bash bench/gpu_check.sh $OUT", carry=["bench/wheels"], timeout_s=560)
# The setup step installs the carried wheels with pip (--no-index --no-deps --target) into a folder it puts on
# PYTHONPATH: the image's own packages stay as they are (flax and orbax-checkpoint too, unless older than jax 0.11 and
# kauldron 1.4.4 need: then bench/wheels/floor's). It does nothing where kauldron, trl and torchao import, e.g. here:
# `PYTHON=.venv/bin/python SMOKE=1 bash bench/gpu_check.sh /tmp/gc`. Where TensorFlow is not installed, the KD steps
# get bench/tf_stub's placeholders on their path (its docstring says why kauldron needs them and what they hold).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LOG=${1:-${OUT:-/tmp}}/gpu_check.log
mkdir -p "$(dirname "$LOG")"
PY=${PYTHON:-python3}
M1=gemma3_1b M4=gemma3_4b STEPS="--warmup 2 --steps 5" SEQ=1024 B1=16 B4=8 EQ=2048 EHQ=64 FP8_STEPS=300
KD_MICRO=${KD_MICRO:-8} KQ=2048 KB=1024
if [ "${SMOKE:-0}" = 1 ]; then
  M1=tiny M4=tiny STEPS="--warmup 1 --steps 1" SEQ=128 B1=4 B4=2 EQ=48 EHQ=16 FP8_STEPS=10 KD_MICRO=2 KQ=48 KB=16
fi
GPU_CHECK_SECONDS=${GPU_CHECK_SECONDS:-$([ "${SMOKE:-0}" = 1 ] && echo 900 || echo 480)}  # the whole script's limit
GPU_CHECK_STEPS=${GPU_CHECK_STEPS:-speed memory fp8 kd}
T=backend.trainer
# The levers (issue 30): the previous default, each lever alone, both (today's default), and the benchmark's layout
BEFORE=before=bench.head=trl,$T.torch_compile=layers
HEAD=fused-head=$T.torch_compile=layers
COMPILE=model-compile=bench.head=trl,$T.torch_compile=model
BOTH=both=
DOCS=documents=data.packing=false  # the benchmark's layout beside packed (issue 25: within 5%)
FP8=fp8=$T.fp8=true
KD_ROWS=kd-b$B1-micro$KD_MICRO=training.per_device_batch_size=$KD_MICRO
RESULTS="^(device|ratio_vs_upstream|varlen-check|kd-parity|fp8-check|  differs|[a-z0-9_-]+: ([0-9,.]+ useful|failed))|q/s|speedup"
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
  missing=$($PY -c "import importlib.util as u; print(' '.join(m for m in ('kauldron', 'trl', 'torchao') if not u.find_spec(m)))")
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

names = ["torch", "transformers", "torchao", "trl", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "kauldron", "gemma"]
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
  if [[ " $GPU_CHECK_STEPS " == *" speed "* ]]; then
    train 1b-full 170 --model $M1 --batch-size $B1 --no-upstream --variant $BEFORE --variant $HEAD --variant $COMPILE \
      --variant $BOTH --variant $DOCS
    train 4b-full 130 --model $M4 --batch-size $B4 --no-upstream --variant $BEFORE --variant $BOTH --variant $FP8
    train 1b-lora128 70 --model $M1 --adapter lora128 --batch-size $B1 --no-upstream --variant $BEFORE --variant $BOTH
  fi
  if [[ " $GPU_CHECK_STEPS " == *" memory "* ]]; then  # the news recipes as the README's 40 GB table plans them
    for model in $M1 $M4; do
      for adapter in full lora128; do
        train memory-${model#gemma3_}-$adapter 60 --model $model --adapter $adapter --task news --card-gb 40 \
          --no-upstream --variant recipe=
      done
    done
  fi
  if [[ " $GPU_CHECK_STEPS " == *" fp8 "* ]]; then
    step fp8-check 200 bench/fp8_check.py --model $M4 --steps $FP8_STEPS
  fi
  if [[ " $GPU_CHECK_STEPS " == *" kd "* ]]; then  # the earlier issues' checks, with what is left of the deadline
    train varlen-check 45 --model $M1 --batch-size 4 --check-varlen
    # QA evaluation speed: ours (static cache, CUDA-graph decode, shared prefix) against HF generate at batch 32
    step 1b-eval 60 bench/eval_speed.py --model $M1 --questions $EQ --hf-questions $EHQ --batch-size 512 1024 \
      --max-new-tokens 32
    # The KD backend: parity with HF and both backends' answering speed, then its training throughput (each process
    # draws the 1B weights and compiles its programs: most of its time)
    kd step kd-parity 90 bench/kd_parity.py --model $M1 --questions $KQ --batch-size $KB --max-new-tokens 32
    kd train kd-1b-full 75 --backend kd --model $M1 --batch-size $B1 --no-upstream --variant $KD_ROWS
    kd train kd-1b-lora128 70 --backend kd --model $M1 --adapter lora128 --batch-size $B1 --no-upstream \
      --variant $KD_ROWS
  fi
} >> "$LOG.table"
echo
echo "config | mode: useful tok/s, padding, batch, MFU, peak memory (and the plan's estimate), compiled graphs" \
  "(training); the checks; questions/s (evaluation)"
grep -v "^===" "$LOG.table"
echo "gpu_check: ${SECONDS}s"
