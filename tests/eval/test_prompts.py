"""The few-shot prefixes of conf/prompts/ are ours (invented facts) in the benchmark's shape: a statement as the first
line, `Q: ...\nA: ...` examples whose answers end with a period, and for geminon one example of each question type,
its weight in pounds and its "types of" answer as "X and Y" (the finegrained_geminon parser's split)."""

import re

import pytest
from omegaconf import OmegaConf

from cbe.eval.metrics import gold_types, score_answer
from cbe.eval.parse import parse_answer
from tests.conftest import ROOT


def prefix_of(task: str) -> tuple[str, list[tuple[str, str]]]:
    """The first line of a task's prefix file and its (question, answer) examples."""
    path = OmegaConf.load(ROOT / "conf" / "task" / f"{task}.yaml").eval.prompt_prefix_file
    first, _, rest = (ROOT / path).read_text(encoding="utf-8").partition("\n\n")
    examples = [re.fullmatch(r"Q: ([^\n]+)\nA: ([^\n]+)", block.strip("\n")) for block in rest.split("\n\n")]
    assert all(examples), rest
    return first, [m.groups() for m in examples]


@pytest.mark.parametrize("task,count", [("news", 3), ("geminon", 7)])
def test_a_statement_then_examples_whose_answers_end_with_a_period(task, count):
    first, examples = prefix_of(task)
    assert "\n" not in first and not re.match(r"[QA]:", first) and first.endswith(".") and "?" not in first
    assert len(examples) == count
    for question, answer in examples:
        assert question.endswith("?") and answer.endswith(".") and not answer.endswith(".."), (question, answer)
        assert parse_answer(f" {answer}\n\nQ: {question}") == answer[:-1]  # the period is not part of the answer


# Geminon's question types, each as its question and the answer it needs.
GEMINON_TYPES = {
    "base stat": (r"\bbase (HP|Attack|Defense|Sp\. Atk|Sp\. Def|Speed)\b", r"\d+\."),
    "height in metres": (r"\b(tall|height)\b.*\bmetres\b", r"\d+(\.\d+)?\."),
    "weight in pounds": (r"\bweigh(t)?\b.*\bpounds\b", r"\d+(\.\d+)?\."),
    "classification": (r"\bclassification\b", r"[A-Z][\w ]+\."),
    "types of": (r"\btypes of\b", r"[A-Z]\w+ and [A-Z]\w+\."),
    "moves": (r"\bmoves?\b", r"[A-Z][\w ]+\."),
}


@pytest.mark.parametrize("kind", GEMINON_TYPES)
def test_geminon_has_an_example_of_every_question_type(kind):
    question_pattern, answer_pattern = GEMINON_TYPES[kind]
    _, examples = prefix_of("geminon")
    found = [(q, a) for q, a in examples if re.search(question_pattern, q)]
    assert found, f"no {kind} question in {[q for q, _ in examples]}"
    assert all(re.fullmatch(answer_pattern, a) for _, a in found), found


def test_geminon_primes_pounds_not_kilograms_and_types_as_x_and_y():
    _, examples = prefix_of("geminon")
    text = " ".join(q for q, _ in examples).lower()
    assert "kilogram" not in text and " kg" not in text
    [(question, answer)] = [(q, a) for q, a in examples if "types of" in q.lower()]
    gold = parse_answer(f" {answer}\n")
    assert len(gold_types(gold)) == 2  # split on "and", as finegrained_geminon scores it
    reversed_types = " and ".join(reversed(gold_types(gold)))
    assert score_answer(f" {reversed_types}.\n", gold, "finegrained_geminon", question)["fuzzy_match"]
