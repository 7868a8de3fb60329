"""Turn a raw generation into the model's answer (the benchmark's published convention)."""

from __future__ import annotations

from typing import Callable


def parse_answer(raw: str) -> str:
    """Cut at a re-emitted question ("Q:"), keep the first non-empty line, strip spaces and one trailing period."""
    text = raw.split("Q:", 1)[0]
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
