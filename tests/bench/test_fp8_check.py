"""bench/fp8_check.py's verdict: FP8 keeps the numbers when its eval_loss is within 1% of bf16's and its exact match
within bf16's 95% CI; a QA set both runs score 0 on says nothing and decides nothing."""

import sys

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from fp8_check import compare  # noqa: E402


def metrics(loss, valqa, ci, testqa=0.0, test_ci=(0.0, 0.0)):
    return {
        "eval_loss": loss,
        "valqa_exact_match": valqa,
        "valqa_exact_match_ci95": list(ci),
        "testqa_exact_match": testqa,
        "testqa_exact_match_ci95": list(test_ci),
    }


def test_fp8_passes_within_one_percent_and_the_ci():
    passed, described = compare(metrics(2.0, 0.5, (0.4, 0.6)), metrics(2.019, 0.45, (0.35, 0.55)))
    assert passed and "relative 0.95%" in described and "testqa exact match 0 in both: shows nothing" in described


def test_fp8_fails_past_one_percent_of_eval_loss_or_outside_the_ci():
    assert not compare(metrics(2.0, 0.5, (0.4, 0.6)), metrics(2.021, 0.5, (0.4, 0.6)))[0]
    assert not compare(metrics(2.0, 0.5, (0.4, 0.6)), metrics(2.0, 0.39, (0.3, 0.5)))[0]
    assert not compare(metrics(2.0, 0.0, (0.0, 0.0), 0.2, (0.1, 0.3)), metrics(2.0, 0.0, (0, 0), 0.35, (0, 0)))[0]
