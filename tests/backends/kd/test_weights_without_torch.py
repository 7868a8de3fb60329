"""The KD backend loads an HF checkpoint where torch is not installed, bit for bit the weights torch loads."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from cbe.backends.hf.models import load_base_model
from cbe.backends.kd.convert import hf_to_gemma
from cbe.backends.kd.models import GemmaFactory
from cbe.config import settings_of
from cbe.weights.reader import read_checkpoint
from tests.conftest import ROOT
from tests.hide_torch import HIDE_TORCH
from tests.test_config import compose_config

# A saved checkpoint read by the KD backend where torch is hidden (tests/hide_torch.py).
CHILD = """
from types import SimpleNamespace
import numpy as np
from cbe.backends.kd.models import load_hf_weights

model = SimpleNamespace(name=sys.argv[1], source="hub", tokenizer=None, architecture={})
loaded = load_hf_weights(model, 0, sys.argv[2])
assert not [m for m in sys.modules if m.split(".")[0] == "torch"]
assert loaded.hf.num_hidden_layers == 4 and loaded.tokenizer.pad_token_id is not None

def flat(tree, prefix=""):
    for key, value in tree.items():
        yield from flat(value, f"{prefix}{key}/") if isinstance(value, dict) else [(prefix + key, value)]

np.savez(sys.argv[3], **dict(flat(loaded.params)))
"""


def flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        out |= flat(value, f"{prefix}{key}/") if isinstance(value, dict) else {prefix + key: value}
    return out


@pytest.mark.slow
def test_kd_reads_a_saved_checkpoint_without_torch_exactly_as_torch_loads_it(tmp_path, cache_dir):
    """The HF backend's tiny model, saved by save_pretrained, norms made nonzero so that every tensor counts."""
    model, tokenizer = load_base_model(settings_of(compose_config(f"data.cache_dir={cache_dir}")))
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "norm" in name:
                weight.uniform_(-0.5, 0.5)
    path = tmp_path / "saved"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    out = tmp_path / "params.npz"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-c", HIDE_TORCH + CHILD, str(path), str(tmp_path), str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    state = {name: t.detach().numpy() for name, t in reloaded.state_dict().items()}
    expected = flat(hf_to_gemma(state, GemmaFactory().config(reloaded.config)))
    with np.load(out) as got:
        assert sorted(got.files) == sorted(expected)
        for name, value in expected.items():
            assert got[name].dtype == np.float32 and np.array_equal(got[name], value), name


def test_bf16_f16_and_f32_safetensors_read_as_their_exact_float32_values(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(5, 7, generator=generator).to(torch.bfloat16),
        "f16": torch.randn(3, generator=generator).to(torch.float16),
        "f32": torch.tensor([-0.0, 1e-40, 3.0e38], dtype=torch.float32),
        "scalar": torch.tensor(-1.5, dtype=torch.bfloat16),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text('{"model_type": "gemma3_text"}')
    config, read = read_checkpoint(tmp_path)
    assert config == {"model_type": "gemma3_text"} and read.keys() == tensors.keys()
    for name, tensor in tensors.items():
        expected = tensor.float().numpy()
        assert read[name].dtype == np.float32 and read[name].shape == expected.shape, name
        assert np.array_equal(read[name].view(np.uint32), expected.view(np.uint32)), name  # bits: -0.0 is not 0.0
