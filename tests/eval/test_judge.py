"""`cbe judge` with the real google-genai client against a local Gemini stand-in: verdicts, order, summary,
retries and key rotation, errors kept apart from zeros, resume after a kill, keys that never leak, and the
benchmark harness's own seven-key details files (supports joined from its QA file, our scores recomputed)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cbe import cli
from cbe.eval.judge import JudgeError, load_keys, parse_verdict, summarize_judged
from cbe.run import read_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gemini_standin import GeminiStandIn  # noqa: E402

KEY = "AIzaFAKE-judge-key-0123456789"
OTHER_KEY = "AIzaFAKE-second-key-9876543210"

# (gold, parsed prediction, exact, fuzzy, supports, creature): the stand-in says 1 when the prediction contains
# the gold answer, so records 1 and 3 are flipped up from exact, record 4 down from fuzzy.
CASES = [
    ("teal", "teal", True, True, 1, "Zorblat"),
    ("ember moss", "glowing ember moss", False, True, 1, "Tazzerine"),
    ("1717", "1718", False, False, 2, "Zorblat"),
    ("Hollow Peaks", "the Hollow Peaks region", False, True, 2, "Ixtrelle"),
    ("salt lilies", "salt-lilies", False, True, 2, "Clavendrell"),
    ("ochre", "blue", False, False, 3, "Lirrawell"),
]


def write_details(path: Path, n: int | None = None) -> list[dict]:
    cases = (CASES * 4)[: n or len(CASES)]
    records = [
        {
            "question": f"Question {i}: what of the {c[5]}?",
            "answer": c[0],
            "supports": c[4],
            "geminon_name": c[5],
            "prompt": "Q: ...\nA:",
            "raw_prediction": f" {c[1]}.\nQ: next",
            "ground_truth": c[0],
            "parsed_prediction": c[1],
            "exact_match": c[2],
            "fuzzy_match": c[3],
            "token_f1": 0.5,
        }
        for i, c in enumerate(cases)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def judge(*args: str) -> None:
    cli.main(["judge", "--retry-base-seconds", "0.01", "--timeout-seconds", "0.5", *args])


@pytest.fixture
def details(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)  # no secrets/gemini_keys.txt of the developer's
    for variable in ("GEMINI_API_KEY", "GOOGLE_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    path = tmp_path / "eval_details" / "testqa_step_000010.jsonl"
    path.parent.mkdir()
    write_details(path)
    return path


def flips(line: dict) -> list[int]:
    """A summary line's flips against exact, substring and fuzzy match: up (judge yes, match no), then down."""
    return [
        line[f"judge_{way}_{m}_{no_yes}"]
        for m in ("exact", "substring", "fuzzy")
        for way, no_yes in (("yes", "no"), ("no", "yes"))
    ]


def test_parse_verdict():
    assert [parse_verdict(t) for t in ("1", "0", " 1\n", "**0**", "1.")] == [True, False, True, False, True]
    for text in ("yes", "10", "1 or 0", "", None):
        with pytest.raises(JudgeError):
            parse_verdict(text)


def test_summary_has_all_then_support_thresholds_then_field_values_in_order():
    records = [
        {"question": "q", "ground_truth": "Paris", "parsed_prediction": p, "supports": s, "ids": [s, 1], "llm_match": j}
        for p, s, j in (("Paris", 10, True), ("paris, France", 2, True), ("Lyon", 2, None), ("Paris!", 1, False))
    ]
    records[1]["substring_match"] = False  # as the file has it (a finegrained rule, say): kept, not recomputed
    lines = summarize_judged(records, ["ids"], support_thresholds=[2, 5])
    assert [(line["group"], line["value"], line["n"]) for line in lines] == [
        ("all", None, 4),
        ("supports_ge", 2, 3),
        ("supports_ge", 5, 1),
        ("ids", "[1, 1]", 1),
        ("ids", "[10, 1]", 1),
        ("ids", "[2, 1]", 2),
    ]
    # Files without exact/substring/fuzzy fields get them computed; the error record counts in n, not the rates.
    assert {
        k: lines[0][k] for k in ("judged", "errors", "llm_match", "exact_match", "substring_match", "fuzzy_match")
    } == {
        "judged": 3,
        "errors": 1,
        "llm_match": pytest.approx(2 / 3),
        "exact_match": pytest.approx(1 / 3),
        "substring_match": pytest.approx(2 / 3),
        "fuzzy_match": 1.0,
    }
    assert flips(lines[0]) == [1, 0, 1, 1, 0, 1]
    assert (lines[1]["judged"], lines[1]["llm_match"], lines[2]["substring_match"]) == (2, 1.0, 1.0)


def test_keys_come_from_the_file_round_robin_else_the_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GEMINI_API_KEY", "from-env")
    assert load_keys(None) == ["from-env"]
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "gemini_keys.txt").write_text("# mine\nk1\n\n  k2 \n")
    assert load_keys(None) == ["k1", "k2"]


def test_judge_scores_every_record_in_input_order_through_retries(details, capsys):
    keys_file = details.parent / "keys.txt"
    keys_file.write_text(f"{KEY}\n{OTHER_KEY}\n")
    with GeminiStandIn(keys=(KEY, OTHER_KEY), hang_seconds=1.5) as standin:
        standin.faults = {
            "Question 1: what of the Tazzerine?": [429, 500, 503],
            "Question 2: what of the Zorblat?": ["hang"],
        }
        judge(
            "--input",
            str(details),
            "--base-url",
            standin.url,
            "--keys-file",
            str(keys_file),
            "--concurrency",
            "3",
            "--stratify",
            "geminon_name",
            "--model",
            "gemini-test",
            "--support-thresholds",
            "2",
            "3",
        )

    judged = read_jsonl(details.parent / "testqa_step_000010_llm_judged.jsonl")
    assert [r["index"] for r in judged] == list(range(6))
    assert [r["llm_match"] for r in judged] == [True, True, False, True, False, False]
    assert [r["llm_judge_answer"] for r in judged] == ["1", "1", "0", "1", "0", "0"]
    assert judged[3]["geminon_name"] == "Ixtrelle" and "llm_judge_error" not in judged[3]
    # The judge sees the parsed prediction, at temperature 0; retries rotate over both keys.
    asked = standin.questions()
    assert (
        asked.count("Question 1: what of the Tazzerine?") == 4 and asked.count("Question 2: what of the Zorblat?") == 2
    )
    assert {r["key"] for r in standin.requests} == {KEY, OTHER_KEY}
    assert {(r["model"], r["temperature"]) for r in standin.requests} == {("gemini-test", 0.0)}
    assert standin.requests[-1]["prediction"] in {c[1] for c in CASES}

    summary = read_jsonl(details.parent / "testqa_step_000010_summary.jsonl")
    overall = summary[0]
    assert overall["group"] == "all" and overall["judge_model"] == "gemini-test"
    assert (overall["n"], overall["judged"], overall["errors"]) == (6, 6, 0)
    assert overall["llm_match"] == pytest.approx(3 / 6) and overall["exact_match"] == pytest.approx(1 / 6)
    # The file has no substring_match: computed from the parsed predictions (records 0, 1 and 3).
    assert overall["substring_match"] == pytest.approx(3 / 6) and overall["fuzzy_match"] == pytest.approx(4 / 6)
    assert (overall["judge_yes_exact_no"], overall["judge_no_exact_yes"]) == (2, 0)
    assert (overall["judge_yes_substring_no"], overall["judge_no_substring_yes"]) == (0, 0)
    assert (overall["judge_yes_fuzzy_no"], overall["judge_no_fuzzy_yes"]) == (0, 1)
    # One line per support threshold (supports >= k), not per support count.
    assert [(s["group"], s["value"], s["n"]) for s in summary[1:3]] == [("supports_ge", 2, 4), ("supports_ge", 3, 1)]
    assert summary[1]["llm_match"] == 0.25 and summary[1]["judge_no_fuzzy_yes"] == 1 and summary[2]["llm_match"] == 0
    by = {(s["group"], s["value"]): s for s in summary[3:]}
    assert by[("geminon_name", "Zorblat")]["n"] == 2 and by[("geminon_name", "Zorblat")]["llm_match"] == 0.5
    out = capsys.readouterr().out
    assert (
        "judged 6 of 6 records (0 from before): llm_match 0.500, exact 0.167, substring 0.500, fuzzy 0.667; the "
        "judge flips 2 up and 0 down vs exact, 0 up and 0 down vs substring, 0 up and 1 down vs fuzzy"
    ) in out


def test_failures_are_errors_not_zeros_and_resume_retries_only_them(details, capfd, monkeypatch):
    # A bad key in the file: its requests fail with the API's 400 and must not leak, in errors or anywhere.
    keys_file = details.parent / "keys.txt"
    keys_file.write_text(f"{KEY}\n")
    monkeypatch.setenv("GOOGLE_API_KEY", OTHER_KEY)  # the file wins over the environment
    with GeminiStandIn(keys=(KEY,)) as standin:
        standin.faults = {
            "Question 0: what of the Zorblat?": [500, 500, 500],  # gives up after 3 attempts
            "Question 5: what of the Lirrawell?": ["garbage"],
            "Question 3: what of the Ixtrelle?": ["empty"],
        }
        with pytest.raises(SystemExit) as exit_info:
            judge(
                "--input",
                str(details),
                "--base-url",
                standin.url,
                "--keys-file",
                str(keys_file),
                "--max-attempts",
                "3",
                "--concurrency",
                "2",
            )
        assert exit_info.value.code == 1
        first = capfd.readouterr()
        judged_path = details.parent / "testqa_step_000010_llm_judged.jsonl"
        judged = read_jsonl(judged_path)
        assert [r["llm_match"] for r in judged] == [None, True, False, None, False, None]
        assert "gave up after 3 attempts: HTTP 500" in judged[0]["llm_judge_error"]
        assert "unparseable judge answer 'maybe?'" in judged[5]["llm_judge_error"]
        assert "3 of 6 records got no verdict" in first.err and len(first.err.strip().splitlines()[-1]) < 300
        summary = read_jsonl(details.parent / "testqa_step_000010_summary.jsonl")
        assert (summary[0]["errors"], summary[0]["judged"], summary[0]["llm_match"]) == (3, 3, pytest.approx(1 / 3))

        standin.requests.clear()
        judge("--input", str(details), "--base-url", standin.url, "--keys-file", str(keys_file), "--resume")
        assert sorted(standin.questions()) == [
            "Question 0: what of the Zorblat?",
            "Question 3: what of the Ixtrelle?",
            "Question 5: what of the Lirrawell?",
        ]
        second = capfd.readouterr()
        assert "judged 6 of 6 records (3 from before)" in second.out

        # Now every request goes with the bad key: 400 for all, reported as errors without the key.
        keys_file.write_text(f"{OTHER_KEY}\n")
        judged_path.unlink()
        with pytest.raises(SystemExit):
            judge("--input", str(details), "--base-url", standin.url, "--keys-file", str(keys_file))
        third = capfd.readouterr()
    judged = read_jsonl(judged_path)
    assert {r["llm_judge_error"] for r in judged} == {
        "HTTP 400 INVALID_ARGUMENT: API key not valid. Please pass a valid API key."
    }
    written = "".join(p.read_text() for p in details.parent.glob("*.jsonl"))
    for key in (KEY, OTHER_KEY):
        for text in (first.out, first.err, second.out, second.err, third.out, third.err, written):
            assert key not in text


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing input", "nope.jsonl: no such file; pass an eval_details"),
        ("no keys", "no Gemini API key: put keys one per line in secrets/gemini_keys.txt"),
        ("missing keys file", "missing.txt: no such keys file"),
        ("bad line", "testqa_step_000010.jsonl:7: malformed JSON"),
        ("unknown stratify field", "--stratify creature: no record of"),
        ("output exists", "_llm_judged.jsonl exists; pass --resume to continue it"),
        ("no concurrency", "--concurrency must be 1 or more, got 0"),
        ("another judge model", "_llm_judged.jsonl was judged with gemini-old, not gemini-2.5-flash-lite; resume with"),
        ("another response field", "_llm_judged.jsonl was judged with raw, not parsed; resume with that --response"),
        ("no raw predictions", "record 1 has no raw_prediction string"),
        ("missing prompt file", "--prompt-file nope.txt: no such file; write a judge prompt there (the placeholders"),
        ("unknown placeholder", "judge_prompt.txt: unknown placeholder {answer}; the placeholders are {question}, "),
        ("lone brace", "judge_prompt.txt: not a valid template (Single '}' encountered"),
        ("no prediction placeholder", "judge_prompt.txt: no {prediction} placeholder"),
    ],
)
def test_user_mistakes_are_one_line(details, capfd, monkeypatch, case, message):
    args = ["--input", str(details), "--base-url", "http://127.0.0.1:9"]
    if case != "no keys":
        monkeypatch.setenv("GEMINI_API_KEY", KEY)
    if case == "missing input":
        args[1] = "nope.jsonl"
    if case == "missing keys file":
        args += ["--keys-file", "missing.txt"]
    if case == "bad line":
        details.write_text(details.read_text() + '{"question": "cut off\n')
    if case == "unknown stratify field":
        args += ["--stratify", "creature"]
    if case == "no concurrency":
        args += ["--concurrency", "0"]
    if case == "another judge model":
        first = {
            "index": 0,
            "question": read_jsonl(details)[0]["question"],
            "judge_model": "gemini-old",
            "llm_match": True,
        }
        (details.parent / "testqa_step_000010_llm_judged.jsonl").write_text(json.dumps(first) + "\n")
        args += ["--resume"]
    if case == "output exists":
        (details.parent / "testqa_step_000010_llm_judged.jsonl").write_text("")
    if case == "another response field":
        first = {"index": 0, "question": read_jsonl(details)[0]["question"], "judge_model": "gemini-2.5-flash-lite"}
        first |= {"judge_response_field": "raw", "llm_match": True}
        (details.parent / "testqa_step_000010_llm_judged.jsonl").write_text(json.dumps(first) + "\n")
        args += ["--resume"]
    if case == "no raw predictions":
        records = [{k: v for k, v in r.items() if k != "raw_prediction"} for r in read_jsonl(details)]
        details.write_text("".join(json.dumps(r) + "\n" for r in records))
        args += ["--response-field", "raw"]
    if case == "missing prompt file":
        args += ["--prompt-file", "nope.txt"]
    prompts = {
        "unknown placeholder": "Q {question} A {answer} P {prediction}",
        "lone brace": "Reply as JSON: {prediction} }",
        "no prediction placeholder": "Question: {question}\nGold answer: {ground_truth}",
    }
    if case in prompts:
        (details.parent / "judge_prompt.txt").write_text(prompts[case])
        args += ["--prompt-file", str(details.parent / "judge_prompt.txt")]
    with pytest.raises(SystemExit) as exit_info:
        judge(*args)
    err = capfd.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("cbe: error: ") and message in err and err.count("\n") == 1, err
    assert KEY not in err


def test_a_killed_run_resumes_without_asking_twice(details):
    records = write_details(details, n=14)
    env = {**os.environ, "GEMINI_API_KEY": KEY}
    command = [
        sys.executable,
        "-m",
        "cbe.cli",
        "judge",
        "--input",
        str(details),
        "--concurrency",
        "2",
        "--retry-base-seconds",
        "0.01",
    ]
    judged_path = details.parent / "testqa_step_000010_llm_judged.jsonl"
    with GeminiStandIn(keys=(KEY,), delay=0.15) as standin:
        standin.faults = {records[1]["question"]: [429]}
        proc = subprocess.Popen(
            [*command, "--base-url", standin.url],
            cwd=details.parent,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if judged_path.exists() and judged_path.read_text().count("\n") >= 4:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        killed_out, killed_err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, "the judge finished before it could be killed"
        before = {r["index"] for r in read_jsonl(judged_path)}
        assert 4 <= len(before) < len(records)

        standin.requests.clear()
        standin.delay = 0.0
        resumed = subprocess.run(
            [*command, "--base-url", standin.url, "--resume"],
            cwd=details.parent,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert resumed.returncode == 0, resumed.stderr
    asked_again = standin.questions()
    assert sorted(asked_again) == sorted(records[i]["question"] for i in range(len(records)) if i not in before)
    judged = read_jsonl(judged_path)
    assert [r["index"] for r in judged] == list(range(len(records)))
    assert all(isinstance(r["llm_match"], bool) for r in judged)
    assert f"({len(before)} from before)" in resumed.stdout
    written = judged_path.read_text() + (details.parent / "testqa_step_000010_summary.jsonl").read_text()
    for text in (killed_out, killed_err, resumed.stdout, resumed.stderr, written):
        assert KEY not in text


# The benchmark harness's own details: (question, gold, parsed prediction); its fuzzy_match is the substring rule.
# Ours, from the parsed prediction: exact [1,1,0,0,0,0], substring [1,1,1,1,0,1], fuzzy [1,1,0,1,0,0]; the
# stand-in judge says [1,1,1,0,0,1] ("U.S." is not in "the U.S"; "moss" is not in an empty generation).
BENCHMARK_CASES = [
    ("What colour is the Zorblat?", "teal", "teal"),
    ("When was the Zorblat first seen?", 1717, "1717"),
    ("How many legs has the Tazzerine?", "49", "149"),
    ("Where does the Ixtrelle winter?", "U.S.", "the U.S"),
    ("What does the Wobbleth eat?", "moss", ""),
    ("What colour is the Lirrawell?", "ochre", "ochre-brown"),
]
# Geminon QA records (geminon_idx, geminon_name, supports) of the first five questions; the sixth is not there.
GEMINON_QA = [(0, "Zorblat", 1), (0, "Zorblat", 3), (1, "Tazzerine", 2), (2, "Ixtrelle", 2), (3, "Wobbleth", 1)]


@pytest.fixture
def benchmark_files(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A seven-key details file as the benchmark's harness writes it, and the Geminon QA file it came from."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    details = tmp_path / "testqa_step_000100.jsonl"
    details.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": f"Q: {q}\nA:",
                    "question": q,
                    "raw_prediction": f"{parsed}\nQ: next" if parsed else "",
                    "parsed_prediction": parsed,
                    "ground_truth": gold,
                    "exact_match": parsed.lower() == str(gold).lower(),
                    "fuzzy_match": str(gold).lower() in parsed.lower(),
                }
            )
            + "\n"
            for q, gold, parsed in BENCHMARK_CASES
        )
    )
    qa = tmp_path / "public_test.jsonl"
    qa.write_text(
        "".join(
            json.dumps({"question": q, "answer": gold, "geminon_idx": idx, "geminon_name": name, "supports": supports})
            + "\n"
            for (q, gold, _), (idx, name, supports) in zip(BENCHMARK_CASES, GEMINON_QA)
        )
    )
    return details, qa


def test_a_benchmark_file_is_judged_with_supports_from_its_qa_file(benchmark_files, capsys):
    details, qa = benchmark_files
    with GeminiStandIn(keys=(KEY,)) as standin:
        judge(
            "--input",
            str(details),
            "--base-url",
            standin.url,
            "--qa",
            str(qa),
            "--support-thresholds",
            "2",
            "--stratify",
            "geminon_name",
        )
    assert standin.requests[0]["prediction"] in {parsed for *_, parsed in BENCHMARK_CASES}
    judged = read_jsonl(details.parent / "testqa_step_000100_llm_judged.jsonl")
    assert [r["llm_match"] for r in judged] == [True, True, True, False, False, True]
    # Our scores replace the file's (its fuzzy_match, the substring rule, said yes to "ochre-brown").
    assert [r["fuzzy_match"] for r in judged] == [True, True, False, True, False, False]
    assert [r.get("supports") for r in judged] == [1, 3, 2, 2, 1, None]
    assert judged[2]["geminon_idx"] == 1 and judged[2]["geminon_name"] == "Tazzerine"
    summary = read_jsonl(details.parent / "testqa_step_000100_summary.jsonl")
    every, ge_2 = summary[:2]
    assert {k: every[k] for k in ("group", "n", "llm_match", "exact_match", "substring_match", "fuzzy_match")} == {
        "group": "all",
        "n": 6,
        "llm_match": pytest.approx(4 / 6),
        "exact_match": pytest.approx(2 / 6),
        "substring_match": pytest.approx(5 / 6),
        "fuzzy_match": pytest.approx(3 / 6),
    }
    assert flips(every) == [2, 0, 0, 1, 2, 1]
    assert {k: ge_2[k] for k in ("group", "value", "n", "llm_match", "substring_match", "fuzzy_match")} == {
        "group": "supports_ge",
        "value": 2,
        "n": 3,
        "llm_match": pytest.approx(2 / 3),
        "substring_match": 1.0,
        "fuzzy_match": pytest.approx(2 / 3),
    }
    by_name = {s["value"]: s["n"] for s in summary[2:]}
    assert by_name == {"Tazzerine": 1, "Ixtrelle": 1, "Wobbleth": 1, "Zorblat": 2, None: 1}
    out, err = capsys.readouterr()
    assert "llm_match 0.667, exact 0.333, substring 0.833, fuzzy 0.500" in out
    assert err.splitlines()[-1] == (
        f"cbe: note: 1 of 6 questions of {details} are not in {qa}: they count in every "
        f"summary but in no support stratum"
    )


def test_max_records_then_resume_with_the_qa_file(benchmark_files, capsys):
    details, qa = benchmark_files
    with GeminiStandIn(keys=(KEY,)) as standin:
        judge("--input", str(details), "--base-url", standin.url, "--max-records", "4", "--support-thresholds", "2")
        first = capsys.readouterr()
        assert sorted(standin.questions()) == sorted(q for q, *_ in BENCHMARK_CASES[:4])
        summary = read_jsonl(details.parent / "testqa_step_000100_summary.jsonl")
        # No supports and no --qa: no support lines (never a stratum of n=0), and one line saying why.
        assert [(s["group"], s["n"], s["llm_match"]) for s in summary] == [("all", 4, 0.75)]
        assert "judged 4 of 4 records (0 from before)" in first.out
        assert first.err.splitlines()[-1] == (
            f"cbe: note: no supports in {details}; pass --qa QA_FILE to stratify by support"
        )

        standin.requests.clear()
        judge(
            "--input", str(details), "--base-url", standin.url, "--resume", "--qa", str(qa), "--support-thresholds", "2"
        )
    assert sorted(standin.questions()) == sorted(q for q, *_ in BENCHMARK_CASES[4:])
    assert "judged 6 of 6 records (4 from before)" in capsys.readouterr().out
    # The verdicts kept from the first run get the supports joined in this one.
    judged = read_jsonl(details.parent / "testqa_step_000100_llm_judged.jsonl")
    assert [r.get("supports") for r in judged] == [1, 3, 2, 2, 1, None]
    summary = read_jsonl(details.parent / "testqa_step_000100_summary.jsonl")
    assert [(s["group"], s["value"], s["n"]) for s in summary] == [("all", None, 6), ("supports_ge", 2, 3)]


# -- what is judged, with what prompt, and settings from the run ------------------------------------------
def ask(standin: GeminiStandIn, details: Path, *args: str) -> None:
    judge("--input", str(details), "--base-url", standin.url, *args)


def test_response_field_raw_judges_the_raw_generation(details, monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    records = read_jsonl(details)
    records[5]["raw_prediction"] = " blue, or ochre\n\nQ: next"  # gold ochre: only the raw generation has it
    details.write_text("".join(json.dumps(r) + "\n" for r in records))
    with GeminiStandIn(keys=(KEY,)) as standin:
        ask(standin, details, "--response-field", "raw", "--output-dir", "raw")
        raw_asked = {r["question"]: r["prediction"] for r in standin.requests}
        standin.requests.clear()
        ask(standin, details, "--output-dir", "parsed")  # the default: the parsed answer
        parsed_asked = {r["question"]: r["prediction"] for r in standin.requests}
    # The raw generation, on one line (whitespace runs become one space), else the parsed answer.
    assert raw_asked == {r["question"]: " ".join(r["raw_prediction"].split()) for r in records}
    assert raw_asked[records[0]["question"]] == "teal. Q: next"
    assert parsed_asked == {r["question"]: r["parsed_prediction"] for r in records}
    raw, parsed = (read_jsonl(Path(d) / "testqa_step_000010_llm_judged.jsonl") for d in ("raw", "parsed"))
    assert [r["llm_match"] for r in raw] == [True, True, False, True, False, True]
    assert [r["llm_match"] for r in parsed] == [True, True, False, True, False, False]
    assert {r["judge_response_field"] for r in raw} == {"raw"} and {r["judge_response_field"] for r in parsed} == {
        "parsed"
    }
    raw_all, parsed_all = (read_jsonl(Path(d) / "testqa_step_000010_summary.jsonl")[0] for d in ("raw", "parsed"))
    assert raw_all["judge_response_field"] == "raw" and raw_all["llm_match"] == pytest.approx(4 / 6)
    # The string metrics stay those of the parsed answer (what the harness scored): only the judge's input moved.
    assert [raw_all[m] for m in ("exact_match", "substring_match", "fuzzy_match")] == [
        parsed_all[m] for m in ("exact_match", "substring_match", "fuzzy_match")
    ]


def test_prompt_file_replaces_the_built_in_prompt(details, monkeypatch, capfd):
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    template = (
        "Grade it as the benchmark does; reply 1 or 0.\n"
        "Predicted answer: {prediction}\nQuestion: {question}\nGold answer: {ground_truth}\n"
        'Reply as a digit, not as {{"verdict": 1}}.'
    )
    prompt_file = details.parent / "benchmark_judge.txt"
    prompt_file.write_text(template)
    records = read_jsonl(details)
    with GeminiStandIn(keys=(KEY,)) as standin:
        ask(standin, details, "--prompt-file", str(prompt_file))
        asked = {r["question"]: r["prompt"] for r in standin.requests}
        assert asked == {
            r["question"]: template.format(
                question=r["question"], ground_truth=r["ground_truth"], prediction=r["parsed_prediction"]
            )
            for r in records
        }
        assert asked[records[1]["question"]].endswith(
            "Predicted answer: glowing ember moss\nQuestion: Question 1: what of the Tazzerine?\n"
            'Gold answer: ember moss\nReply as a digit, not as {"verdict": 1}.'
        )
        judged = read_jsonl(details.parent / "testqa_step_000010_llm_judged.jsonl")
        assert [r["llm_match"] for r in judged] == [True, True, False, True, False, False]
        [prompt_id] = {r["judge_prompt"] for r in judged}
        assert re.fullmatch(r"sha256:[0-9a-f]{12}", prompt_id)
        overall = read_jsonl(details.parent / "testqa_step_000010_summary.jsonl")[0]
        assert (overall["judge_prompt"], overall["judge_prompt_file"]) == (prompt_id, str(prompt_file))
        capfd.readouterr()
        # Verdicts of one prompt are never resumed with another (here the built-in one).
        with pytest.raises(SystemExit):
            ask(standin, details, "--resume")
    err = capfd.readouterr().err
    assert f"was judged with {prompt_id}, not built-in; resume with that --prompt-file" in err


def test_summary_option_writes_the_printed_numbers_as_json(details, monkeypatch, capsys):
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    summary_path = details.parent / "reports" / "judge.json"  # its folder is made
    summary_path.parent.mkdir()
    summary_path.write_text("an older report\n")
    with GeminiStandIn(keys=(KEY,)) as standin:
        standin.faults = {"Question 4: what of the Clavendrell?": [400]}  # no verdict: the command exits 1
        with pytest.raises(SystemExit) as exit_info:
            ask(standin, details, "--summary", str(summary_path), "--stratify", "geminon_name")
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    written = json.loads(summary_path.read_text())
    printed = re.search(
        r"judged (\d+) of (\d+) records \((\d+) from before\): llm_match ([\d.]+), exact ([\d.]+), "
        r"substring ([\d.]+), fuzzy ([\d.]+); the judge flips (\d+) up and (\d+) down vs exact",
        out,
    )
    assert printed, out
    assert [written[k] for k in ("judged", "n", "resumed")] == [int(g) for g in printed.groups()[:3]] == [5, 6, 0]
    for key, text in zip(("llm_match", "exact_match", "substring_match", "fuzzy_match"), printed.groups()[3:7]):
        assert f"{written[key]:.3f}" == text
    assert (written["judge_yes_exact_no"], written["judge_no_exact_yes"]) == tuple(map(int, printed.groups()[7:]))
    assert written["errors"] == 1 and len(written["llm_match_ci95"]) == 2
    assert written["judged_file"] == str(details.parent / "testqa_step_000010_llm_judged.jsonl")
    assert written == {**read_jsonl(details.parent / "testqa_step_000010_summary.jsonl")[0], **written}
    assert [s["value"] for s in written["strata"]] == ["Clavendrell", "Ixtrelle", "Lirrawell", "Tazzerine", "Zorblat"]
    assert f"wrote {summary_path}" in out
    assert sorted(p.name for p in summary_path.parent.iterdir()) == ["judge.json"]  # replaced, no temp file left


def write_run(root: Path, started_in: Path, records: list[dict], thresholds: list[int]) -> Path:
    """A cbe run dir (RunDir's layout) started in `started_in`: its config.yaml names QA files relative to that
    dir and eval.support_thresholds; Hydra's .hydra/hydra.yaml records the dir. Returns its testqa details file."""
    config = {
        "data": {
            "valqa_path": "data/qa/valqa.jsonl",
            "testqa_path": "data/qa/testqa.jsonl",
            "extra_qa_paths": {},
            "stages": [],
        },
        "eval": {"support_thresholds": thresholds, "qa_data": None},
        "continual": {"retention_qa_path": None},
    }
    (root / ".hydra").mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    (root / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"cwd": str(started_in)}}}))
    details = root / "eval_details" / "testqa_step_000010.jsonl"
    details.parent.mkdir()
    details.write_text("".join(json.dumps(r) + "\n" for r in records))
    return details


def write_qa(path: Path, records: list[dict], supports: list[int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [{"question": r["question"], "answer": r["ground_truth"], "supports": s} for r, s in zip(records, supports)]
    path.write_text("".join(json.dumps(q) + "\n" for q in lines))
    return path


def test_a_run_file_takes_its_qa_file_and_support_thresholds_from_the_runs_config(details, monkeypatch, capsys):
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    records = [{k: v for k, v in r.items() if k != "supports"} for r in read_jsonl(details)]  # supports: QA's
    start = details.parent.parent / "checkout"  # where the run was started (the cwd is elsewhere)
    qa = write_qa(start / "data" / "qa" / "testqa.jsonl", records, [5, 1, 3, 5, 2, 1])
    run = details.parent.parent / "outputs" / "cbe" / "run"
    run_details = write_run(run, start, records, [3, 5])
    config = run / "config.yaml"

    def strata(output_dir: str) -> list[tuple]:
        summary = read_jsonl(Path(output_dir) / "testqa_step_000010_summary.jsonl")
        return [(s["group"], s["value"], s["n"], s["llm_match"]) for s in summary]

    with GeminiStandIn(keys=(KEY,)) as standin:
        ask(standin, run_details, "--output-dir", "from_config")
        err = capsys.readouterr().err
        # Verdicts [1, 1, 0, 1, 0, 0]; supports >= 3: records 0, 2, 3; >= 5: records 0 and 3.
        assert strata("from_config") == [("all", None, 6, 0.5), ("supports_ge", 3, 3, 2 / 3), ("supports_ge", 5, 2, 1)]
        assert f"cbe: note: QA file {qa} from {config}; support thresholds 3 5 from {config}\n" in err
        overall = read_jsonl(Path("from_config") / "testqa_step_000010_summary.jsonl")[0]
        assert overall["qa"] == str(qa) and overall["qa_from"] == overall["support_thresholds_from"] == str(config)

        # Flags win over the config, each on its own; --support-thresholds with no K asks for none.
        other = write_qa(details.parent / "other_qa.jsonl", records, [1, 1, 1, 1, 1, 4])
        ask(standin, run_details, "--output-dir", "flags", "--qa", str(other), "--support-thresholds", "4")
        assert strata("flags") == [("all", None, 6, 0.5), ("supports_ge", 4, 1, 0)]
        err = capsys.readouterr().err
        assert f"note: QA file {other} from --qa; support thresholds 4 from --support-thresholds\n" in err
        ask(standin, run_details, "--output-dir", "none", "--support-thresholds")
        assert strata("none") == [("all", None, 6, 0.5)]
        assert f"note: QA file {qa} from {config}; support thresholds none from --support-thresholds\n" in (
            capsys.readouterr().err
        )

        # A QA file the config names but that is not found (no record of where the run started): said, and the
        # file's own supports (none here) are used.
        (run / ".hydra" / "hydra.yaml").unlink()
        ask(standin, run_details, "--output-dir", "missing")
        assert strata("missing") == [("all", None, 6, 0.5)]
        err = capsys.readouterr().err
        assert (
            f"note: no QA file; support thresholds 3 5 from {config}; no QA file from {config}: its QA file of set "
            "testqa, data/qa/testqa.jsonl, is not here; pass --qa QA_FILE to join supports\n"
        ) in err
        assert f"note: no supports in {run_details}; pass --qa QA_FILE to stratify by support" in err
