"""Parsing and metrics follow the benchmark's rules exactly."""
import pytest

from cbe.eval.metrics import exact_match, fuzzy_match, normalize, summarize, token_f1
from cbe.eval.parse import parse_answer


@pytest.mark.parametrize("raw,parsed", [
    (" Paris.\nQ: What is", "Paris"),
    ("\n\n  the Crystal Caves.\nmore", "the Crystal Caves"),
    ("1843 Q: next question", "1843"),
    ("e.g.", "e.g"),  # one trailing period only
    ("", ""),
])
def test_parse_answer(raw, parsed):
    assert parse_answer(raw) == parsed


def test_exact_match_ignores_case_and_spaces_only():
    assert exact_match(" the Crystal Caves ", "The crystal caves")
    assert not exact_match("Crystal Caves", "the Crystal Caves")
    assert exact_match("49", 49)


@pytest.mark.parametrize("prediction,gold,expected", [
    ("It was 49 years", "49", True),
    ("149", "49", False),
    ("category", "cat", False),
    ("the cat sat", "a Cat!", True),
    ("Crystal Caves", "the Crystal Caves", True),
    ("anything", "the", False),  # an empty normalized gold answer never matches
    ("Ｐａｒｉｓ", "paris", True),  # NFKC
])
def test_fuzzy_match_is_whole_word(prediction, gold, expected):
    assert fuzzy_match(prediction, gold) is expected


def test_normalize_and_f1():
    assert normalize("The  Crystal, Caves!") == "crystal caves"
    assert token_f1("crystal caves", "the Crystal Caves") == 1.0
    assert token_f1("crystal lake", "crystal caves") == pytest.approx(0.5)
    assert token_f1("x", "y") == 0.0


def test_summarize_stratifies_by_support():
    details = [{"supports": s, "exact_match": e, "fuzzy_match": f, "token_f1": float(f)}
               for s, e, f in [(1, True, True), ([7, 8], False, True), (3, False, False), ([1, 2, 3], True, True)]]
    m = summarize(details, [2, 3], prefix="valqa_")
    assert m["valqa_n"] == 4 and m["valqa_exact_match"] == 0.5 and m["valqa_fuzzy_match"] == 0.75
    assert m["valqa_n_supports_ge_2"] == 3 and m["valqa_exact_match_supports_ge_2"] == pytest.approx(1 / 3)
    assert m["valqa_n_supports_ge_3"] == 2 and m["valqa_fuzzy_match_supports_ge_3"] == 0.5


def test_bootstrap_ci_brackets_the_mean_and_is_reproducible():
    details = [{"exact_match": i % 4 == 0, "fuzzy_match": i % 2 == 0, "token_f1": 0.0} for i in range(1000)]
    m = summarize(details)
    lo, hi = m["exact_match_ci95"]
    assert lo < m["exact_match"] == 0.25 < hi and 0.04 < hi - lo < 0.07  # about +-3 points at n=1000
    assert summarize(details)["fuzzy_match_ci95"] == m["fuzzy_match_ci95"]  # fixed seed
    assert summarize([])["exact_match_ci95"] is None and summarize([])["n"] == 0
