"""Where a generated answer ends: at "Q:" where it starts a word or a newline after its first non-blank text, never at a
leading newline."""

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from cbe.backends.base import NewlineStop, answer_ended
from cbe.backends.hf.generate import AnswerEnds, NewlineStopCriteria
from cbe.eval.parse import parse_answer
from cbe.plan import lr_multiplier
from tests.conftest import ROOT


@pytest.mark.parametrize(
    "text,ended",
    [
        ("\n", False),
        ("\n \n", False),
        ("\nParis", False),
        ("\nParis\n", True),
        ("Paris\n", True),
        (" Paris Q:", True),
        ("Paris", False),
        ("", False),
        # The stop string ends an answer only where it starts a word (as cbe.eval.parse cuts).
        ("Q:", True),
        (" The FAQ:", False),
        (" xQ: more", False),
        (" xQ: more\tQ:", True),
        (" q: more", False),
    ],
)
def test_answer_ended(text, ended):
    assert answer_ended(text, ["Q:"]) is ended


@pytest.mark.parametrize(
    "raw", [" FAQ: the Glass Marsh Q: next", " Paris\nQ: next", " xQ: 12\n", "Q: at once", " 1843 Q:Q: twice"]
)
def test_the_answer_ends_where_the_parser_cuts(raw):
    """The shortest prefix that answer_ended calls complete parses as the whole generation does: generation stops no
    earlier than the parser would cut, and the stop it makes is the parser's."""
    end = next((n for n in range(1, len(raw) + 1) if answer_ended(raw[:n], ["Q:"])), len(raw))
    assert parse_answer(raw[:end]) == parse_answer(raw)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ROOT / "cbe" / "assets" / "tiny_tokenizer")


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_newline_stop_keeps_an_answer_after_leading_newlines(tokenizer):
    stop = NewlineStop.of(tokenizer)
    generated = ids(tokenizer, "\n\n Paris\nQ: next")
    kept = generated[: stop.end(generated, tokenizer.eos_token_id)]
    assert tokenizer.decode(kept) == "\n\n Paris\n"
    assert stop.end(ids(tokenizer, "\n \n"), tokenizer.eos_token_id) == 3  # blank to the end: all of it
    assert stop.end([*ids(tokenizer, "\n"), tokenizer.eos_token_id, 5], tokenizer.eos_token_id) == 2


def test_a_token_with_text_before_its_newline_ends_the_answer_alone():
    # Tokens 0..3: "\n", " Paris", " Paris\n", "  " (some tokenizers merge text and newline into one token).
    stop = NewlineStop(
        newline=np.array([True, False, True, False]),
        ends_alone=np.array([False, False, True, False]),
        blank=np.array([True, False, False, True]),
    )
    assert stop.end([0, 2, 1], eos_id=9) == 2
    assert stop.end([0, 3, 0, 1, 0], eos_id=9) == 5


def test_hf_stopping_criteria_follows_the_same_rule(tokenizer):
    stop = NewlineStop.of(tokenizer, vocab_size=len(tokenizer) + 4)  # a model's padded vocab
    assert len(stop.newline) == len(tokenizer) + 4 and not stop.blank[-1]
    prompt = ids(tokenizer, "Q: Where?\nA:")
    criteria = NewlineStopCriteria(stop, len(prompt), torch.device("cpu"))
    rows = [ids(tokenizer, "\n Par"), ids(tokenizer, " Par\n\n"), ids(tokenizer, "\n\n\n")[:3]]
    width = max(map(len, rows))
    batch = torch.tensor([prompt + row + [0] * (width - len(row)) for row in rows])  # pad id 0 is blank
    assert criteria(batch, None).tolist() == [False, True, False]


@pytest.mark.parametrize(
    "generated,kept",
    [
        (" FAQ: the Marsh Q: next", " FAQ: the Marsh Q:"),  # "Q:" inside "FAQ:" is text; " Q:" ends it
        (" xQ: 12 and more", " xQ: 12 and more"),  # never a word start: the whole generation, not ended
        ("Q: at once", "Q:"),
        (" Paris\nFAQ: next", " Paris\n"),  # the newline first
    ],
)
def test_the_fast_decoders_ends_follow_answer_ended(tokenizer, generated, kept):
    """cbe.backends.hf.generate's host-side ends (StopStringCriteria's matches, kept where the stop string starts a
    word) cut where answer_ended does."""
    ends = AnswerEnds(tokenizer, ["Q:"], NewlineStop.of(tokenizer))
    row = np.array([ids(tokenizer, generated)])
    tails = np.full((1, ends.context), tokenizer.pad_token_id)
    (n,), (ended,) = ends(tails, row)
    assert tokenizer.decode(row[0, :n]) == kept
    assert ended == answer_ended(generated, ["Q:"])


# The benchmark's schedule is transformers' (its Trainer's): lr_multiplier is compared with transformers' own
# schedulers, stepped as its Trainer steps them, with its Trainer's warmup steps for warmup_fraction.


def transformers_multipliers(make_scheduler, steps: int, warmup_fraction: float, tmp_path) -> list[float]:
    from transformers import TrainingArguments

    warmup = TrainingArguments(output_dir=str(tmp_path), warmup_steps=warmup_fraction).get_warmup_steps(steps)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, warmup, steps)
    multipliers = []
    for _ in range(steps):
        multipliers.append(optimizer.param_groups[0]["lr"])  # the lr this optimizer step runs at
        optimizer.step()
        scheduler.step()
    return multipliers


SCHEDULE_CASES = [(10, 0.1), (30, 0.1), (7, 0.3), (4, 0.0), (200, 0.05), (33, 0.2)]


@pytest.mark.parametrize("steps,warmup", SCHEDULE_CASES)
def test_cosine_and_linear_are_transformers_schedules_step_by_step(steps, warmup, tmp_path):
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    for schedule, make in (("cosine", get_cosine_schedule_with_warmup), ("linear", get_linear_schedule_with_warmup)):
        expected = transformers_multipliers(make, steps, warmup, tmp_path)
        ours = [lr_multiplier(s, steps, warmup, schedule, 0.0) for s in range(steps)]
        assert ours == pytest.approx(expected, abs=1e-12), schedule
    if warmup:
        assert lr_multiplier(0, steps, warmup, "cosine", 0.0) == 0.0  # the first step trains at lr 0


@pytest.mark.parametrize("steps,warmup", SCHEDULE_CASES)
def test_end_fraction_and_constant_are_transformers_schedules(steps, warmup, tmp_path):
    from transformers import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

    def cosine_to_a_fifth(optimizer, warmup_steps, total):
        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup_steps, total, min_lr_rate=0.2)

    expected = transformers_multipliers(cosine_to_a_fifth, steps, warmup, tmp_path)
    assert [lr_multiplier(s, steps, warmup, "cosine", 0.2) for s in range(steps)] == pytest.approx(expected, abs=1e-12)
    expected = transformers_multipliers(
        lambda optimizer, w, _: get_constant_schedule_with_warmup(optimizer, w), steps, warmup, tmp_path
    )
    assert [lr_multiplier(s, steps, warmup, "constant", 0.0) for s in range(steps)] == pytest.approx(expected)
