"""Reading eval_details files from either harness, for `cbe rescore` and `cbe judge`.

cbe writes one record per question with its question, ground_truth, supports and ids, prompt, raw and parsed
prediction and every metric. The benchmark's own harness writes exactly BENCHMARK_KEYS: no supports, and its
fuzzy_match is the substring rule, so its scores are replaced by ours on reading. `--qa FILE` joins supports and
ids back in from the QA file the questions came from, by question text. A file in a run's eval_details/ is parsed
again with the question marker of that run's prompt template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml

from cbe.data.jsonl import Fields, iter_jsonl, load_qa, strata_fields
from cbe.errors import UserError
from cbe.eval.evaluator import unescape
from cbe.eval.metrics import MATCHES, METRICS
from cbe.eval.parse import DEFAULT_MARKERS, question_markers
from cbe.run import RunDir

BENCHMARK_KEYS = frozenset(
    {"prompt", "question", "raw_prediction", "parsed_prediction", "ground_truth", "exact_match", "fuzzy_match"}
)
GOLD: Fields = {"ground_truth": (str, int, float)}


def with_our_matches(record: dict[str, Any]) -> dict[str, Any]:
    """A benchmark record scored by our rules from its parsed prediction (its fuzzy_match is our substring_match)."""
    if set(record) != BENCHMARK_KEYS or not isinstance(record["parsed_prediction"], str):
        return record
    gold = str(record["ground_truth"])
    return record | {name: METRICS[name](record["parsed_prediction"], gold) for name in MATCHES}


def load_details(
    path: str | Path, action: str, predictions: Sequence[str], required: Fields = GOLD
) -> list[dict[str, Any]]:
    """The records of either harness's details file, with `required` and a `predictions` string (empty: kept)."""
    records = [with_our_matches(r) for r in iter_jsonl(path, required)]
    for number, record in enumerate(records, 1):
        if not isinstance(next((record[f] for f in predictions if f in record), None), str):
            raise UserError(
                f"{path}: record {number} has no {' or '.join(predictions)} string; pass an "
                f"eval_details file of cbe or of the benchmark's harness"
            )
    if not records:
        raise UserError(f"{path}: no records to {action}")
    return records


def join_qa(
    records: Sequence[dict[str, Any]], qa_path: str | Path, details_path: str | Path
) -> tuple[list[dict[str, Any]], str | None]:
    """The records with the supports and ids of their question's (first) QA record, and a note on questions absent."""
    by_question: dict[str, dict[str, Any]] = {}
    for qa in load_qa(qa_path):
        by_question.setdefault(qa["question"].strip(), strata_fields(qa))
    joined = [record | by_question.get(str(record.get("question", "")).strip(), {}) for record in records]
    missing = sum(str(r.get("question", "")).strip() not in by_question for r in records)
    if missing == len(records):
        raise UserError(
            f"{qa_path}: none of the {len(records)} questions of {details_path} is in it; pass the QA "
            f"file those questions came from"
        )
    if not missing:
        return joined, None
    return joined, (
        f"{missing} of {len(records)} questions of {details_path} are not in {qa_path}: they count in every "
        f"summary but in no support stratum"
    )


def support_thresholds_for(
    records: Sequence[dict[str, Any]], thresholds: Sequence[int], details_path: str | Path
) -> tuple[list[int], str | None]:
    """The thresholds to stratify by: none, and a note, where no record has supports (n=0 would mislead)."""
    if thresholds and not any("supports" in r for r in records):
        return [], f"no supports in {details_path}; pass --qa QA_FILE to stratify by support"
    return list(thresholds), None


def markers_of(details_path: str | Path) -> list[str]:
    """The question markers of the prompt template of the run whose eval_details/ holds a file, else the default's."""
    run = RunDir.of_details(details_path)
    config = yaml.safe_load(run.config.read_text()) if run else None
    template = ((config or {}).get("eval") or {}).get("prompt_template")
    return question_markers(unescape(template)) if template else list(DEFAULT_MARKERS)
