"""The names of result keys, and their parse back: a QA set's metric `<set>_<metric>` (`_supports_ge_<k>` for a
support stratum, `_ci95` for a CI, metric `n` for its count), a stage's sets `<stage>_valqa` and `<stage>_testqa`,
and the retention set's name."""

from __future__ import annotations

from typing import Iterable

KINDS = ("valqa", "testqa")  # a task's QA sets, and each stage's
RETENTION = "retention"  # the QA set of continual.retention_qa_path


def metric_key(qa_set: str | None, metric: str, supports_ge: int | None = None) -> str:
    """`<set>_<metric>` (the metric alone without a set), with `_supports_ge_<k>` for the questions of >= k supports."""
    key = f"{qa_set}_{metric}" if qa_set else metric
    return key if supports_ge is None else f"{key}_supports_ge_{supports_ge}"


def ci95(key: str) -> str:
    """The key of a number's 95% CI: valqa_exact_match_ci95, acc_ci95."""
    return f"{key}_ci95"


def of_stage(stage: str, name: str) -> str:
    """A stage's own QA set or key: valqa -> s1_valqa, valqa_fuzzy_match -> s1_valqa_fuzzy_match."""
    return f"{stage}_{name}"


def without_stage(key: str, stages: Iterable[str]) -> str | None:
    """A stage's key without its stage (s1_valqa_fuzzy_match -> valqa_fuzzy_match), None for another key."""
    return next((key[len(stage) + 1 :] for stage in stages if key.startswith(f"{stage}_")), None)


def split(key: str, metrics: Iterable[str]) -> tuple[str, str] | None:
    """(set, metric) of a `<set>_<metric>` key whose metric is one of `metrics`, None for another key."""
    return next(((key[: -len(m) - 1], m) for m in metrics if key.endswith(f"_{m}")), None)
