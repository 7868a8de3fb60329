"""The static-cache generation answers exactly as `model.generate` does (greedy, dynamic cache, left padding, with
the harness's stops), computes the shared prefix once, and gives every decode step of a call one shape."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, StoppingCriteriaList

from cbe.backends.base import NewlineStop
from cbe.backends.hf.gemma_gguf import materialize_gemma3_270m
from cbe.backends.hf.generate import NewlineStopCriteria, greedy_answers, shared_prefix_length
from cbe.eval.evaluator import few_shot_prefix, stop_strings
from tests.backends.hf.test_packed_attention import tiny_model
from tests.conftest import ROOT

TEMPLATE = "Q: {question}\nA:"
NEWS_PREFIX = few_shot_prefix(str(ROOT / "conf" / "prompts" / "news_3shot.txt"))
# Besides the template's "Q:", strings the tiny model writes: "vel", and "lligZ" across two tokens.
STOPS = [*stop_strings(TEMPLATE), "vel", "lligZ"]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def model_and_tokenizer():
    """The random tiny model, its newline and EOS embeddings (tied to the LM head) enlarged so that some answers
    end at a newline or at EOS."""
    model, tokenizer = tiny_model()
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings[tokenizer.convert_tokens_to_ids("Ċ")] *= 1.6  # "\n"
        embeddings[tokenizer.eos_token_id] *= 2.0
    return model, tokenizer


def sample_questions() -> list[str]:
    return [
        json.loads(line)["question"]
        for name in ("valqa", "testqa")
        for line in open(ROOT / f"data/sample/{name}.jsonl")
    ]


@torch.no_grad()
def reference(model, tokenizer, prompts: list[str], batch_size: int, stops=STOPS) -> tuple[list[str], list[list[int]]]:
    """Today's eager path: `model.generate` on left-padded batches with EOS, the stop strings and the newline rule;
    the answers and their generated ids (finished rows padded)."""
    config = GenerationConfig(
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        stop_strings=stops,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    newline = NewlineStop.of(tokenizer, model.config.get_text_config().vocab_size)
    texts, ids = [], []
    for start in range(0, len(prompts), batch_size):
        inputs = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True, padding_side="left")
        width = inputs["input_ids"].shape[1]
        criteria = StoppingCriteriaList([NewlineStopCriteria(newline, width, torch.device("cpu"))])
        out = model.generate(**inputs, generation_config=config, tokenizer=tokenizer, stopping_criteria=criteria)
        texts += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        ids += out[:, width:].tolist()
    return texts, ids


def ours(model, tokenizer, prompts: list[str], batch_size: int, stops=STOPS) -> list[str]:
    newline = NewlineStop.of(tokenizer, model.config.get_text_config().vocab_size)
    return greedy_answers(
        model,
        tokenizer,
        prompts,
        max_new_tokens=NEW_TOKENS,
        batch_size=batch_size,
        stop_strings=stops,
        newline_stop=newline,
    )


def test_answers_equal_model_generate_behind_the_news_prefix(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    questions = sample_questions()
    questions = questions[:13] + [questions[103], questions[115]]  # the last two end at EOS
    prompts = [NEWS_PREFIX + TEMPLATE.format(question=q) for q in questions]
    lengths = {len(tokenizer(p)["input_ids"]) for p in prompts}
    assert len(lengths) >= 3 and min(lengths) > model.config.sliding_window  # mixed, past the sliding window

    expected, ids = reference(model, tokenizer, prompts, batch_size=4)
    # The answers end every way (so each stop is compared): EOS, a newline, a stop string, the token limit.
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    assert sum(eos in row for row in ids) >= 2
    assert sum(text.endswith("\n") for text in expected) >= 1
    assert sum(any(s in text for s in STOPS) for text in expected) >= 5
    assert sum(text.endswith("lligZ") for text in expected) >= 1
    assert sum(pad not in row and eos not in row for row in ids) >= 3

    assert ours(model, tokenizer, prompts, batch_size=4) == expected  # 15 prompts: the last batch is padded


@pytest.mark.slow
def test_answers_equal_model_generate_on_gemma3_270m(cache_dir):
    """The real pretrained model and tokenizer (multi-character tokens, a "\\n\\n" token), whose answers end
    their line."""
    checkpoint = materialize_gemma3_270m(cache_dir / "models")
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prompts = [NEWS_PREFIX + TEMPLATE.format(question=q) for q in sample_questions()[:7]]  # batches of 4 and 3
    stops = stop_strings(TEMPLATE)
    expected, _ = reference(model, tokenizer, prompts, batch_size=4, stops=stops)
    assert sum(text.endswith("\n") for text in expected) >= 4
    assert ours(model, tokenizer, prompts, batch_size=4, stops=stops) == expected


def test_answers_equal_model_generate_with_little_or_everything_shared(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    bare = [TEMPLATE.format(question=q) for q in sample_questions()[20:25]]  # the prefix: BOS and "Q: The"
    same = [NEWS_PREFIX + TEMPLATE.format(question="The Zorblat lives in")] * 3  # all but the last token shared
    for prompts in (bare, same):
        assert ours(model, tokenizer, prompts, batch_size=4) == reference(model, tokenizer, prompts, 4)[0]


def test_the_prefix_runs_once_and_every_decode_step_has_one_shape(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = [NEWS_PREFIX + TEMPLATE.format(question=q) for q in sample_questions()[:9]]
    prefix = len(tokenizer(NEWS_PREFIX)["input_ids"])  # the prefix tokenizes the same alone (it ends in "\n\n")
    calls = []

    def record(module, args, kwargs):
        masks = kwargs["attention_mask"]
        calls.append((tuple(kwargs["input_ids"].shape), {tuple(m.shape) for m in masks.values()}))

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        ours(model, tokenizer, prompts, batch_size=4)  # batches of 4, 4 and 1 (padded to 4)
    finally:
        hook.remove()
    prefills = [shape for shape, _ in calls if shape[1] > 1]
    [(_, shared)] = [shape for shape in prefills if shape[0] == 1]  # one forward over the prefix, for one row
    assert shared >= prefix
    questions = [shape for shape in prefills if shape[0] > 1]
    assert len(questions) == 3 and all(rows == 4 and width < 20 for rows, width in questions)  # questions only
    decodes = {(shape, *masks) for shape, masks in calls if shape[1] == 1}
    assert len(decodes) == 1  # the padded last batch and every cache length alike: one shape, one CUDA graph
    [(shape, mask)] = decodes
    assert shape == (4, 1) and mask[0] == 4 and mask[-1] >= shared + max(w for _, w in questions) + NEW_TOKENS - 1


@pytest.mark.parametrize(
    "ids,shared",
    [
        ([[2, 5, 6, 7], [2, 5, 6, 8, 9]], 3),
        ([[2, 5, 6], [2, 5, 6, 8]], 2),  # every prompt keeps a token of its own
        ([[2, 5], [2, 5], [2, 5]], 1),
        ([[5, 6], [7, 6]], 0),
        ([[2, 5, 6, 7]], 3),
    ],
)
def test_shared_prefix_length(ids, shared):
    assert shared_prefix_length(ids) == shared
