"""Where a generated answer ends: at "Q:" or a newline after its first non-blank text, never at a leading newline."""

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from cbe.backends.base import NewlineStop, answer_ended
from cbe.backends.hf.generate import NewlineStopCriteria
from cbe.loop import lr_multiplier
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
    ],
)
def test_answer_ended(text, ended):
    assert answer_ended(text, ["Q:"]) is ended


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


# lr_multiplier(step, total_steps, warmup_fraction, schedule, end_fraction), every value worked out by hand.


def test_warmup_rises_linearly_from_one_over_the_warmup_steps_to_the_peak():
    # 10 steps, 30% warmup: 3 warmup steps at 1/3, 2/3 and 3/3 of the peak; then the (constant) schedule.
    assert [lr_multiplier(s, 10, 0.3, "constant", 0.0) for s in range(5)] == pytest.approx([1 / 3, 2 / 3, 1, 1, 1])
    # 5 steps, 40%: 2 warmup steps; a fraction under one step (5% of 4 steps) means no warmup at all.
    assert [lr_multiplier(s, 5, 0.4, "linear", 0.0) for s in range(2)] == pytest.approx([0.5, 1.0])
    assert lr_multiplier(0, 4, 0.05, "cosine", 0.0) == 1.0


def test_cosine_falls_from_the_peak_after_warmup_to_the_end_fraction():
    # 10 steps, 2 of warmup: the cosine runs over the 8 after it; cos(45 deg) = 0.70711.
    assert [lr_multiplier(s, 10, 0.2, "cosine", 0.0) for s in (0, 1, 2, 4, 6, 8, 10)] == pytest.approx(
        [0.5, 1.0, 1.0, (1 + 0.70711) / 2, 0.5, (1 - 0.70711) / 2, 0.0], abs=1e-5
    )
    # With an end fraction of 0.2 it falls to 0.2 of the peak: halfway is 0.2 + 0.8 x 0.5.
    assert [lr_multiplier(s, 10, 0.2, "cosine", 0.2) for s in (2, 6, 10)] == pytest.approx([1.0, 0.6, 0.2])


def test_linear_falls_in_equal_steps_and_stays_at_the_end_fraction():
    assert [lr_multiplier(s, 10, 0.0, "linear", 0.0) for s in (0, 1, 5, 9, 10, 12)] == pytest.approx(
        [1.0, 0.9, 0.5, 0.1, 0.0, 0.0]
    )
    # 5 steps, 2 of warmup, end 0.1: after warmup 1.0, then 0.1 + 0.9 x (2/3, 1/3).
    assert [lr_multiplier(s, 5, 0.4, "linear", 0.1) for s in range(5)] == pytest.approx([0.5, 1.0, 1.0, 0.7, 0.4])


def test_constant_holds_the_peak_whatever_the_end_fraction():
    assert [lr_multiplier(s, 10, 0.0, "constant", 0.1) for s in (0, 5, 9, 10)] == [1.0, 1.0, 1.0, 1.0]
