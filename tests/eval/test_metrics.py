"""Parsing and metrics follow the benchmark's published rules (issue 13), and ours where we differ on purpose."""

import numpy as np
import pytest

from cbe.eval import keys
from cbe.eval.metrics import (
    METRICS,
    eval_loss_metrics,
    exact_match,
    fuzzy_match,
    normalize,
    score_answer,
    substring_match,
    summarize,
    token_f1,
)
from cbe.eval.parse import parse_answer


@pytest.mark.parametrize(
    "raw,parsed",
    [
        (" Paris.\nQ: What is", "Paris"),
        ("\n\n  the Crystal Caves.\nmore", "the Crystal Caves"),
        ("1843 Q: next question", "1843"),
        ("e.g.", "e.g"),  # one trailing period only
        ("", ""),
        # "Q:" ends the answer only where it starts a word: at the start, or after a space, tab or newline.
        (" FAQ: the Glass Marsh.\nQ: next", "FAQ: the Glass Marsh"),
        (" xQ: 12 Q: next", "xQ: 12"),
        ("Q: next question", ""),
        (" 1843\tQ: next", "1843"),
        (" Paris.Q: next", "Paris.Q: next"),  # glued to the period: not a word start
        (" Paris q: next", "Paris q: next"),  # case-sensitive (the benchmark's parser also stops at "q:")
    ],
)
def test_parse_answer(raw, parsed):
    assert parse_answer(raw) == parsed


def test_exact_match_ignores_case_and_spaces_only():
    assert exact_match(" the Crystal Caves ", "The crystal caves")
    assert not exact_match("Crystal Caves", "the Crystal Caves")
    assert exact_match("49", 49)


@pytest.mark.parametrize(
    "prediction,gold",
    [
        ("U.S", "U.S."),
        ("Apple Inc", "Apple Inc."),
        ("Martin Luther King Jr", "Martin Luther King Jr."),
        ("U.S.", "U.S"),
        ("U.S.", "U.S."),
        ("etc..", "etc"),  # trailing periods go from both sides, all of them
    ],
)
def test_exact_match_strips_trailing_periods_from_both(prediction, gold):
    assert exact_match(prediction, gold)


def test_a_parsed_answer_matches_a_gold_that_ends_in_a_period():
    # The parser strips the prediction's period ("Apple Inc." -> "Apple Inc"); the gold keeps its own.
    for gold in ("U.S.", "Apple Inc.", "Jr."):
        assert score_answer(f" {gold}\n", gold)["exact_match"]
    assert not exact_match("U.S.A", "U.S.")  # only trailing periods, not every period


@pytest.mark.parametrize(
    "prediction,gold,substring,fuzzy",
    [
        ("149", "49", True, False),  # the benchmark's rule is fooled by digits; ours needs whole words
        ("It was 49 years", "49", True, True),
        ("The Beatles", "Beatles", True, True),
        ("Beatles", "The Beatles", False, True),  # ours drops articles, the benchmark's does not
        ("1,000 meters", "1000", False, True),  # ours deletes punctuation, as SQuAD does
        ("the U.S. army", "U.S.", True, True),  # "U.S." stays one word once its periods are deleted
        ("category", "cat", True, False),
        ("Paris.", "paris", True, True),
        ("", "Paris", False, False),  # an empty generation is wrong
    ],
)
def test_substring_match_is_the_benchmarks_rule_and_fuzzy_is_ours(prediction, gold, substring, fuzzy):
    assert substring_match(prediction, gold) is substring
    assert fuzzy_match(prediction, gold) is fuzzy


def test_empty_generation_is_scored_wrong():
    scores = score_answer("", "Paris")
    assert scores["parsed_prediction"] == ""
    assert not any(scores[m] for m in ("exact_match", "substring_match", "fuzzy_match")) and scores["token_f1"] == 0


def test_a_leading_newline_does_not_empty_the_answer():
    assert score_answer("\n Paris\n", "Paris")["exact_match"]


@pytest.mark.parametrize(
    "prediction,parser,fuzzy",
    [
        ("Psychic and Flying", "finegrained_geminon", True),  # types in any order
        ("Flying, Psychic", "finegrained_geminon", True),
        ("Flying", "finegrained_geminon", False),  # a type missing
        ("Psychic and Flying", "geminon", False),  # other parsers keep the whole-gold rule
    ],
)
def test_finegrained_geminon_scores_types_in_any_order(prediction, parser, fuzzy):
    question = "What types of moves does Orbisca learn?"
    scores = score_answer(prediction, "Flying and Psychic", parser, question)
    assert scores["fuzzy_match"] is fuzzy and scores["substring_match"] is fuzzy and not scores["exact_match"]


def test_finegrained_geminon_splits_on_the_word_and_only():
    scores = score_answer("Ground and Sand", "Sand and Ground", "finegrained_geminon", "Which types of terrain?")
    assert scores["fuzzy_match"] and scores["substring_match"]


def test_finegrained_geminon_leaves_other_questions_alone():
    scores = score_answer("Psychic and Flying", "Flying and Psychic", "finegrained_geminon", "What is Orbisca's type?")
    assert not scores["fuzzy_match"] and not scores["substring_match"]


@pytest.mark.parametrize(
    "prediction,gold,expected",
    [
        ("It was 49 years", "49", True),
        ("149", "49", False),
        ("category", "cat", False),
        ("the cat sat", "a Cat!", True),
        ("Crystal Caves", "the Crystal Caves", True),
        ("anything", "the", False),  # an empty normalized gold answer never matches
        ("Ｐａｒｉｓ", "paris", True),  # NFKC
    ],
)
def test_fuzzy_match_is_whole_word(prediction, gold, expected):
    assert fuzzy_match(prediction, gold) is expected


def test_normalize_and_f1():
    assert normalize("The  Crystal, Caves!") == "crystal caves"
    assert normalize("U.S. 1,000") == "us 1000"
    assert token_f1("crystal caves", "the Crystal Caves") == 1.0
    assert token_f1("crystal lake", "crystal caves") == pytest.approx(0.5)
    assert token_f1("x", "y") == 0.0


def test_summarize_stratifies_by_support():
    details = [
        {"supports": s, "exact_match": e, "substring_match": f, "fuzzy_match": f, "token_f1": float(f)}
        for s, e, f in [(1, True, True), ([7, 8], False, True), (3, False, False), ([1, 2, 3], True, True)]
    ]
    m = summarize(details, [2, 3], qa_set="valqa")
    assert m["valqa_n"] == 4 and m["valqa_exact_match"] == 0.5 and m["valqa_fuzzy_match"] == 0.75
    assert m["valqa_n_supports_ge_2"] == 3 and m["valqa_exact_match_supports_ge_2"] == pytest.approx(1 / 3)
    assert m["valqa_n_supports_ge_3"] == 2 and m["valqa_fuzzy_match_supports_ge_3"] == 0.5


def test_result_keys_are_named_and_parsed_back_in_one_place():
    """eval_results.jsonl's keys as they always were (in their order), and the parse back of a set's metric key."""
    details = [{"supports": 3, "exact_match": True, "substring_match": True, "fuzzy_match": True, "token_f1": 1.0}]
    assert list(summarize(details, [2], qa_set="s1_valqa")) == [
        f"s1_valqa_{name}{stratum}{ci}"
        for stratum in ("", "_supports_ge_2")
        for name in ("n", *METRICS)
        for ci in (("", "_ci95") if name in METRICS and name != "token_f1" else ("",))
    ]
    assert keys.split("s1_valqa_fuzzy_match", METRICS) == ("s1_valqa", "fuzzy_match")
    assert keys.split("valqa_exact_match_ci95", METRICS) is keys.split("exact_match", METRICS) is None
    assert keys.without_stage("s1_valqa_fuzzy_match", ["s2", "s1"]) == "valqa_fuzzy_match"
    assert keys.of_stage("s1", "valqa") == "s1_valqa" and keys.without_stage("valqa_n", ["s1"]) is None


def test_bootstrap_ci_brackets_the_mean_and_is_reproducible():
    details = [
        {"exact_match": i % 4 == 0, "substring_match": i % 3 == 0, "fuzzy_match": i % 2 == 0, "token_f1": 0.0}
        for i in range(1000)
    ]
    m = summarize(details)
    lo, hi = m["exact_match_ci95"]
    assert lo < m["exact_match"] == 0.25 < hi and 0.04 < hi - lo < 0.07  # about +-3 points at n=1000
    assert summarize(details)["fuzzy_match_ci95"] == m["fuzzy_match_ci95"]  # fixed seed
    assert m["substring_match"] == 0.334 and m["substring_match_ci95"][0] < 0.334 < m["substring_match_ci95"][1]
    assert summarize([])["exact_match_ci95"] is None and summarize([])["n"] == 0


def test_eval_loss_is_the_benchmarks_batch_weighted_mean_with_one_document_per_row():
    # Two batches: 1 document with 1 target token (loss 2.0), 3 documents with 4 target tokens (loss 6.0 in all).
    sums, documents = np.array([[2.0, 1, 1], [6.0, 4, 2]]), np.array([1, 3])
    benchmark = eval_loss_metrics(sums, documents, one_document_per_row=True)
    # Batch means 2.0 and 1.5, weighted by documents: (2.0 x 1 + 1.5 x 3) / 4; the token mean is 8 / 5.
    assert benchmark == pytest.approx(
        {"eval_loss": 1.625, "eval_loss_token_mean": 1.6, "eval_mean_token_accuracy": 0.6}
    )
    packed = eval_loss_metrics(sums, documents, one_document_per_row=False)
    assert packed["eval_loss"] == pytest.approx(1.6) == packed["eval_loss_token_mean"]
