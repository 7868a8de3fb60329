"""QA metrics, pure functions over strings, stratified by support.

exact_match is the benchmark's rule, substring_match its fuzzy rule. That one is wrong on numbers ("49" is in "149"),
so our fuzzy_match (the gold's whole words, SQuAD-normalized) is reported beside it rather than instead of it.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from typing import Any, Sequence

import numpy as np

from cbe.data.jsonl import support_count
from cbe.eval import keys
from cbe.eval.parse import DEFAULT_MARKERS, PARSERS

_PUNCTUATION = set(string.punctuation) | {"\u2018", "\u2019", "\u201c", "\u201d", "\u2013", "\u2014"}
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """SQuAD normalization: lowercase, Unicode NFKC, no punctuation, no articles, single spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    # Deleted, not replaced by a space (as SQuAD does): "1,000" is "1000" and "U.S." one word "us".
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_exact(text: str) -> str:
    """The benchmark's normalization for exact match: trimmed, lowercased, trailing periods stripped."""
    return str(text).strip().lower().rstrip(".")


def exact_match(prediction: str, gold: str) -> bool:
    """The prediction equals the gold answer up to case, surrounding spaces and trailing periods ("U.S." = "U.S")."""
    return normalize_exact(prediction) == normalize_exact(gold)


def substring_match(prediction: str, gold: str) -> bool:
    """The benchmark's fuzzy match: an exact match, or the normalized gold inside the normalized prediction."""
    pred, ref = normalize_exact(prediction), normalize_exact(gold)
    return pred == ref or (bool(ref) and ref in pred)


def fuzzy_match(prediction: str, gold: str) -> bool:
    """The normalized gold answer occurs in the normalized prediction as a whole-word sequence."""
    gold_words, pred_words = normalize(str(gold)).split(), normalize(prediction).split()
    if not gold_words:
        return False
    n = len(gold_words)
    return any(pred_words[i : i + n] == gold_words for i in range(len(pred_words) - n + 1))


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1 between the normalized prediction and gold answer."""
    pred, ref = normalize(prediction).split(), normalize(str(gold)).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or not common:
        return float(not pred and not ref)
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


METRICS = {metric.__name__: metric for metric in (exact_match, substring_match, fuzzy_match, token_f1)}
MATCHES = ("exact_match", "substring_match", "fuzzy_match")  # the yes/no metrics, reported with 95% CIs


def gold_types(gold: str) -> list[str]:
    """The types a "types of" gold answer lists: split on the word "and" ("Flying and Psychic")."""
    return [part.strip() for part in re.split(r"\band\b", str(gold), flags=re.IGNORECASE) if part.strip()]


def score_answer(
    raw: str, gold: str, parser: str = "default", question: str = "", markers: Sequence[str] = DEFAULT_MARKERS
) -> dict[str, Any]:
    """The parsed prediction (cut at the template's question `markers`) and every metric for one question."""
    parsed = PARSERS[parser](raw, markers)
    scores = {name: metric(parsed, gold) for name, metric in METRICS.items()}
    if parser == "finegrained_geminon" and "types of" in question.lower():
        types = gold_types(gold)
        for name in ("substring_match", "fuzzy_match"):
            scores[name] = scores["exact_match"] or all(METRICS[name](parsed, t) for t in types)
    return {"parsed_prediction": parsed, **scores}


def eval_loss_metrics(sums: np.ndarray, rows_per_batch: np.ndarray, one_document_per_row: bool) -> dict[str, float]:
    """The eval-loss metrics of per-batch sums ([batches, 3]: summed token loss, trained tokens, top-1 tokens).

    `eval_loss` with one document per row is the benchmark's: each batch's token mean, the batches averaged weighted
    by their documents (as transformers' Trainer averages per-batch losses); with packed rows, the token mean.
    `eval_loss_token_mean` is the token mean in both layouts, `eval_mean_token_accuracy` the share of trained tokens
    that are the model's top-1 prediction."""
    loss, tokens, top1 = np.asarray(sums, dtype=np.float64).T
    counted = tokens > 0  # a batch of one-token documents trains nothing and has no mean
    token_mean = float(loss.sum() / max(1.0, tokens.sum()))
    weights = np.asarray(rows_per_batch, dtype=np.float64)[counted]
    batch_means = loss[counted] / tokens[counted]
    benchmark = float((batch_means * weights).sum() / weights.sum()) if counted.any() else 0.0
    return {
        "eval_loss": benchmark if one_document_per_row else token_mean,
        "eval_loss_token_mean": token_mean,
        "eval_mean_token_accuracy": float(top1.sum() / max(1.0, tokens.sum())),
    }


def bootstrap_ci95(values: Sequence[float], resamples: int = 1000, seed: int = 0) -> list[float] | None:
    """95% bootstrap interval of a mean (percentile method, fixed seed, so the same details give the same CI)."""
    if not len(values):
        return None
    rng = np.random.default_rng(seed)
    means = np.asarray(values, dtype=float)[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def summarize(
    details: Sequence[dict[str, Any]], support_thresholds: Sequence[int] = (), qa_set: str | None = None
) -> dict[str, Any]:
    """Mean of each metric, CIs for the matches, over all records and those of supports >= k, keyed by cbe.eval.keys."""

    def means(records, k=None):
        out: dict[str, Any] = {keys.metric_key(qa_set, "n", k): len(records)}
        for name in METRICS:
            values, key = [float(r[name]) for r in records], keys.metric_key(qa_set, name, k)
            out[key] = sum(values) / len(values) if values else None
            if name in MATCHES:
                out[keys.ci95(key)] = bootstrap_ci95(values)
        return out

    metrics = means(details)
    for k in support_thresholds:
        metrics |= means([r for r in details if support_count(r) >= k], k)
    return metrics
