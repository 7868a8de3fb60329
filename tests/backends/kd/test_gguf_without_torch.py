"""The offline Gemma 3 270M converts where torch is not installed (the Kauldron-only setup), to the checkpoint that
the HF tests check against transformers' own GGUF reading (tests/backends/hf/test_gemma_gguf.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cbe.weights.gguf import materialize_gemma3_270m
from cbe.weights.reader import read_checkpoint
from tests.conftest import ROOT
from tests.hide_torch import HIDE_TORCH

pytestmark = [pytest.mark.kd, pytest.mark.slow]

# In a child process where torch is hidden (tests/hide_torch.py).
CHILD = """
from transformers import AutoTokenizer
from cbe.weights.gguf import materialize_gemma3_270m

path = materialize_gemma3_270m(sys.argv[1])
AutoTokenizer.from_pretrained(path)
assert not [m for m in sys.modules if m.split(".")[0] == "torch"]
"""


def test_gemma3_270m_converts_without_torch_to_the_shared_checkpoint(cache_dir, tmp_path):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-c", HIDE_TORCH + CHILD, str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "converting Gemma 3 270M GGUF once" in proc.stdout  # converted there, not found

    # The session's own conversion (shared with the HF tests), which those check against transformers.
    shared = materialize_gemma3_270m(cache_dir / "models")
    config, tensors = read_checkpoint(tmp_path / "gemma3_270m")
    expected_config, expected = read_checkpoint(shared)
    assert config == expected_config and config["num_hidden_layers"] == 18
    assert len(tensors) == 236 and tensors.keys() == expected.keys()  # every GGUF tensor; the LM head is tied
    assert tensors["model.layers.17.self_attn.q_proj.weight"].shape == (1024, 640)  # Linear's [out, in]
    for name, value in expected.items():
        assert np.array_equal(tensors[name].view(np.uint32), value.view(np.uint32)), name
    for name in ("tokenizer.json", "generation_config.json"):
        assert json.loads((tmp_path / "gemma3_270m" / name).read_text()) == json.loads((shared / name).read_text())
