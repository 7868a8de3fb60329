"""Turn a raw generation into the model's answer (the benchmark's published convention)."""

from __future__ import annotations

import re
from typing import Callable, Sequence

QUESTION_MARKER = "Q:"


def marker_at_word_start(markers: Sequence[str]) -> re.Pattern[str]:
    """Where a question marker ("Q:") ends an answer: only where it starts a word, at the start of the text or
    after whitespace (a newline included), so "FAQ:" or "xQ:" is answer text. Case-sensitive: "q:" is text too."""
    return re.compile("|".join(rf"(?<!\S){re.escape(m)}" for m in markers if m) or r"(?!)")  # none: no match


def cut_at_marker(text: str, markers: Sequence[str] = (QUESTION_MARKER,)) -> str:
    """The text before the first marker that starts a word (all of it where none does)."""
    match = marker_at_word_start(markers).search(text)
    return text[: match.start()] if match else text


def parse_answer(raw: str) -> str:
    """Cut at a re-emitted question ("Q:" where it starts a word: not in "FAQ:"), keep the first non-empty line,
    strip spaces and one trailing period."""
    text = cut_at_marker(raw)
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return line[:-1].rstrip() if line.endswith(".") else line


# One parser per task, chosen by eval.parser. The tracks share the answer convention; finegrained_geminon
# also scores "types of" questions type by type (cbe.eval.metrics.score_answer), as the benchmark's parser
# of that name does.
PARSERS: dict[str, Callable[[str], str]] = {
    "default": parse_answer,
    "news": parse_answer,
    "geminon": parse_answer,
    "finegrained_geminon": parse_answer,
}
