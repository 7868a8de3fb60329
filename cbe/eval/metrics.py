"""QA metrics: exact match, whole-word fuzzy match and token F1 (SQuAD normalization), stratified by support."""
from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np

from cbe.data.jsonl import support_count

_PUNCTUATION = set(string.punctuation) | {"\u2018", "\u2019", "\u201c", "\u201d", "\u2013", "\u2014"}
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """SQuAD normalization: lowercase, Unicode NFKC, no punctuation, no articles, single spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if ch in _PUNCTUATION else ch for ch in text)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> bool:
    """The parsed prediction equals the gold answer, ignoring case and surrounding spaces."""
    return prediction.strip().lower() == str(gold).strip().lower()


def fuzzy_match(prediction: str, gold: str) -> bool:
    """The normalized gold answer occurs in the normalized prediction as a whole-word sequence."""
    gold_words, pred_words = normalize(str(gold)).split(), normalize(prediction).split()
    if not gold_words:
        return False
    n = len(gold_words)
    return any(pred_words[i:i + n] == gold_words for i in range(len(pred_words) - n + 1))


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1 between the normalized prediction and gold answer."""
    pred, ref = normalize(prediction).split(), normalize(str(gold)).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or not common:
        return float(not pred and not ref)
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


METRICS = {"exact_match": exact_match, "fuzzy_match": fuzzy_match, "token_f1": token_f1}


def score_answer(raw_prediction: str, gold: str, parse: Callable[[str], str]) -> dict[str, Any]:
    """The parsed prediction and every metric for one question."""
    parsed = parse(raw_prediction)
    return {"parsed_prediction": parsed, **{name: metric(parsed, gold) for name, metric in METRICS.items()}}


def bootstrap_ci95(values: Sequence[float], resamples: int = 1000, seed: int = 0) -> list[float] | None:
    """95% bootstrap interval of a mean (percentile method, fixed seed, so the same details give the same CI)."""
    if not len(values):
        return None
    rng = np.random.default_rng(seed)
    means = np.asarray(values, dtype=float)[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def summarize(details: Sequence[dict[str, Any]], support_thresholds: Sequence[int] = (),
              prefix: str = "") -> dict[str, Any]:
    """Mean of each metric over scored records, with 95% CIs for exact and fuzzy match, overall and for
    records with supports >= k. Keys are `<prefix><metric>`, e.g. prefix "valqa_" gives valqa_exact_match."""
    def means(records, suffix=""):
        out: dict[str, Any] = {f"{prefix}n{suffix}": len(records)}
        for name in METRICS:
            values = [float(r[name]) for r in records]
            out[f"{prefix}{name}{suffix}"] = sum(values) / len(values) if values else None
            if name in ("exact_match", "fuzzy_match"):
                out[f"{prefix}{name}{suffix}_ci95"] = bootstrap_ci95(values)
        return out

    metrics = means(details)
    for k in support_thresholds:
        metrics |= means([r for r in details if support_count(r) >= k], f"_supports_ge_{k}")
    return metrics
