"""Turn a raw generation into the model's answer (the benchmark's published convention)."""

from __future__ import annotations

import re
from typing import Callable, Sequence


def question_markers(template: str) -> list[str]:
    """Where an answer ends: the template's text before the question ("Q:" of "Q: {question}\\nA:"), if any."""
    marker = template.split("{question}")[0].strip()
    return [marker] if marker else []


DEFAULT_MARKERS = question_markers("Q: {question}\nA:")  # those of eval.prompt_template's default (cbe.config)


def marker_at_word_start(markers: Sequence[str]) -> re.Pattern[str]:
    """Where a question marker ("Q:") ends an answer: only where it starts a word, at the start of the text or
    after whitespace (a newline included), so "FAQ:" or "xQ:" is answer text. Case-sensitive: "q:" is text too."""
    return re.compile("|".join(rf"(?<!\S){re.escape(m)}" for m in markers if m) or r"(?!)")  # none: no match


def parse_answer(raw: str, markers: Sequence[str] = DEFAULT_MARKERS) -> str:
    """Cut at a re-emitted question (a marker starting a word), keep the first non-empty line, strip one period."""
    match = marker_at_word_start(markers).search(raw)
    text = raw[: match.start()] if match else raw
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return line[:-1].rstrip() if line.endswith(".") else line


# One parser per task, chosen by eval.parser, given a raw answer and the template's question markers. The tracks share
# the answer convention; finegrained_geminon also scores "types of" questions type by type (score_answer).
PARSERS: dict[str, Callable[[str, Sequence[str]], str]] = dict.fromkeys(
    ("default", "news", "geminon", "finegrained_geminon"), parse_answer
)
