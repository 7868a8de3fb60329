"""The HF backend end to end on the tiny model: the run layout, resume after a kill, LoRA, the demo itself."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

SHORT = ["training.num_train_steps=6", "training.eval_every=3", "training.save_every=3", "training.max_checkpoints=2"]


def eval_results(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics" / "eval_results.jsonl").read_text().splitlines()]


def assert_same_metrics(a: dict, b: dict) -> None:
    """Two evaluations agree on every metric (the timestamp aside, eval_loss up to float noise)."""
    assert a.keys() == b.keys()
    for key in a.keys() - {"timestamp", "eval_loss"}:
        assert a[key] == b[key], key
    assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-5)


def only_dir(folder: Path) -> Path:
    [inside] = folder.iterdir()
    return inside


def test_tiny_run_writes_the_output_layout(run_main, tmp_path):
    before = sorted(os.listdir(ROOT))
    proc = run_main(
        *SHORT, "logging.project_name=proj", "logging.run_name=layout", 'eval.prompt_template="Recall: {question}"'
    )
    run = tmp_path / "outputs" / "proj" / "layout"
    assert sorted(os.listdir(ROOT)) == before  # nothing lands in the current directory
    assert f"run dir: {run}" in proc.stdout

    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["training"]["num_train_steps"] == 6 and "${" not in (run / "config.yaml").read_text()
    assert (run / ".hydra" / "overrides.yaml").exists()

    log = (run / "logs" / "train.log").read_text()
    assert "train: " in log and "padding" in log and "eval | step 6" in log
    assert "eval | step 6" in proc.stdout
    # How often the run repeats its corpus, said once at the start: the sample track packs into 8 rows, 8 a step.
    repetition = (
        "repetition: the training corpus is 8 packed rows; one optimizer step (8 rows) is 1 epoch, the whole "
        "run (6 steps) 6 epochs\nwarning: one optimizer step holds the whole training corpus"
    )
    assert log.count(repetition) == 1 and proc.stdout.count(repetition) == 1
    assert list((run / "logs" / "tensorboard").glob("events.out.tfevents.*"))

    checkpoints = sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-3", "checkpoint-6"]
    assert os.readlink(run / "checkpoints" / "latest") == "checkpoint-6"
    assert (run / "checkpoints" / "checkpoint-6" / "optimizer.pt").exists()

    results = eval_results(run)
    assert [m["step"] for m in results] == [0, 3, 6]
    for m in results:
        for key in (
            "timestamp",
            "eval_loss",
            "valqa_exact_match",
            "valqa_fuzzy_match",
            "valqa_token_f1",
            "valqa_n",
            "testqa_exact_match",
            "testqa_n",
            "valqa_exact_match_supports_ge_2",
            "valqa_n_supports_ge_2",
        ):
            assert key in m, key
    assert results[-1]["eval_loss"] < results[0]["eval_loss"]

    details = [json.loads(line) for line in (run / "eval_details" / "valqa_step_000003.jsonl").read_text().splitlines()]
    assert len(details) == results[1]["valqa_n"] == 72
    assert {
        "prompt",
        "question",
        "raw_prediction",
        "parsed_prediction",
        "ground_truth",
        "exact_match",
        "fuzzy_match",
        "supports",
    } <= set(details[0])
    assert sorted(p.name for p in (run / "eval_details").iterdir()) == [
        f"{s}_step_{n:06d}.jsonl" for s in ("testqa", "valqa") for n in (0, 3, 6)
    ]

    # mode=eval of the final checkpoint, with no other setting, composes as the run did (its template here), gives
    # exactly training's evaluation at that step, and lands inside the run, named by what it evaluated...
    latest = run / "checkpoints" / "latest"
    proc = run_main("mode=eval", f"checkpoint={latest}")
    evaluated = only_dir(run / "eval" / "checkpoint-6")
    assert evaluated.name.startswith("valqa+testqa-") and f"wrote {evaluated}" in proc.stdout
    assert_same_metrics(eval_results(evaluated)[0], results[-1])
    assert "prompt of the first valqa question: 'Recall: The Zorblat was first seen in'" in proc.stdout
    assert "[exact]" in proc.stdout or "[fuzzy]" in proc.stdout or "[wrong]" in proc.stdout
    assert "valqa" in proc.stdout and "95% CI" in proc.stdout and " on data/sample/val.jsonl" in proc.stdout

    # ...another QA file, with a template typed with a backslash-n, keeps its own result beside the first...
    run_main(
        "mode=eval",
        f"checkpoint={latest}",
        "eval.qa_data=data/sample/testqa.jsonl",
        'eval.prompt_template="Q: {question}\\nA:"',
    )
    assert len(list((run / "eval" / "checkpoint-6").iterdir())) == 2 and eval_results(evaluated)
    other = next(p for p in (run / "eval" / "checkpoint-6").iterdir() if p != evaluated)
    prompt = json.loads((other / "eval_details" / "testqa_step_000006.jsonl").read_text().splitlines()[0])["prompt"]
    assert prompt == "Q: The Zorblat is colored\nA:"  # a real newline

    # ...and checkpoint=base the untrained baseline at step 0, here on one QA file with its details saved.
    saved = tmp_path / "base_details.jsonl"
    run_main(
        "mode=eval",
        "checkpoint=base",
        "eval.qa_data=data/sample/valqa.jsonl",
        f"eval.save_details={saved}",
        'eval.prompt_template="Recall: {question}"',
    )
    base = eval_results(only_dir(tmp_path / "outputs" / "cbe" / "sample" / "tiny-full-hf" / "eval" / "base"))[0]
    assert_same_metrics(base, {k: v for k, v in results[0].items() if not k.startswith("testqa")})

    # cbe rescore recomputes the same metrics from the saved raw predictions.
    rescored = json.loads(
        subprocess.run(
            [sys.executable, "-m", "cbe.cli", "rescore", str(saved), "--support-thresholds", "2"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert {
        k: rescored[k] for k in ("n", "exact_match", "fuzzy_match", "token_f1", "exact_match_ci95", "n_supports_ge_2")
    } == {
        k: base[f"valqa_{k}"]
        for k in ("n", "exact_match", "fuzzy_match", "token_f1", "exact_match_ci95", "n_supports_ge_2")
    }


def test_killed_run_resumes_the_same_steps_without_duplicate_metrics(run_main, run_main_killed_after_eval, tmp_path):
    steps = ["training.num_train_steps=40", "training.eval_every=5", "training.save_every=10"]
    run_main(*steps, "logging.run_name=straight")
    straight = eval_results(tmp_path / "outputs" / "cbe" / "straight")

    # Kill the second run right after an evaluation that no checkpoint covers yet (step 15, latest = 10).
    run = tmp_path / "outputs" / "cbe" / "killed"
    run_main_killed_after_eval(run, 15, *steps, "logging.run_name=killed")
    assert os.readlink(run / "checkpoints" / "latest") == "checkpoint-10"
    assert [m["step"] for m in eval_results(run)][-1] == 15

    resumed = run_main(*steps, "logging.run_name=killed")
    assert "resuming from" in resumed.stdout
    results = eval_results(run)
    assert [m["step"] for m in results] == [m["step"] for m in straight] == list(range(0, 41, 5))
    for a, b in zip(results, straight):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-4, abs=1e-5), (
            a["step"],
            a["eval_loss"],
            b["eval_loss"],
        )
        assert a["valqa_exact_match"] == b["valqa_exact_match"]
    log = (run / "logs" / "train.log").read_text()
    assert log.count("eval | step 0 ") == 1 and "resuming from" in log


def test_lora_trains_only_the_adapter(run_main, tmp_path):
    proc = run_main(
        "adapter=lora128",
        "training.num_train_steps=2",
        "training.eval_every=2",
        "training.save_every=2",
        "logging=none",
    )
    assert "FutureWarning" not in proc.stderr  # transformers' is_gradient_checkpointing notice, read by PEFT and TRL
    checkpoint = tmp_path / "outputs" / "cbe" / "sample" / "tiny-lora128-hf" / "checkpoints" / "checkpoint-2"
    adapter = json.loads((checkpoint / "adapter_config.json").read_text())
    assert adapter["r"] == 128 and adapter["lora_alpha"] == 128
    assert all(name in adapter["target_modules"] for name in ("q_proj", "down_proj"))
    from safetensors.numpy import load_file

    weights = load_file(checkpoint / "adapter_model.safetensors")
    assert weights and all("lora_" in name for name in weights)
    assert not list((tmp_path / "outputs" / "cbe" / "sample" / "tiny-lora128-hf" / "logs" / "tensorboard").glob("*"))

    # The adapter dir evaluates on its own (base model + adapter) to training's numbers at that step.
    run_main("adapter=lora128", "mode=eval", f"checkpoint={checkpoint}", "logging=none")
    training = eval_results(checkpoint.parents[1])[-1]
    evaluated = eval_results(only_dir(checkpoint.parents[1] / "eval" / "checkpoint-2"))[0]
    assert_same_metrics(evaluated, training)


def test_multirun_gives_each_job_its_own_run_dir_and_a_sweep_summary(run_main, tmp_path):
    proc = run_main(
        "-m",
        "optimizer.lr=1e-3,3e-3",
        "training.num_train_steps=2",
        "training.eval_every=2",
        "training.save_every=2",
        "logging=none",
    )
    sweep = tmp_path / "outputs" / "cbe" / "sample" / "tiny-full-hf"
    jobs = sorted(p.name for p in sweep.iterdir() if (p / "metrics").exists())
    # Named from the job's overrides; logging and output_root are left out (they change no result).
    assert jobs == [
        f"optimizer.lr={lr},training.eval_every=2,training.num_train_steps=2,training.save_every=2"
        for lr in ("0.001", "0.003")
    ]
    for job in jobs:
        assert [m["step"] for m in eval_results(sweep / job)] == [0, 2]
        assert (sweep / job / "logs" / "train.log").read_text().count("eval | step 2") == 1
    summary = [json.loads(line) for line in (sweep / "sweep_summary.jsonl").read_text().splitlines()]
    assert [s["job"] for s in summary] == jobs
    for s, job in zip(summary, jobs):
        results = eval_results(sweep / job)
        assert s["last_step"] == 2 and s["final_eval_loss"] == results[-1]["eval_loss"]
        assert s["best_eval_loss"] == min(m["eval_loss"] for m in results)
        assert s["best_valqa_fuzzy_match"] == max(m["valqa_fuzzy_match"] for m in results)
    table = proc.stdout[proc.stdout.index("eval_loss final/best") - 200 :]
    assert "optimizer.lr=0.001" in table and "optimizer.lr=0.003" in table and "sweep_summary.jsonl" in table


def test_zero_steps_evaluates_the_start_only(run_main, tmp_path):
    run_main("training.num_train_steps=0", "logging.run_name=zero")
    run = tmp_path / "outputs" / "cbe" / "zero"
    assert [m["step"] for m in eval_results(run)] == [0]
    assert not (run / "checkpoints").exists()


def test_torchrun_trains_like_one_process_with_the_same_effective_batch(run_main, tmp_path, cache_dir):
    """Two ranks (gloo) with 4 rows each per step against one process accumulating 2 x 4: the same metrics;
    the ranks share one run dir, only rank 0 writes, and evaluation is sharded over both."""
    run = [
        "training.num_train_steps=6",
        "training.eval_every=3",
        "training.save_every=3",
        "eval.max_questions=12",
        "training.effective_batch_size=8",
        "training.per_device_batch_size=4",
        "logging=none",
    ]
    run_main(*run, "logging.project_name=single")
    env = {**os.environ, "CBE_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "main.py"),
            f"output_root={tmp_path / 'outputs'}",
            *run,
            "logging.project_name=ddp",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["ddp", "single"]  # one run dir per run
    single, ddp = (tmp_path / "outputs" / project / "sample" / "tiny-full-hf" for project in ("single", "ddp"))
    assert [m["step"] for m in eval_results(ddp)] == [0, 3, 6]  # rank 0 alone appends
    for a, b in zip(eval_results(ddp), eval_results(single), strict=True):
        assert_same_metrics(a, b)
    assert (ddp / "logs" / "train.log").read_text().count("eval | step 6") == 1
    assert sorted(p.name for p in (ddp / "checkpoints").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert len((ddp / "eval_details" / "valqa_step_000006.jsonl").read_text().splitlines()) == 12


@pytest.mark.slow
def test_the_demo_memorizes_the_sample_track(run_main, tmp_path):
    """`make demo` is the default config: eval loss falls and valqa exact match climbs from ~0 to >= 0.8."""
    run_main("logging.run_name=demo")
    results = eval_results(tmp_path / "outputs" / "cbe" / "demo")
    losses = [m["eval_loss"] for m in results]
    assert losses[-1] < losses[0] / 4 and losses[-1] == min(losses)
    assert results[0]["valqa_exact_match"] <= 0.05 and results[-1]["valqa_exact_match"] >= 0.8
