"""Where a generated answer ends: at "Q:" or a newline after its first non-blank text, never at a leading newline."""

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from cbe.backends.base import NewlineStop, answer_ended
from cbe.backends.hf.trainer import NewlineStopCriteria
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
    assert answer_ended(text) is ended


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
