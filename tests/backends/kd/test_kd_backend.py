"""The KD backend on its own, without torch: these run in the JAX environment too (make test-jax-env), where torch
is not installed. Its parity with the HF backend is tested beside torch, in test_kd_trainer.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from kauldron import kd

from cbe.backends.kd.models import Gemma2Factory
from cbe.data.packing import corpus_rows, training_order
from tests.conftest import ROOT, loop_in_process
from tests.hide_torch import HIDE_TORCH
from tests.results import eval_results

pytestmark = [pytest.mark.kd, pytest.mark.slow]

LOAD = """
import json
from types import SimpleNamespace
import numpy as np
from safetensors.numpy import save_file
from cbe.backends.kd.models import load_hf_weights
from cbe.weights.init import init_config, init_state

architecture, tokenizer, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
tiny = SimpleNamespace(name="tiny", source="init", tokenizer=tokenizer, architecture=architecture)
drawn = load_hf_weights(tiny, 0, out)
# The same draw saved as an HF checkpoint (as save_pretrained lays it out), then read back as a hub model is.
config = init_config(architecture, drawn.tokenizer)
config.save_pretrained(out + "/saved")
drawn.tokenizer.save_pretrained(out + "/saved")
save_file(init_state(config, 0), out + "/saved/model.safetensors", metadata={"format": "pt"})
saved = load_hf_weights(SimpleNamespace(name=out + "/saved", source="hub", tokenizer=None, architecture={}), 0, out)
assert not [m for m in sys.modules if m.split(".")[0] == "torch"], "torch was imported"

def flat(tree, prefix=""):
    for key, value in tree.items():
        yield from flat(value, f"{prefix}{key}/") if isinstance(value, dict) else [(prefix + key, value)]

np.savez(out + "/drawn.npz", **dict(flat(drawn.params)))
np.savez(out + "/saved.npz", **dict(flat(saved.params)))
"""


def tiny_architecture() -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml").model.architecture)


def test_kd_loads_weights_without_torch(tmp_path):
    """The tiny model's seeded draw and a saved HF checkpoint load where torch is absent, to the same params."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    args = [json.dumps(tiny_architecture()), str(ROOT / "cbe" / "assets" / "tiny_tokenizer"), str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "-c", HIDE_TORCH + LOAD, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp_path / "drawn.npz") as drawn, np.load(tmp_path / "saved.npz") as saved:
        assert len(drawn.files) == 2 + 4 * 11  # embedding, final norm; per layer 4 projections, 2 qk + 4 norms, mlp
        assert sorted(drawn.files) == sorted(saved.files)
        for name in drawn.files:
            assert drawn[name].dtype == np.float32 and np.array_equal(drawn[name], saved[name]), name
        assert drawn["embedder/input_embedding"].std() == pytest.approx(0.02, rel=0.05)  # HF's initializer_range


def test_a_second_family_trains_through_its_factory(tmp_path, cache_dir):
    """Gemma 2 (tiny dimensions), a family other than Gemma 3, trains 2 steps on the KD backend through its
    factory, and its eval loss falls."""
    overrides = ["model=tiny_gemma2", "training.num_train_steps=2", "training.eval_every=2", "training.save_every=2"]
    loop = loop_in_process(tmp_path, "backend=kd", *overrides, "logging=none", f"data.cache_dir={cache_dir}")
    loop.train()
    base = loop.backend.base
    assert isinstance(base.factory, Gemma2Factory) and base.hf.model_type == "gemma2"
    # Gemma 2's own traits reached the model: soft-capped logits and attention, no query/key norms.
    assert (base.config.final_logit_softcap, base.config.attn_logits_soft_cap) == (30.0, 50.0)
    assert "_query_norm" not in base.params["layer_0"]["attn"]
    results = eval_results(tmp_path)
    assert [r["step"] for r in results] == [0, 2]
    assert results[1]["eval_loss"] < results[0]["eval_loss"] - 0.1


def test_two_devices_shard_the_params_and_match_one_device(run_main, tmp_path, monkeypatch, cache_dir):
    common = [
        "backend=kd",
        "training.num_train_steps=3",
        "training.eval_every=3",
        "training.save_every=3",
        "training.per_device_batch_size=4",
        "backend.trainer.fsdp_min_size_mb=0",
        "logging=none",
    ]
    # 1 device: 2 accumulated micro-batches of 4 rows; 2 devices: 1 micro-batch of 8 rows, FSDP params.
    # Each step's loss is the mean over all its trained tokens, so both compute the same updates.
    loop_in_process(tmp_path / "one", *common, f"data.cache_dir={cache_dir}").train()  # this process: 1 device
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")  # a new process sees 2
    two = run_main(*common, "logging.run_name=two")
    assert "arrays sharded over 2 device(s) (FSDP), accumulation 1" in two.stdout
    assert " 0 of " not in two.stdout.split("params: ")[1].splitlines()[0]
    one_results, two_results = eval_results(tmp_path / "one"), eval_results(tmp_path / "outputs" / "cbe" / "two")
    assert len(one_results) == len(two_results) == 2
    for a, b in zip(one_results, two_results):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-5)


def test_each_kd_step_trains_on_the_rows_the_loop_hands_it(tmp_path, cache_dir, monkeypatch):
    """The micro-batches KD's train step is given are the packed rows in training_order, 2 of 29 at a time."""
    seen = []
    device_put = kd.sharding.device_put

    def record(batch, sharding):
        if isinstance(batch, dict) and "input_ids" in batch:
            seen.append(np.array(batch["input_ids"]))
        return device_put(batch, sharding)

    monkeypatch.setattr(kd.sharding, "device_put", record)
    steps = ["training.num_train_steps=3", "training.eval_every=3", "training.save_every=3", "eval.max_questions=1"]
    batch = ["training.effective_batch_size=4", "training.per_device_batch_size=2", "data.sequence_length=64"]
    loop = loop_in_process(tmp_path, "backend=kd", *steps, *batch, "logging=none", f"data.cache_dir={cache_dir}")
    loop.train()
    data = loop.cfg.data
    rows = corpus_rows(data.train_path, loop.backend.tokenizer, data.sequence_length, cache_dir, packing=True)
    order = training_order(len(rows), 3 * 4, loop.cfg.training.seed)
    assert len(rows) == 29 and [len(b) for b in seen] == [2] * 6
    assert np.array_equal(np.concatenate(seen), rows.input_ids[order])
