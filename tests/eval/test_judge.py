"""`cbe judge` with the real google-genai client against a local Gemini stand-in: verdicts, order, summary,
retries and key rotation, errors kept apart from zeros, resume after a kill, and keys that never leak."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cbe import cli
from cbe.eval.judge import JudgeError, load_keys, parse_verdict, summarize_judged
from cbe.run import read_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gemini_standin import GeminiStandIn  # noqa: E402

KEY = "AIzaFAKE-judge-key-0123456789"
OTHER_KEY = "AIzaFAKE-second-key-9876543210"

# (gold, parsed prediction, exact, fuzzy, supports, creature): the stand-in says 1 when the prediction contains
# the gold answer, so records 1 and 3 are flipped up from exact, record 4 down from fuzzy.
CASES = [("teal", "teal", True, True, 1, "Zorblat"),
         ("ember moss", "glowing ember moss", False, True, 1, "Tazzerine"),
         ("1717", "1718", False, False, 2, "Zorblat"),
         ("Hollow Peaks", "the Hollow Peaks region", False, True, 2, "Ixtrelle"),
         ("salt lilies", "salt-lilies", False, True, 2, "Clavendrell"),
         ("ochre", "blue", False, False, 3, "Lirrawell")]


def write_details(path: Path, n: int | None = None) -> list[dict]:
    cases = (CASES * 4)[: n or len(CASES)]
    records = [{"question": f"Question {i}: what of the {c[5]}?", "answer": c[0], "supports": c[4],
                "geminon_name": c[5], "prompt": "Q: ...\nA:", "raw_prediction": f" {c[1]}.\nQ: next",
                "ground_truth": c[0], "parsed_prediction": c[1], "exact_match": c[2], "fuzzy_match": c[3],
                "token_f1": 0.5} for i, c in enumerate(cases)]
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


def test_parse_verdict():
    assert [parse_verdict(t) for t in ("1", "0", " 1\n", "**0**", "1.")] == [True, False, True, False, True]
    for text in ("yes", "10", "1 or 0", "", None):
        with pytest.raises(JudgeError):
            parse_verdict(text)


def test_summary_groups_numbers_in_order_and_list_fields_as_text():
    records = [{"question": "q", "ground_truth": "Paris", "parsed_prediction": p, "supports": s, "ids": [s, 1],
                "llm_match": j} for p, s, j in (("Paris", 10, True), ("paris, France", 2, True), ("Lyon", 2, None))]
    lines = summarize_judged(records, ["ids"])
    assert [(line["group"], line["value"], line["n"]) for line in lines] == [
        ("overall", None, 3), ("supports", 2, 2), ("supports", 10, 1), ("ids", "[10, 1]", 1), ("ids", "[2, 1]", 2)]
    # Files without exact/fuzzy fields get them computed; the error record counts in n, not in the rates.
    assert {k: lines[0][k] for k in ("judged", "errors", "llm_match", "exact_match", "fuzzy_match")} == {
        "judged": 2, "errors": 1, "llm_match": 1.0, "exact_match": 0.5, "fuzzy_match": 1.0}
    assert (lines[0]["judge_yes_exact_no"], lines[0]["judge_no_fuzzy_yes"]) == (1, 0)


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
        standin.faults = {"Question 1: what of the Tazzerine?": [429, 500, 503],
                          "Question 2: what of the Zorblat?": ["hang"]}
        judge("--input", str(details), "--base-url", standin.url, "--keys-file", str(keys_file),
              "--concurrency", "3", "--stratify", "geminon_name", "--model", "gemini-test")

    judged = read_jsonl(details.parent / "testqa_step_000010_llm_judged.jsonl")
    assert [r["index"] for r in judged] == list(range(6))
    assert [r["llm_match"] for r in judged] == [True, True, False, True, False, False]
    assert [r["llm_judge_answer"] for r in judged] == ["1", "1", "0", "1", "0", "0"]
    assert judged[3]["geminon_name"] == "Ixtrelle" and "llm_judge_error" not in judged[3]
    # The judge sees the parsed prediction, at temperature 0; retries rotate over both keys.
    asked = standin.questions()
    assert asked.count("Question 1: what of the Tazzerine?") == 4 and asked.count("Question 2: what of the Zorblat?") == 2
    assert {r["key"] for r in standin.requests} == {KEY, OTHER_KEY}
    assert {(r["model"], r["temperature"]) for r in standin.requests} == {("gemini-test", 0.0)}
    assert standin.requests[-1]["prediction"] in {c[1] for c in CASES}

    summary = read_jsonl(details.parent / "testqa_step_000010_summary.jsonl")
    overall = summary[0]
    assert overall["group"] == "overall" and overall["judge_model"] == "gemini-test"
    assert (overall["n"], overall["judged"], overall["errors"]) == (6, 6, 0)
    assert overall["llm_match"] == pytest.approx(3 / 6) and overall["exact_match"] == pytest.approx(1 / 6)
    assert overall["fuzzy_match"] == pytest.approx(4 / 6)
    assert (overall["judge_yes_exact_no"], overall["judge_no_exact_yes"]) == (2, 0)
    assert (overall["judge_yes_fuzzy_no"], overall["judge_no_fuzzy_yes"]) == (0, 1)
    by = {(s["group"], s["value"]): s for s in summary[1:]}
    assert {k: v["n"] for k, v in by.items() if k[0] == "supports"} == {("supports", 1): 2, ("supports", 2): 3,
                                                                        ("supports", 3): 1}
    assert by[("supports", 1)]["llm_match"] == 1.0 and by[("supports", 2)]["judge_no_fuzzy_yes"] == 1
    assert by[("geminon_name", "Zorblat")]["n"] == 2 and by[("geminon_name", "Zorblat")]["llm_match"] == 0.5
    out = capsys.readouterr().out
    assert "judged 6 of 6 records (0 from before): llm_match 0.500, exact 0.167, fuzzy 0.667" in out


def test_failures_are_errors_not_zeros_and_resume_retries_only_them(details, capfd, monkeypatch):
    # A bad key in the file: its requests fail with the API's 400 and must not leak, in errors or anywhere.
    keys_file = details.parent / "keys.txt"
    keys_file.write_text(f"{KEY}\n")
    monkeypatch.setenv("GOOGLE_API_KEY", OTHER_KEY)  # the file wins over the environment
    with GeminiStandIn(keys=(KEY,)) as standin:
        standin.faults = {"Question 0: what of the Zorblat?": [500, 500, 500],  # gives up after 3 attempts
                          "Question 5: what of the Lirrawell?": ["garbage"],
                          "Question 3: what of the Ixtrelle?": ["empty"]}
        with pytest.raises(SystemExit) as exit_info:
            judge("--input", str(details), "--base-url", standin.url, "--keys-file", str(keys_file),
                  "--max-attempts", "3", "--concurrency", "2")
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
        assert sorted(standin.questions()) == ["Question 0: what of the Zorblat?", "Question 3: what of the Ixtrelle?",
                                               "Question 5: what of the Lirrawell?"]
        second = capfd.readouterr()
        assert "judged 6 of 6 records (3 from before)" in second.out

        # Now every request goes with the bad key: 400 for all, reported as errors without the key.
        keys_file.write_text(f"{OTHER_KEY}\n")
        judged_path.unlink()
        with pytest.raises(SystemExit):
            judge("--input", str(details), "--base-url", standin.url, "--keys-file", str(keys_file))
        third = capfd.readouterr()
    judged = read_jsonl(judged_path)
    assert {r["llm_judge_error"] for r in judged} == {"HTTP 400 INVALID_ARGUMENT: API key not valid. Please pass "
                                                      "a valid API key."}
    written = "".join(p.read_text() for p in details.parent.glob("*.jsonl"))
    for key in (KEY, OTHER_KEY):
        for text in (first.out, first.err, second.out, second.err, third.out, third.err, written):
            assert key not in text


@pytest.mark.parametrize("case, message", [
    ("missing input", "nope.jsonl: no such file; pass an eval_details"),
    ("no keys", "no Gemini API key: put keys one per line in secrets/gemini_keys.txt"),
    ("missing keys file", "missing.txt: no such keys file"),
    ("bad line", "testqa_step_000010.jsonl:7: malformed JSON"),
    ("unknown stratify field", "--stratify creature: no record of"),
    ("output exists", "_llm_judged.jsonl exists; pass --resume to continue it"),
    ("no concurrency", "--concurrency must be 1 or more, got 0"),
    ("another judge model", "_llm_judged.jsonl was judged with gemini-old, not gemini-2.5-flash-lite; resume with"),
])
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
        first = {"index": 0, "question": read_jsonl(details)[0]["question"], "judge_model": "gemini-old",
                 "llm_match": True}
        (details.parent / "testqa_step_000010_llm_judged.jsonl").write_text(json.dumps(first) + "\n")
        args += ["--resume"]
    if case == "output exists":
        (details.parent / "testqa_step_000010_llm_judged.jsonl").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        judge(*args)
    err = capfd.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("cbe: error: ") and message in err and err.count("\n") == 1, err
    assert KEY not in err


def test_a_killed_run_resumes_without_asking_twice(details):
    records = write_details(details, n=14)
    env = {**os.environ, "GEMINI_API_KEY": KEY}
    command = [sys.executable, "-m", "cbe.cli", "judge", "--input", str(details), "--concurrency", "2",
               "--retry-base-seconds", "0.01"]
    judged_path = details.parent / "testqa_step_000010_llm_judged.jsonl"
    with GeminiStandIn(keys=(KEY,), delay=0.15) as standin:
        standin.faults = {records[1]["question"]: [429]}
        proc = subprocess.Popen([*command, "--base-url", standin.url], cwd=details.parent, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
        resumed = subprocess.run([*command, "--base-url", standin.url, "--resume"], cwd=details.parent, env=env,
                                 capture_output=True, text=True, timeout=60)
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
