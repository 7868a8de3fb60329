"""The KD backend loads an HF checkpoint where torch is not installed, bit for bit the weights torch loads."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from cbe.backends.kd.convert import hf_to_gemma
from cbe.weights.init import init_checkpoint
from cbe.weights.reader import read_checkpoint
from tests.conftest import ROOT

# Run before anything else is imported. torch is hidden from the path finder, as if it were not installed:
# `import torch` fails and transformers' availability check (importlib.util.find_spec) finds none. (A finder
# that raised ImportError would break that check instead.)
CHILD = """
import importlib.machinery, sys

class NoTorch(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.split(".")[0] == "torch" else super().find_spec(name, path, target)

sys.meta_path = [NoTorch if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
try:
    import torch
    raise SystemExit("torch imported")
except ImportError:
    pass

from types import SimpleNamespace
import numpy as np
from cbe.backends.kd.models import load_hf_weights

model = SimpleNamespace(name=sys.argv[1], source="hub", tokenizer=None, architecture={})
hf, params, tokenizer = load_hf_weights(model, 0, sys.argv[2])
assert not [m for m in sys.modules if m.split(".")[0] == "torch"]
assert hf.num_hidden_layers == 4 and tokenizer.pad_token_id is not None

def flat(tree, prefix=""):
    for key, value in tree.items():
        yield from flat(value, f"{prefix}{key}/") if isinstance(value, dict) else [(prefix + key, value)]

np.savez(sys.argv[3], **dict(flat(params)))
"""


def flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        out |= flat(value, f"{prefix}{key}/") if isinstance(value, dict) else {prefix + key: value}
    return out


@pytest.mark.slow
def test_kd_reads_a_saved_checkpoint_without_torch_exactly_as_torch_loads_it(tmp_path):
    architecture = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml").model.architecture)
    path = init_checkpoint(architecture, str(ROOT / "cbe" / "assets" / "tiny_tokenizer"), 0, tmp_path)
    out = tmp_path / "params.npz"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(tmp_path), str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    state = {name: t.detach().numpy() for name, t in model.state_dict().items()}
    c = model.config
    expected = flat(hf_to_gemma(state, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim))
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
