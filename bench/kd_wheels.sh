#!/usr/bin/env bash
# The wheels that the KD backend needs beyond the lent GPU image (Python 3.12, jax 0.11.2 with CUDA, flax, optax,
# orbax-checkpoint, chex, etils, tensorstore, tensorboard, transformers 5.17, torch; no kauldron, gemma, grain, no
# TensorFlow, no network), into bench/wheels/ (git-ignored), for the device tool's `carry`; bench/gpu_check.sh installs
# them (pip --no-index --no-deps --target, on PYTHONPATH: the image's own packages stay as they are).
#
#     bash bench/kd_wheels.sh          # the KD backend's set, about 8 MiB
#     bash bench/kd_wheels.sh --hf     # also the HF backend's (transformers, peft, torchao, trl, datasets, ...): what
#                                      # the whole bench/gpu_check.sh needs there, about 31 MiB in all
#
# Versions are the lock files' (KD: requirements/lock-jax.txt, HF: requirements/lock.txt), so the image runs what CI
# tests. The KD set is what a KD run imports beyond the image, measured (sys.modules after `main.py backend=kd` trains,
# evaluates, saves, resumes, and with adapter=lora128, in a Python 3.12 venv holding only the image's packages):
# kauldron gemma grain array_record clu ml_collections immutabledict typeguard lark mediapy IPython traitlets dialog
# portpicker, and cbe's own hydra-core omegaconf antlr4. Left out, although their metadata asks for them, since no KD
# run imports them: IPython's shell (jedi, prompt-toolkit, ...), altair, graphviz, fastmcp, xmanager, and TensorFlow and
# tensorflow-datasets, which kauldron imports at module level but never uses on cbe's path: TensorFlow cannot travel
# (261 MiB), so gpu_check.sh puts the placeholders in bench/tf_stub on the KD steps' path instead (see its docstring).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=bench/wheels
KD=(kauldron gemma grain array-record clu ml-collections immutabledict typeguard lark mediapy ipython traitlets dialog
    portpicker hydra-core omegaconf antlr4-python3-runtime)
HF=(transformers trl peft datasets dill multiprocess tokenizers torchao)

pinned() {  # LOCK NAME...: NAME==VERSION as the lock file pins each
  local lock=$1; shift
  for name in "$@"; do
    grep -i -m1 "^${name}==" "$lock" || { echo "kd_wheels: $name is not pinned in $lock" >&2; exit 1; }
  done
}

kd=$(pinned requirements/lock-jax.txt "${KD[@]}")  # a plain assignment: set -e stops at a name not pinned
hf=$([ "${1:-}" = --hf ] && pinned requirements/lock.txt "${HF[@]}" || true)
specs=($kd $hf)
rm -rf "$DEST" && mkdir -p "$DEST"
PIP="${PYTHON:-python3} -m pip"
# Built for the image (CPython 3.12, x86-64 Linux), whatever Python runs this; antlr4-python3-runtime 4.9.3 (pure
# Python) exists only as a source archive, so it is built into a wheel here.
sdist=antlr4-python3-runtime
binary=()
for spec in "${specs[@]}"; do [[ ${spec%%==*} == "$sdist" ]] || binary+=("$spec"); done
$PIP download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d "$DEST" "${binary[@]}"
$PIP wheel -q --disable-pip-version-check --no-deps -w "$DEST" "$(pinned requirements/lock-jax.txt $sdist)"
# The oldest flax and orbax-checkpoint that ran a KD run with jax 0.11.2 (in a venv like the image's), kept aside:
# gpu_check.sh installs them only where the image's are older (flax <= 0.12.6 calls jax.core.get_opaque_trace_state,
# gone in jax 0.11; kauldron 1.4.4 passes orbax's CheckpointManagerOptions(lightweight_initialize=...), new in
# orbax-checkpoint 0.11.31).
$PIP download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$DEST/floor" flax==0.12.7 \
  orbax-checkpoint==0.11.31
ls "$DEST" "$DEST/floor"
echo "kd_wheels: $(find "$DEST" -name "*.whl" | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
