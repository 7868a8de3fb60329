"""`cbe rescore` on details files of both harnesses: a cbe file scored by hand, the benchmark harness's seven-key
files (no supports, its fuzzy_match the substring rule), empty generations, supports joined from a QA file, and
strata left out (with one line saying why) where there are no supports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cbe import cli

# (question, gold, raw prediction) with our scores under the default parser:
# exact, substring, fuzzy, token F1.
CASES = [
    ("Where is the Louvre?", "Paris", " Paris.\nQ: next", (1, 1, 1, 1.0)),
    ("How many delegates voted?", "49", "149", (0, 1, 0, 0.0)),  # substring is wrong on numbers
    ("What grows by the shore?", "salt lilies", "the salt lilies of the shore", (0, 1, 1, 2 / 3)),
    ("What colour was the flag?", "ochre", "", (0, 0, 0, 0.0)),  # EOS at once: an empty generation
    ("When was the bridge built?", 1717, "1717.", (1, 1, 1, 1.0)),
]
# News QA supports (article ids) per question; the last question is not in the QA file.
SUPPORTS = [[10], [1, 2, 3], [4, 5], [7, 8], None]


def benchmark_record(question: str, gold, raw: str) -> dict:
    """A details record as the benchmark's own harness writes it: exactly these seven keys, its fuzzy_match the
    substring rule."""
    parsed = raw.strip().split("\n")[0].strip().removesuffix(".") if raw.strip() else ""
    return {
        "prompt": f"Q: {question}\nA:",
        "question": question,
        "raw_prediction": raw,
        "parsed_prediction": parsed,
        "ground_truth": gold,
        "exact_match": parsed.lower() == str(gold).lower(),
        "fuzzy_match": str(gold).lower() in parsed.lower(),
    }


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def benchmark_details(tmp_path) -> Path:
    return write_jsonl(tmp_path / "valqa_step_100.jsonl", [benchmark_record(*case[:3]) for case in CASES])


@pytest.fixture
def news_qa(tmp_path) -> Path:
    records = [
        {"question": q, "answer": gold, "supports": supports, "closedbook_answer": "?", "openbook_answer": "?"}
        for (q, gold, *_), supports in zip(CASES, SUPPORTS)
        if supports
    ]
    records.append(
        {
            "question": "Who won the race?",
            "answer": "Ann",
            "supports": [9],
            "closedbook_answer": "?",
            "openbook_answer": "?",
        }
    )
    return write_jsonl(tmp_path / "val.jsonl", records)


def rescore(capsys, *args: str) -> tuple[dict, str]:
    cli.main(["rescore", *args])
    out, err = capsys.readouterr()
    return json.loads(out), err


def expected(indexes: list[int]) -> dict[str, float]:
    scores = [CASES[i][3] for i in indexes]
    return {
        name: pytest.approx(sum(s[column] for s in scores) / len(scores))
        for column, name in enumerate(("exact_match", "substring_match", "fuzzy_match", "token_f1"))
    }


def test_a_benchmark_file_is_rescored_by_our_rules_and_an_empty_generation_is_wrong(benchmark_details, capsys):
    summary, err = rescore(capsys, str(benchmark_details))
    assert summary["n"] == 5  # the empty generation is scored, not refused or skipped
    assert {k: summary[k] for k in expected([0, 1, 2, 3, 4])} == expected([0, 1, 2, 3, 4])
    # Its own fuzzy_match (the substring rule, 4 of 5) is not taken for ours (3 of 5).
    assert summary["fuzzy_match"] == pytest.approx(0.6) and summary["substring_match"] == pytest.approx(0.8)
    assert summary["substring_match_ci95"][0] < 0.8 < summary["substring_match_ci95"][1]
    assert err == ""


# A cbe details file written by hand, its stored scores stale (all right), so that only a rescore from the raw
# predictions gives the numbers below. Per record, under the README's rules: parsed prediction, then exact,
# substring, fuzzy, token F1 and supports.
HAND_WRITTEN = [
    # "Paris": cut at the re-emitted Q:, the trailing period stripped: 1 1 1 1.0
    ("Where is the Louvre?", "Paris", " Paris. Q: Where next?", 1),
    # "149 delegates": "49" is a substring of "149" but not a word; F1 0 words in common: 0 1 0 0.0
    ("How many delegates voted?", 49, "149 delegates", 3),
    # "Ada Lovelace won": both words inside, F1 2*(2/3)*1/(2/3+1) = 0.8: 0 1 1 0.8
    ("Who wrote the first program?", "Ada Lovelace", "Ada Lovelace won", 2),
    # "red salt and lilies" (a leading newline does not end the answer): the two words not in a row, so
    # neither match; F1 2*(2/4)*1/(2/4+1) = 2/3: 0 0 0 2/3
    ("What grows by the shore?", "salt lilies", "\nred salt and lilies\n", 5),
    # "": EOS at once is wrong: 0 0 0 0.0
    ("What colour was the flag?", "ochre", "", 2),
    # "beatles, of course": "the beatles" is no substring, but SQuAD drops "the" and the comma; F1 with precision
    # 1/3 and recall 1 is 2*(1/3)/(4/3) = 0.5: 0 0 1 0.5
    ("Who recorded Abbey Road?", "The Beatles", "beatles, of course", 1),
    # "the smartest": "art" is a substring, not a word: 0 1 0 0.0
    ("What did she study?", "art", "the smartest", 4),
]


def test_a_hand_scored_details_file_is_rescored_from_its_raw_predictions(tmp_path, capsys):
    stale = {"parsed_prediction": "stale", "exact_match": True, "substring_match": True, "fuzzy_match": True}
    records = [
        {"question": q, "ground_truth": gold, "supports": n, "prompt": f"Q: {q}\nA:", "raw_prediction": raw}
        | stale
        | {"token_f1": 1.0}
        for q, gold, raw, n in HAND_WRITTEN
    ]
    details = write_jsonl(tmp_path / "valqa_step_000040.jsonl", records)
    summary, err = rescore(capsys, str(details), "--support-thresholds", "2", "4")
    assert err == ""
    # All 7: exact 1 (Paris), substring 4 (Paris, 149, Ada, smartest), fuzzy 3 (Paris, Ada, Beatles),
    # F1 (1 + 0 + 0.8 + 2/3 + 0 + 0.5 + 0) / 7 = (89/30) / 7.
    assert summary["n"] == 7
    assert summary["exact_match"] == pytest.approx(1 / 7)
    assert summary["substring_match"] == pytest.approx(4 / 7)
    assert summary["fuzzy_match"] == pytest.approx(3 / 7)
    assert summary["token_f1"] == pytest.approx(89 / 210)
    # Supports >= 2 (149, Ada, salt lilies, empty, smartest): exact 0, substring 3, fuzzy 1 (Ada),
    # F1 (0.8 + 2/3) / 5 = 22/75.
    assert summary["n_supports_ge_2"] == 5
    assert summary["exact_match_supports_ge_2"] == 0.0
    assert summary["substring_match_supports_ge_2"] == pytest.approx(3 / 5)
    assert summary["fuzzy_match_supports_ge_2"] == pytest.approx(1 / 5)
    assert summary["token_f1_supports_ge_2"] == pytest.approx(22 / 75)
    # Supports >= 4 (salt lilies, smartest): substring 1 of 2 (smartest), F1 (2/3) / 2.
    assert summary["n_supports_ge_4"] == 2
    assert (summary["exact_match_supports_ge_4"], summary["fuzzy_match_supports_ge_4"]) == (0.0, 0.0)
    assert summary["substring_match_supports_ge_4"] == pytest.approx(1 / 2)
    assert summary["token_f1_supports_ge_4"] == pytest.approx(1 / 3)
    low, high = summary["fuzzy_match_ci95"]
    assert 0 <= low < 3 / 7 < high <= 1


def test_without_supports_the_strata_are_left_out_with_one_line(benchmark_details, capsys):
    summary, err = rescore(capsys, str(benchmark_details), "--support-thresholds", "2")
    assert not [k for k in summary if "supports_ge" in k] and summary["n"] == 5
    assert err == f"cbe: note: no supports in {benchmark_details}; pass --qa QA_FILE to stratify by support\n"


def test_supports_are_joined_from_a_news_qa_file_by_question(benchmark_details, news_qa, capsys):
    summary, err = rescore(capsys, str(benchmark_details), "--qa", str(news_qa), "--support-thresholds", "2", "3")
    assert (summary["n"], summary["n_supports_ge_2"], summary["n_supports_ge_3"]) == (5, 3, 1)
    assert {k: summary[f"{k}_supports_ge_2"] for k in expected([1, 2, 3])} == expected([1, 2, 3])
    assert {k: summary[f"{k}_supports_ge_3"] for k in expected([1])} == expected([1])
    assert {k: summary[k] for k in expected(list(range(5)))} == expected(list(range(5)))
    assert err == (
        f"cbe: note: 1 of 5 questions of {benchmark_details} are not in {news_qa}: they count in every "
        f"summary but in no support stratum\n"
    )


def test_a_cbe_file_keeps_its_own_supports(tmp_path, capsys):
    records = [
        {
            "question": q,
            "ground_truth": gold,
            "supports": n,
            "geminon_idx": 3,
            "prompt": "Q:",
            "raw_prediction": raw,
            "parsed_prediction": "stale",
            "exact_match": False,
        }
        for (q, gold, raw, _), n in zip(CASES, (1, 3, 2, 2, 1))
    ]
    summary, err = rescore(capsys, str(write_jsonl(tmp_path / "d.jsonl", records)), "--support-thresholds", "2")
    assert summary["n_supports_ge_2"] == 3 and summary["exact_match_supports_ge_2"] == 0.0
    assert summary["substring_match_supports_ge_2"] == pytest.approx(2 / 3) and err == ""


def test_the_question_reaches_the_finegrained_geminon_parser(tmp_path, capsys):
    record = benchmark_record("What are the types of the Zorblat?", "Flying and Psychic", "Psychic and Flying")
    details = write_jsonl(tmp_path / "d.jsonl", [record])
    default, _ = rescore(capsys, str(details))
    finegrained, _ = rescore(capsys, str(details), "--parser", "finegrained_geminon")
    assert (default["substring_match"], default["fuzzy_match"]) == (0.0, 0.0)
    assert (finegrained["exact_match"], finegrained["substring_match"], finegrained["fuzzy_match"]) == (0.0, 1.0, 1.0)


@pytest.mark.parametrize(
    "case, message",
    [
        ("no question in the QA file", "none of the 5 questions of"),
        ("no prediction", "record 2 has no raw_prediction string; pass an eval_details file"),
        ("empty file", "no records to rescore"),
        ("missing QA file", "nope.jsonl: no such file"),
    ],
)
def test_rescore_mistakes_are_one_line(benchmark_details, tmp_path, capfd, case, message):
    args = [str(benchmark_details)]
    if case == "no question in the QA file":
        args += ["--qa", str(write_jsonl(tmp_path / "other.jsonl", [{"question": "Who?", "answer": "me"}]))]
    if case == "no prediction":
        records = [json.loads(line) for line in benchmark_details.read_text().splitlines()]
        records[1]["raw_prediction"] = None
        write_jsonl(benchmark_details, records)
    if case == "empty file":
        benchmark_details.write_text("\n")
    if case == "missing QA file":
        args += ["--qa", str(tmp_path / "nope.jsonl")]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["rescore", *args])
    err = capfd.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("cbe: error: ") and message in err and err.count("\n") == 1
