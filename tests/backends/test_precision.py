"""training.precision and adapter.dtype on both backends: pure bf16 (the benchmark's, `auto` on accelerators, `bf16`
anywhere) with LoRA adapters bf16 or fp32, and fp32 (`auto` on the CPU)."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.conftest import ROOT, loop_in_process

pytestmark = pytest.mark.slow

LORA = ["adapter=lora128", "training.effective_batch_size=2", "training.per_device_batch_size=2"]


def loop_of(tmp_path, backend: str, *overrides: str):
    return loop_in_process(tmp_path / backend, f"backend={backend}", *LORA, *overrides)


def one_step_loss(loop) -> float:
    rows = loop.rows(loop.cfg.data.train_path, "train")
    return loop.backend.train_steps(rows, np.array([[0, 1]]), np.array([1e-3]))[0]["loss"]


def hf_dtypes(model) -> dict[str, set]:
    dtypes = {"base": set(), "lora": set()}
    for name, p in model.named_parameters():
        dtypes["lora" if "lora_" in name else "base"].add(p.dtype)
    return dtypes


def kd_dtypes(model) -> dict[str, list[str]]:
    """The dtypes of the parameters the KD backend's model is built with (their shapes only: nothing computed)."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, positions=jnp.arange(8)[None]))
    dtypes = {"base": set(), "lora": set()}
    for path, x in jax.tree_util.tree_leaves_with_path(shapes):
        dtypes["lora" if "lora" in jax.tree_util.keystr(path) else "base"].add(str(x.dtype))
    return {kind: sorted(found) for kind, found in dtypes.items()}


def test_hf_precision_and_adapter_dtype(tmp_path):
    auto = loop_of(tmp_path / "auto", "hf")  # the CPU: fp32
    auto.backend.start(None)
    assert hf_dtypes(auto.backend.model) == {"base": {torch.float32}, "lora": {torch.float32}}
    fp32_loss = one_step_loss(auto)
    pure = loop_of(tmp_path / "bf16", "hf", "training.precision=bf16")  # the benchmark's: adapters bf16 too
    pure.backend.start(None)
    assert hf_dtypes(pure.backend.model) == {"base": {torch.bfloat16}, "lora": {torch.bfloat16}}
    assert one_step_loss(pure) == pytest.approx(fp32_loss, rel=2e-2)  # the same step, at bf16's precision
    upcast = loop_of(tmp_path / "fp32-adapters", "hf", "training.precision=bf16", "adapter.dtype=fp32")
    upcast.backend.start(None)
    assert hf_dtypes(upcast.backend.model) == {"base": {torch.bfloat16}, "lora": {torch.float32}}


def test_kd_precision_and_adapter_dtype(tmp_path):
    pure = loop_of(tmp_path / "bf16", "kd", "training.precision=bf16")
    assert kd_dtypes(pure.backend.model) == {"base": ["bfloat16"], "lora": ["bfloat16"]}
    # In a process of its own: gemma's LoRA wrapper keeps the adapter dtype of the first LoRA model a process builds
    # over the same base layers, so a second model in this process would report the first one's.
    script = (
        "import sys; from pathlib import Path; from tests.conftest import loop_in_process; "
        "from tests.backends.test_precision import kd_dtypes, LORA; "
        "loop = loop_in_process(Path(sys.argv[1]), 'backend=kd', *LORA, 'training.precision=bf16', "
        "'adapter.dtype=fp32'); print(kd_dtypes(loop.backend.model))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "upcast")], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "{'base': ['bfloat16'], 'lora': ['float32']}"
