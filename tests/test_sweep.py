"""Sweep summaries, failing jobs, and the submitit path on this machine (hydra/launcher=submitit_local)."""

import json
import subprocess
import sys

import pytest
import yaml
from hydra.core.utils import JobReturn, JobStatus

from cbe.errors import UserError
from cbe.run import write_jsonl_atomic
from cbe.sweep import FailJobOnError, format_table, summarize_sweep


def fake_job(sweep, name, overrides, results):
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if results is not None:
        write_jsonl_atomic(job / "metrics" / "eval_results.jsonl", results)


def test_summary_has_final_and_best_per_job(tmp_path):
    fake_job(
        tmp_path,
        "optimizer.lr=0.001",
        ["optimizer.lr=0.001", "task=sample"],
        [
            {
                "step": 0,
                "eval_loss": 7.0,
                "valqa_exact_match": 0.0,
                "valqa_substring_match": 0.25,
                "valqa_fuzzy_match": 0.1,
                "valqa_substring_match_supports_ge_2": 0.5,
                "valqa_n": 4,
            },
            {
                "step": 10,
                "eval_loss": 2.0,
                "valqa_exact_match": 0.75,
                "valqa_substring_match": 1.0,
                "valqa_fuzzy_match": 0.75,
                "valqa_substring_match_supports_ge_2": 1.0,
                "valqa_n": 4,
            },
            {
                "step": 20,
                "eval_loss": 2.5,
                "valqa_exact_match": 0.5,
                "valqa_substring_match": 0.75,
                "valqa_fuzzy_match": 0.5,
                "valqa_substring_match_supports_ge_2": 0.5,
                "valqa_n": 4,
            },
        ],
    )
    fake_job(tmp_path, "optimizer.lr=0.01", ["optimizer.lr=0.01", "task=sample"], None)  # crashed before step 0
    summaries = summarize_sweep(tmp_path)
    assert [json.loads(line) for line in (tmp_path / "sweep_summary.jsonl").read_text().splitlines()] == summaries
    done, crashed = summaries
    assert done == {
        "job": "optimizer.lr=0.001",
        "overrides": ["optimizer.lr=0.001", "task=sample"],
        "last_step": 20,
        "final_eval_loss": 2.5,
        "best_eval_loss": 2.0,
        "final_valqa_exact_match": 0.5,
        "best_valqa_exact_match": 0.75,
        "final_valqa_substring_match": 0.75,
        "best_valqa_substring_match": 1.0,
        "final_valqa_fuzzy_match": 0.5,
        "best_valqa_fuzzy_match": 0.75,
    }
    assert crashed == {"job": "optimizer.lr=0.01", "overrides": ["optimizer.lr=0.01", "task=sample"], "last_step": None}
    table = format_table(summaries).splitlines()
    assert table[0].split()[2:] == [
        "eval_loss",
        "final/best",
        "valqa",
        "exact",
        "final/best",
        "valqa",
        "substring",
        "final/best",
        "valqa",
        "fuzzy",
        "final/best",
    ]
    assert table[1].split() == [
        "optimizer.lr=0.001",
        "20",
        "2.500",
        "/",
        "2.000",
        "0.500",
        "/",
        "0.750",
        "0.750",
        "/",
        "1.000",
        "0.500",
        "/",
        "0.750",
    ]
    assert table[2].split()[:2] == ["optimizer.lr=0.01", "-"]  # the shared task=sample names no job


def test_summary_of_a_folder_without_jobs_is_one_line(tmp_path):
    with pytest.raises(UserError, match="no sweep jobs here"):
        summarize_sweep(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "cbe.cli", "sweep-summary", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no sweep jobs here" in proc.stderr


def test_a_failed_job_raises_inside_submitit_only(monkeypatch):
    failed = JobReturn(status=JobStatus.FAILED, _return_value=RuntimeError("boom"))
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    FailJobOnError().on_job_end(config=None, job_return=failed)  # Hydra's own launcher reports it itself
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    with pytest.raises(RuntimeError, match="boom"):
        FailJobOnError().on_job_end(config=None, job_return=failed)
    FailJobOnError().on_job_end(config=None, job_return=JobReturn(status=JobStatus.COMPLETED, _return_value=None))


def test_submitit_local_runs_the_sweep_and_a_failing_job_is_one_line(run_main, tmp_path):
    proc = run_main(
        "-m",
        "hydra/launcher=submitit_local",
        "training.num_train_steps=-1,2",
        "training.eval_every=2",
        "training.save_every=2",
        "logging=none",
        "eval.max_questions=4",
        check=False,
    )
    assert proc.returncode == 1
    message = proc.stderr.strip().splitlines()
    assert len(message) == 1 and message[0].startswith(
        "cbe: error: a sweep job failed: training.num_train_steps "
        "must be 0 (evaluate the start only) or more, got -1; its log: "
    )
    sweep = tmp_path / "outputs" / "cbe" / "sample" / "tiny-full-hf"
    ok = sweep / "eval.max_questions=4,training.eval_every=2,training.num_train_steps=2,training.save_every=2"
    assert [json.loads(line)["step"] for line in (ok / "metrics" / "eval_results.jsonl").read_text().splitlines()] == [
        0,
        2,
    ]
