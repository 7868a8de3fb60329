"""`cbe continual-summary` and `cbe retention-set` on hand-made staged run dirs: ACC, BWT, forgetting and FWT worked
by hand from the issue's formulas, paired bootstrap CIs from eval_details, the retention G_i, one-line mistakes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cbe import cli
from cbe.continual import StageRecorder, continual_summary, write_continual_summary
from cbe.eval.metrics import METRICS, summarize
from cbe.run import RunDir, read_jsonl

STEPS_PER_STAGE = 10


def questions(value: float, n: int) -> list[bool]:
    """n per-question exact matches whose mean is `value` (the first ones right)."""
    right = round(value * n)
    assert right == value * n, "a hand-made value must be a multiple of 1/n"
    return [True] * right + [False] * (n - right)


def write_staged_run(
    run: Path,
    matrices: dict[str, list[list[list[bool]]]],
    retention: list[list[bool]] | None = None,
    names: tuple[str, ...] | None = None,
) -> Path:
    """A staged run dir as the contract describes it: config.yaml with data.stages, metrics/stage_matrix.jsonl,
    eval_details/<stage>_<set>_step_<N>.jsonl and eval_results.jsonl. matrices[set][i][j] holds the per-question
    scores of stage j+1's questions after stage i (every metric scores alike); rows are taken at step 10 i."""
    stages = len(next(iter(matrices.values()))[0])
    names = names or tuple(f"s{j + 1}" for j in range(stages))
    config = {
        "data": {"stages": [{"name": name, "steps": None} for name in names]},
        "continual": {"steps_per_stage": STEPS_PER_STAGE},
    }
    (run / "metrics").mkdir(parents=True)
    (run / "eval_details").mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    lines, results = [], []
    for i in range(stages + 1):
        step = STEPS_PER_STAGE * i
        result = {"step": step, "stage": i}
        for qa_set, R in matrices.items():
            for j, scores in enumerate(R[i]):
                details = [
                    {"question": f"{names[j]} {qa_set} q{k}", **{m: s for m in METRICS}} for k, s in enumerate(scores)
                ]
                write_lines(run / "eval_details" / f"{names[j]}_{qa_set}_step_{step:06d}.jsonl", details)
                for metric in METRICS:
                    value = sum(scores) / len(scores)
                    lines.append(
                        {"after_stage": i, "eval_stage": j + 1, "set": qa_set, "metric": metric, "value": value,
                         "n": len(scores), "step": step}
                    )  # fmt: skip
                    result[f"{names[j]}_{qa_set}_{metric}"] = value
        if retention:
            write_lines(
                run / "eval_details" / f"retention_step_{step:06d}.jsonl",
                [{"question": f"general q{k}", **{m: s for m in METRICS}} for k, s in enumerate(retention[i])],
            )
            result |= {f"retention_{m}": sum(retention[i]) / len(retention[i]) for m in METRICS}
        results.append(result)
        if retention and i < stages:  # an evaluation inside the stage: not a row of the matrix
            results.append({"step": step + 5, "stage": i + 1, "retention_exact_match": 0.0})
    write_lines(run / "metrics" / "stage_matrix.jsonl", lines)
    write_lines(run / "metrics" / "eval_results.jsonl", results)
    return run


def write_lines(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def matrix_of(values: list[list[float]], n: int = 4) -> list[list[list[bool]]]:
    return [[questions(v, n) for v in row] for row in values]


# Rows after stage 0 (base) .. T, columns stage 1 .. T; quarters, so every number is exact.
# Stage 1 peaks after stage 2 (0.75 -> 1.0) and ends at 0.5: forgetting counts from the peak, BWT from R[1][1].
PEAK_THEN_FORGET = [
    [0.0, 0.25, 0.0],
    [0.75, 0.5, 0.0],
    [1.0, 1.0, 0.25],
    [0.5, 0.75, 1.0],
]
PERFECT_MEMORY = [
    [0.0, 0.0, 0.0],
    [1.0, 0.0, 0.0],
    [1.0, 1.0, 0.0],
    [1.0, 1.0, 1.0],
]
# Training stage 2 also teaches stage 1's questions: forgetting goes negative, and it counts from R[1][1], not from
# the base row (0.75) nor the last row.
LATER_STAGES_HELP = [
    [0.75, 0.25],
    [0.5, 0.5],
    [1.0, 1.0],
]
TOTAL_FORGETTING = [
    [0.0, 0.0, 0.0],
    [1.0, 0.0, 0.0],
    [0.0, 1.0, 0.0],
    [0.0, 0.0, 1.0],
]


@pytest.mark.parametrize(
    "values, expected",
    [
        # ACC = (0.5+0.75+1)/3; BWT = ((0.5-0.75) + (0.75-1))/2; forgetting = ((max(0.75,1)-0.5) + (1-0.75))/2;
        # FWT = ((R[1][2]-b_2) + (R[2][3]-b_3))/2 = ((0.5-0.25) + (0.25-0))/2
        (PEAK_THEN_FORGET, {"acc": 0.75, "bwt": -0.25, "forgetting": 0.375, "fwt": 0.25}),
        (PERFECT_MEMORY, {"acc": 1.0, "bwt": 0.0, "forgetting": 0.0, "fwt": 0.0}),
        # every stage learned, then lost at the next: BWT = (-1 - 1)/2, forgetting = (1 + 1)/2
        (TOTAL_FORGETTING, {"acc": 1 / 3, "bwt": -1.0, "forgetting": 1.0, "fwt": 0.0}),
        # BWT = R[2][1]-R[1][1]; forgetting = max(R[1][1]) - R[2][1]; FWT = R[1][2] - b_2
        (LATER_STAGES_HELP, {"acc": 1.0, "bwt": 0.5, "forgetting": -0.5, "fwt": 0.25}),
    ],
    ids=["forgetting-is-not-minus-bwt", "perfect-memory", "total-forgetting", "later-stages-help"],
)
def test_summary_numbers_of_hand_made_matrices(tmp_path, values, expected):
    run = write_staged_run(tmp_path / "run", {"valqa": matrix_of(values)})
    summary, notes = continual_summary(run)
    assert notes == []
    assert sorted(summary) == [f"valqa_{m}" for m in sorted(METRICS)]
    entry = summary["valqa_exact_match"]
    assert {k: entry[k] for k in expected} == pytest.approx(expected, abs=1e-12)
    assert entry["matrix"] == values
    T = len(values) - 1
    assert entry["n"] == [4] * T and entry["steps"] == [STEPS_PER_STAGE * i for i in range(T + 1)]


def test_one_stage_has_null_bwt_forgetting_and_fwt(tmp_path):
    run = write_staged_run(tmp_path / "run", {"valqa": matrix_of([[0.25], [0.75]])})
    entry = continual_summary(run)[0]["valqa_exact_match"]
    assert entry["acc"] == 0.75  # 1/T: defined for T = 1
    for name in ("bwt", "forgetting", "fwt"):
        assert entry[name] is None and entry[f"{name}_ci95"] is None  # 1/(T-1): no stage to average over
    assert entry["matrix"] == [[0.25], [0.75]]


def test_ci_brackets_the_number_and_is_seeded(tmp_path):
    values = matrix_of(PEAK_THEN_FORGET, n=8)
    first = continual_summary(write_staged_run(tmp_path / "a", {"valqa": values}))[0]["valqa_exact_match"]
    again = continual_summary(write_staged_run(tmp_path / "b", {"valqa": values}))[0]["valqa_exact_match"]
    for name in ("acc", "bwt", "forgetting", "fwt"):
        low, high = first[f"{name}_ci95"]
        assert low <= first[name] <= high and low < high
        assert again[f"{name}_ci95"] == [low, high]  # the same files give the same CI


def test_ci_resamples_a_stage_s_questions_once_for_every_row(tmp_path):
    """Stage 1 is learned to half its questions and then kept exactly (the same questions right at every row):
    on any resample R[T][1] - R[1][1] is 0, so a paired bootstrap gives BWT and forgetting a CI of [0, 0], while
    resampling each row on its own draw would not."""
    half = [True, False] * 4
    T = 2
    stage_1 = [[False] * 8, half, half]
    stage_2 = [[False] * 8, [False] * 8, half]
    run = write_staged_run(tmp_path / "run", {"valqa": [[stage_1[i], stage_2[i]] for i in range(T + 1)]})
    entry = continual_summary(run)[0]["valqa_exact_match"]
    assert entry["bwt"] == 0.0 and entry["bwt_ci95"] == [0.0, 0.0]
    assert entry["forgetting"] == 0.0 and entry["forgetting_ci95"] == [0.0, 0.0]
    low, high = entry["acc_ci95"]
    assert low < entry["acc"] == 0.5 < high


def test_retention_accuracy_after_each_stage(tmp_path):
    retention = [questions(v, 8) for v in (0.75, 0.625, 0.5, 0.25)]  # G_0 .. G_3 at steps 0, 10, 20, 30
    run = write_staged_run(tmp_path / "run", {"valqa": matrix_of(PEAK_THEN_FORGET)}, retention=retention)
    summary, notes = continual_summary(run)
    assert notes == []
    entry = summary["retention_exact_match"]
    assert entry["g"] == [0.75, 0.625, 0.5, 0.25]  # the evaluations at steps 5, 15, 25 are not rows
    assert entry["steps"] == [0, 10, 20, 30]
    assert entry["g0_minus_gt"] == 0.5
    low, high = entry["g0_minus_gt_ci95"]
    assert low <= 0.5 <= high and low < high
    assert {k for k in summary if k.startswith("retention_")} == {f"retention_{m}" for m in METRICS}


def test_retention_drop_ci_is_paired(tmp_path):
    """The same general questions right before and after (others lost in between): G_0 - G_T is 0 on any
    resample of the questions when G_0 and G_T are scored on the same draw."""
    kept = [True, False] * 4
    retention = [kept, [False] * 8, kept]
    run = write_staged_run(tmp_path / "run", {"valqa": matrix_of([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])}, retention)
    entry = continual_summary(run)[0]["retention_exact_match"]
    assert entry["g"] == [0.5, 0.0, 0.5] and entry["g0_minus_gt"] == 0.0 and entry["g0_minus_gt_ci95"] == [0.0, 0.0]


def test_cli_prints_the_summary_and_writes_it(tmp_path, capsys):
    run = write_staged_run(
        tmp_path / "run", {"valqa": matrix_of(PEAK_THEN_FORGET), "testqa": matrix_of(TOTAL_FORGETTING)}
    )
    cli.main(["continual-summary", str(run)])
    printed = json.loads(capsys.readouterr().out)
    written = run / "metrics" / "continual_summary.json"
    assert json.loads(written.read_text()) == printed
    assert sorted(printed) == sorted(f"{s}_{m}" for s in ("valqa", "testqa") for m in METRICS)
    assert printed["valqa_token_f1"]["forgetting"] == 0.375 and printed["testqa_exact_match"]["bwt"] == -1.0
    assert [p.name for p in written.parent.iterdir() if p.name.startswith(".")] == []  # no temp file left
    written.unlink()
    report = write_continual_summary(run).splitlines()  # what the loop calls and prints at the end of a staged run
    assert json.loads(written.read_text()) == printed
    ci = {name: "[{:.3f}, {:.3f}]".format(*printed["valqa_exact_match"][f"{name}_ci95"]) for name in ("acc", "bwt")}
    assert report[0].startswith(f"valqa_exact_match: ACC 0.750 {ci['acc']}  BWT -0.250 {ci['bwt']}  forgetting 0.375 [")
    assert report[1:6] == [
        "                    s1      s2      s3",
        "  base            0.00    0.25    0.00",
        "  after s1        0.75    0.50    0.00",
        "  after s2        1.00    1.00    0.25",
        "  after s3        0.50    0.75    1.00",
    ]
    assert report[-1] == f"wrote {written}"


@pytest.mark.parametrize(
    "case, note",
    [
        ("missing", "no eval_details/s2_valqa_step_000030.jsonl"),
        ("reordered", "the s2_valqa details differ in questions from step to step or from the matrix's n"),
    ],
)
def test_details_that_do_not_pair_leave_the_numbers_and_drop_the_cis_with_a_note(tmp_path, capsys, case, note):
    run = write_staged_run(tmp_path / "run", {"valqa": matrix_of(PEAK_THEN_FORGET)})
    details = run / "eval_details" / "s2_valqa_step_000030.jsonl"
    if case == "missing":
        details.unlink()
    else:  # the questions asked in another order: resampling by position would no longer pair them
        details.write_text("".join(reversed(details.read_text().splitlines(keepends=True))))
    cli.main(["continual-summary", str(run)])
    out, err = capsys.readouterr()
    entry = json.loads(out)["valqa_exact_match"]
    assert entry["forgetting"] == 0.375 and entry["acc_ci95"] is None and entry["forgetting_ci95"] is None
    assert err == f"cbe: note: no 95% CIs for valqa: {note}\n"


@pytest.mark.parametrize(
    "case, message",
    [
        ("no-matrix", "no metrics/stage_matrix.jsonl; pass the run dir of a staged run (a task with data.stages)"),
        ("unfinished", "no rows after stage 2, 3: the run has not finished them; re-run its command to resume it"),
    ],
)
def test_summary_mistakes_are_one_line(tmp_path, capfd, case, message):
    run = write_staged_run(tmp_path / "run", {"valqa": matrix_of(PEAK_THEN_FORGET)})
    matrix = run / "metrics" / "stage_matrix.jsonl"
    if case == "no-matrix":
        matrix.unlink()
    else:  # killed in stage 2: rows 0 and 1 only
        write_lines(
            matrix, [line for line in map(json.loads, matrix.read_text().splitlines()) if line["after_stage"] < 2]
        )
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["continual-summary", str(run)])
    err = capfd.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("cbe: error: ") and message in err and err.count("\n") == 1
    assert not (run / "metrics" / "continual_summary.json").exists()


def test_a_recorder_resumed_after_stage_1_holds_the_rows_on_file_and_the_later_ones_in_memory(tmp_path):
    """The loop resumes from step 10 (after stage 1) and evaluates on: the recorder's first rows are those on file,
    the later ones those it is given (their details files gone, it holds them), and its summary is the one of the
    finished run's files."""
    retention = [questions(v, 8) for v in (0.75, 0.625, 0.5, 0.25)]
    matrices = {"valqa": matrix_of(PEAK_THEN_FORGET), "testqa": matrix_of(TOTAL_FORGETTING)}
    run = RunDir(write_staged_run(tmp_path / "run", matrices, retention=retention))
    finished_matrix, results = read_jsonl(run.stage_matrix), read_jsonl(run.eval_results)
    expected = write_continual_summary(run)
    run.drop_metrics_after(10)  # what the loop does on resuming from checkpoint-10
    recorder = StageRecorder(run, ["s1", "s2", "s3"])
    for result in (r for r in results if r["step"] > 10):  # the evaluations after the checkpoint, in turn
        step, details = result["step"], {}
        if step % STEPS_PER_STAGE == 0:  # a stage's end: every set asked
            sets = ["retention", *(f"s{j}_{kind}" for j in (1, 2, 3) for kind in ("valqa", "testqa"))]
            details = {name: read_jsonl(run.details_path(name, step)) for name in sets}
            result = {k: v for name in sets for k, v in summarize(details[name], qa_set=name).items()} | result
        recorder.on_eval(step, result, details)
        if step % STEPS_PER_STAGE == 0:
            recorder.on_stage_end(step // STEPS_PER_STAGE, step, result, details)
            for path in run.eval_details.glob(f"*_step_{step:06d}.jsonl"):
                path.unlink()
    assert sorted(map(json.dumps, read_jsonl(run.stage_matrix))) == sorted(map(json.dumps, finished_matrix))
    write_lines(run.eval_results, results)  # the loggers' lines of those evaluations
    assert recorder.summary() == expected


def base_details_and_qa(tmp_path: Path) -> tuple[Path, Path]:
    """A QA file and the details file that `mode=eval checkpoint=base eval.qa_data=... eval.save_details=...`
    writes for it: one record per question asked, with its qa_set; the last question was not asked."""
    qa = [
        {"question": "Capital of France?", "answer": "Paris", "id": "a"},
        {"question": "2 + 2?", "answer": 4, "id": "b"},
        {"question": "Largest ocean?", "answer": "Pacific", "id": "c"},
        {"question": "Author of Hamlet?", "answer": "Shakespeare", "id": "d"},
        {"question": "Not asked?", "answer": "x", "id": "e"},
    ]
    predictions = ["Paris", "4", "The Pacific Ocean", "shakespeare."]
    details = [
        {
            "qa_set": "general",
            "question": r["question"],
            "ground_truth": str(r["answer"]),
            "id": r["id"],
            "prompt": f"Q: {r['question']}\nA:",
            "raw_prediction": f" {p}\n",
            "parsed_prediction": p,
            "exact_match": p.lower().rstrip(".") == str(r["answer"]).lower(),
            "substring_match": True,
            "fuzzy_match": True,
            "token_f1": 1.0,
        }
        for r, p in zip(qa, predictions)
    ]
    write_lines(tmp_path / "general.jsonl", qa)
    write_lines(tmp_path / "base_details.jsonl", details)
    return tmp_path / "base_details.jsonl", tmp_path / "general.jsonl"


def test_retention_set_keeps_the_questions_the_base_model_answers_exactly(tmp_path, capsys):
    details, qa = base_details_and_qa(tmp_path)
    output = tmp_path / "retention.jsonl"
    cli.main(["retention-set", "--details", str(details), "--qa", str(qa), "--output", str(output)])
    kept = [json.loads(line) for line in output.read_text().splitlines()]
    assert kept == [  # the QA records as they were, in their order (a substring match is not kept)
        {"question": "Capital of France?", "answer": "Paris", "id": "a"},
        {"question": "2 + 2?", "answer": 4, "id": "b"},
        {"question": "Author of Hamlet?", "answer": "Shakespeare", "id": "d"},
    ]
    out = capsys.readouterr().out
    assert f"kept 3 of 5 questions of {qa} (answered exactly); 1 were not in the details file" in out
    assert f"wrote {output}" in out


@pytest.mark.parametrize(
    "case, message",
    [
        ("no-details", "no such file"),
        ("other-qa", "none of the questions of"),
        ("none-right", "the model answered no question exactly; no retention set to write"),
    ],
)
def test_retention_set_mistakes_are_one_line(tmp_path, capfd, case, message):
    details, qa = base_details_and_qa(tmp_path)
    if case == "no-details":
        details.unlink()
    elif case == "other-qa":
        write_lines(qa, [{"question": "Something else?", "answer": "y"}])
    else:
        records = [json.loads(line) | {"exact_match": False} for line in details.read_text().splitlines()]
        write_lines(details, records)
    output = tmp_path / "retention.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["retention-set", "--details", str(details), "--qa", str(qa), "--output", str(output)])
    err = capfd.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("cbe: error: ") and message in err and err.count("\n") == 1
    assert not output.exists()
