"""The static-cache generation answers exactly as `model.generate` does (greedy, dynamic cache, left padding, with
the harness's stops), computes the shared prefix once, and gives every decode step of a call one shape; sampled, it
draws the tokens the reference draw (cbe.backends.sampling) gives, with each question's own uniforms."""

import json

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3ForCausalLM,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    set_seed,
)

import cbe.backends.hf.trainer as hf_trainer
from cbe.backends.base import NewlineStop, answer_ended
from cbe.backends.hf.generate import NewlineStopCriteria, decode_answers, shared_prefix_length
from cbe.backends.hf.generate import draw as torch_draw
from cbe.backends.sampling import GREEDY, Sampling, draw
from cbe.eval.parse import question_markers
from cbe.loop import build
from cbe.run import RunDir
from cbe.weights.gguf import materialize_gemma3_270m
from tests.backends.hf.test_packed_attention import tiny_model
from tests.conftest import ROOT
from tests.test_config import compose_config

TEMPLATE = "Q: {question}\nA:"
# A long few-shot prefix behind which the random tiny model's answers end every way: the news prefix as it was when
# these tests were written, kept here so that editing conf/prompts/news_3shot.txt does not change what they test.
NEWS_PREFIX = (
    "Answer each question about recent news with a short answer.\n\n"
    "Q: Which town hosted the first Lumen Kite Regatta, held over the harbour in March?\nA: Port Averil\n\n"
    "Q: How many turbines does the Castellan Bay offshore wind farm have after its expansion?\nA: 112\n\n"
    "Q: Who was appointed chief executive of the Meridale Rail Company in the spring reshuffle?\nA: Ilse Varnholt\n\n"
)
# Besides the template's "Q:", strings the tiny model writes: "vel", and "lligZ" across two tokens, inside words
# ("Krelligvel"), where they end no answer; and "abo" at the start of " about", where it ends one inside a token.
STOPS = [*question_markers(TEMPLATE), "vel", "lligZ", "abo"]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def model_and_tokenizer():
    """The tiny model as transformers draws it from seed 42 (torch's generator; cbe draws its own with numpy): the
    random model these tests' stop strings and questions were picked for, its newline and EOS embeddings (tied to
    the LM head) enlarged so that some answers end at a newline or at EOS."""
    cbe_drawn, tokenizer = tiny_model()
    set_seed(42)
    model = Gemma3ForCausalLM(cbe_drawn.config).eval()
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


class DrawnTokens(LogitsProcessor):
    """Makes greedy `model.generate` the plain sampler to compare with: at each step only the token that the numpy
    reference draws from the step's logits, with each row's uniform for that answer position, is left."""

    def __init__(self, sampling: Sampling, uniforms: np.ndarray, prompt_length: int):
        self.sampling, self.uniforms, self.prompt_length = sampling, uniforms, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_length
        tokens = torch.from_numpy(draw(scores.numpy(), self.uniforms[:, step], self.sampling))
        only = torch.full_like(scores, -torch.inf)
        only[torch.arange(len(tokens)), tokens] = 0
        return only


class AnswerEndedCriteria(StoppingCriteria):
    """For `model.generate`: ends a row where cbe.backends.base.answer_ended ends its answer so far (a stop string
    that starts a word, or a newline after text), decoding the row's answer after every token."""

    def __init__(self, tokenizer, stops, prompt_length: int):
        self.tokenizer, self.stops, self.prompt_length = tokenizer, stops, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        answers = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor([answer_ended(answer, self.stops) for answer in answers])


@torch.no_grad()
def reference(
    model, tokenizer, prompts: list[str], batch_size: int, stops=STOPS, sampling: Sampling = GREEDY
) -> tuple[list[str], list[list[int]]]:
    """Today's eager path: `model.generate` on left-padded batches with EOS, the stop strings (where they start a
    word, as answer_ended says) and the newline rule; the answers and their generated ids (finished rows padded).
    Sampled: each token drawn by the numpy reference, prompt i with the uniforms of question i."""
    config = GenerationConfig(
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    newline = NewlineStop.of(tokenizer, model.config.get_text_config().vocab_size)
    texts, ids = [], []
    for start in range(0, len(prompts), batch_size):
        inputs = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True, padding_side="left")
        width = inputs["input_ids"].shape[1]
        criteria = StoppingCriteriaList(
            [NewlineStopCriteria(newline, width, torch.device("cpu")), AnswerEndedCriteria(tokenizer, stops, width)]
        )
        drawn = LogitsProcessorList()
        if not sampling.greedy:
            uniforms = sampling.uniforms(range(start, start + len(inputs["input_ids"])), NEW_TOKENS)
            drawn.append(DrawnTokens(sampling, uniforms, width))
        out = model.generate(
            **inputs, generation_config=config, tokenizer=tokenizer, stopping_criteria=criteria, logits_processor=drawn
        )
        texts += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        ids += out[:, width:].tolist()
    return texts, ids


def ours(model, tokenizer, prompts: list[str], batch_size: int, stops=STOPS, **sampled) -> list[str]:
    newline = NewlineStop.of(tokenizer, model.config.get_text_config().vocab_size)
    return decode_answers(
        model,
        tokenizer,
        prompts,
        max_new_tokens=NEW_TOKENS,
        batch_size=batch_size,
        stop_strings=stops,
        newline_stop=newline,
        **sampled,
    )


def test_answers_equal_model_generate_behind_the_news_prefix(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    questions = sample_questions()
    questions = questions[:13] + [questions[103], questions[115]]  # the last two end at EOS
    prompts = [NEWS_PREFIX + TEMPLATE.format(question=q) for q in questions]
    lengths = {len(tokenizer(p)["input_ids"]) for p in prompts}
    assert len(lengths) >= 3 and min(lengths) > model.config.sliding_window  # mixed, past the sliding window

    expected, ids = reference(model, tokenizer, prompts, batch_size=4)
    # The answers end every way (so each stop is compared): EOS, a newline, a stop string that starts a word (inside
    # a token), the token limit; and stop strings inside words ("Krelligvel", "merchantslligZ") end none of them.
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    assert sum(eos in row for row in ids) >= 2
    assert sum(text.endswith("\n") for text in expected) >= 1
    assert sum(text.endswith(" about") for text in expected) >= 2
    assert sum(("vel" in text or "lligZ" in text) and not text.endswith(" about") for text in expected) >= 4
    assert sum("lligZ" in text for text in expected) >= 1
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
    stops = question_markers(TEMPLATE)
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


@pytest.mark.parametrize("sampling", [Sampling(1.0, top_k=40, seed=5), Sampling(1.3, top_p=0.9, seed=6)], ids=str)
def test_sampled_answers_equal_model_generate_drawing_the_reference_tokens(model_and_tokenizer, sampling):
    """The static decoder's draws on the device, step by step, are the numpy reference's on `model.generate`'s
    logits: the same tokens, the same ends."""
    model, tokenizer = model_and_tokenizer
    prompts = [NEWS_PREFIX + TEMPLATE.format(question=q) for q in sample_questions()[:9]]
    expected, _ = reference(model, tokenizer, prompts, batch_size=4, sampling=sampling)
    assert len(set(expected)) == len(expected)  # noise, a different answer to every question...
    assert sum(text != greedy for text, greedy in zip(expected, ours(model, tokenizer, prompts, 4))) >= 8  # ...drawn
    assert ours(model, tokenizer, prompts, batch_size=4, sampling=sampling) == expected  # 9 prompts: the last padded


def test_sampled_answers_repeat_with_their_seed_in_any_batch_or_shard(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = [NEWS_PREFIX + TEMPLATE.format(question=q) for q in sample_questions()[:10]]
    sampling = Sampling(1.5, seed=1)
    first = ours(model, tokenizer, prompts, 4, sampling=sampling)
    assert ours(model, tokenizer, prompts, 4, sampling=sampling) == first
    assert ours(model, tokenizer, prompts, 3, sampling=sampling) == first  # other batches, other padding rows
    other_seed = ours(model, tokenizer, prompts, 4, sampling=Sampling(1.5, seed=2))
    assert sum(a != b for a, b in zip(first, other_seed)) >= 8
    # A torchrun rank's share draws as the one process did, given its questions' indices (and only then).
    share = ours(model, tokenizer, prompts[1::2], 4, sampling=sampling, question_ids=range(1, 10, 2))
    assert share == first[1::2]
    assert ours(model, tokenizer, prompts[1::2], 4, sampling=sampling) != first[1::2]


def test_each_rank_of_the_hf_backend_draws_its_questions_as_one_process(tmp_path, monkeypatch):
    """HFTrainer.generate as rank 1 of 2 (the gather stubbed with what rank 0 answers alone): all answers are the
    single process's."""
    backend, evaluator = build(compose_config("mode=eval", "checkpoint=base", "logging=none"), RunDir(tmp_path))
    backend.load("base")
    prompts = [evaluator.prompt(record) for record in evaluator.qa_sets["valqa"][:7]]
    sampling = Sampling(1.5, seed=9)
    alone = backend.generate(prompts, 8, 4, evaluator.stop_strings, sampling=sampling)
    assert len(set(alone)) == len(alone)

    def gather(parts, mine):  # rank 0 answers its share as the single process did
        parts[:] = [alone[0::2], mine]

    monkeypatch.setattr(hf_trainer.dist, "all_gather_object", gather)
    backend.rank, backend.world = 1, 2
    assert backend.generate(prompts, 8, 4, evaluator.stop_strings, sampling=sampling) == alone


@pytest.mark.parametrize(
    "sampling",
    [Sampling(1.0), Sampling(0.6, top_k=7), Sampling(1.7, top_p=0.8), Sampling(2.0, top_k=50, top_p=0.5)],
    ids=str,
)
def test_the_torch_draw_is_the_reference_draw(sampling):
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, (2000, 1024)).astype(np.float32)
    logits[1000:] = np.round(logits[1000:])  # many equal logits: ties go to the lower id
    u = rng.random(2000, dtype=np.float32)
    drawn = torch_draw(torch.from_numpy(logits), torch.from_numpy(u), sampling)[:, 0].numpy()
    assert np.array_equal(drawn, draw(logits, u, sampling))
