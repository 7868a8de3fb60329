"""One loader for every JSONL file the harness reads, with file:line errors a user can act on."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

from cbe.errors import UserError

Fields = dict[str, tuple[type, ...]]

# Fields each kind of file must carry, and the types they may have.
CORPUS_FIELDS: Fields = {"text": (str,)}
QA_FIELDS: Fields = {"question": (str,), "answer": (str, int, float)}
# Checked when present: news QA lists the supporting article ids, the sample track counts them.
OPTIONAL_FIELDS: Fields = {"supports": (int, list)}
# A QA record's fields that name it (geminon_idx, geminon_name, an id).
ID_FIELD = re.compile(r"(.*_)?(id|idx|name)")


def strata_fields(record: dict[str, Any]) -> dict[str, Any]:
    """What details keep of a QA record besides question and answer: its supports and ids, for strata and joins."""
    return {k: v for k, v in record.items() if k == "supports" or ID_FIELD.fullmatch(k)}


def parse_record(line: str | bytes, where: str, required: Fields) -> dict[str, Any]:
    """One JSONL line (bytes: UTF-8) as a record with the `required` fields; UserError naming `where` if not."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8").removeprefix("\ufeff")  # a BOM some editors put at the start
        except UnicodeDecodeError as e:
            raise UserError(f"{where}: not valid UTF-8 (byte {e.start}); fix or remove the line") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); fix or remove the line")
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for name, types in {**required, **OPTIONAL_FIELDS}.items():
        if name not in record:
            if name in required:
                raise UserError(f"{where}: missing field {name!r} (has {', '.join(sorted(record)) or 'nothing'})")
            continue
        value = record[name]
        if not isinstance(value, types) or isinstance(value, bool):
            expected = " or ".join(t.__name__ for t in types)
            raise UserError(f"{where}: field {name!r} should be {expected}, got {type(value).__name__} {value!r:.40}")
        if isinstance(value, str) and not value.strip() and name in required:
            raise UserError(f"{where}: field {name!r} is empty")
    return record


def iter_jsonl(path: str | Path, required: Fields, name: str | None = None) -> Iterator[dict[str, Any]]:
    """Stream the records of `path`, each checked by parse_record; errors name the file `name` (default: its path)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if line.strip():
                yield parse_record(line, f"{name or path}:{line_number}", required)


def support_count(record: dict[str, Any]) -> int:
    """How many corpus articles support a QA record (a count, or the length of a list of article ids)."""
    supports = record.get("supports", 0)
    return len(supports) if isinstance(supports, list) else supports


def load_corpus(path: str | Path) -> list[dict[str, Any]]:
    """A training or validation corpus: records with a non-empty `text`."""
    return list(iter_jsonl(path, CORPUS_FIELDS))


def load_qa(path: str | Path) -> list[dict[str, Any]]:
    """A QA set: records with `question` and `answer` (answers become strings, as some geminon answers are ints)."""
    return [{**r, "answer": str(r["answer"])} for r in iter_jsonl(path, QA_FIELDS)]
