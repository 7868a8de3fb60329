"""The Kauldron backend end to end, and its parity with the HF backend: same weights, same data, same metrics."""

import json
import os
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cbe.plot import read_tensorboard_scalars
from tests.backends.hf.test_trainer import assert_same_metrics, eval_results
from tests.logging.test_loggers import GLUED, train_lines

pytestmark = pytest.mark.slow

# TensorFlow's start-up banners (kauldron imports TF), known harmless and kept out of a run's output.
TF_BANNERS = ("oneDNN custom operations are on", "All log messages before absl::InitializeLog", "cpu_feature_guard")

# Two micro-batches of 4 rows per optimizer step, so gradient accumulation is part of the comparison.
TINY_STEPS = [
    "training.num_train_steps=4",
    "training.eval_every=2",
    "training.save_every=2",
    "training.per_device_batch_size=4",
    "logging.log_every_n_steps=1",
    "training.max_checkpoints=2",
]


def run_both(run_main, tmp_path, *overrides: str) -> dict[str, Path]:
    """The same command with backend=hf and backend=kd; the run dir of each."""
    runs = {}
    for backend in ("hf", "kd"):
        run_main(f"backend={backend}", *overrides, f"logging.run_name={backend}")
        runs[backend] = tmp_path / "outputs" / "cbe" / backend
    return runs


def train_losses(run: Path) -> list[float]:
    events = EventAccumulator(str(run / "logs" / "tensorboard"))
    events.Reload()
    return [e.value for e in events.Scalars("train/loss")]


def predictions(run: Path, qa_set: str, step: int) -> list[str]:
    lines = (run / "eval_details" / f"{qa_set}_step_{step:06d}.jsonl").read_text().splitlines()
    return [json.loads(line)["raw_prediction"] for line in lines]


def same_fraction(a: list[str], b: list[str]) -> float:
    assert len(a) == len(b) > 0
    return sum(x == y for x, y in zip(a, b)) / len(a)


def test_clipping_is_the_same_in_both_backends(run_main, tmp_path):
    """optimizer.max_grad_norm clips both backends' gradients alike (null clips nothing: the test below)."""
    runs = run_both(run_main, tmp_path, *TINY_STEPS, "optimizer.max_grad_norm=0.05")
    clipped = {backend: train_losses(run) for backend, run in runs.items()}
    assert clipped["kd"] == pytest.approx(clipped["hf"], rel=1e-3)
    (tmp_path / "outputs" / "cbe" / "hf").rename(tmp_path / "clipped")
    run_main("backend=hf", *TINY_STEPS, "optimizer.max_grad_norm=null", "logging.run_name=hf")
    unclipped = train_losses(tmp_path / "outputs" / "cbe" / "hf")
    assert clipped["hf"][0] == pytest.approx(unclipped[0])  # the same start: clipping acts from the first update
    # Clipping changed training by several times the tolerance the backends agree to (AdamW undoes most of a
    # gradient's scale, so the change is small, about 0.4% here).
    assert max(abs(c - u) / u for c, u in zip(clipped["hf"], unclipped)) > 3e-3


def test_tiny_kd_run_matches_hf_step_for_step(run_main, tmp_path):
    runs = run_both(run_main, tmp_path, *TINY_STEPS, "optimizer.max_grad_norm=null")  # no clipping: the recipes'
    kd, hf = eval_results(runs["kd"]), eval_results(runs["hf"])

    # The same layout and the same metric keys as HF.
    assert [m["step"] for m in kd] == [m["step"] for m in hf] == [0, 2, 4]
    assert kd[0].keys() == hf[0].keys()
    assert sorted(p.name for p in (runs["kd"] / "eval_details").iterdir()) == sorted(
        p.name for p in (runs["hf"] / "eval_details").iterdir()
    )
    assert sorted(p.name for p in (runs["kd"] / "checkpoints").glob("ckpt_*")) == ["ckpt_2", "ckpt_4"]
    assert os.readlink(runs["kd"] / "checkpoints" / "latest") == "ckpt_4"
    assert "params: " in (runs["kd"] / "logs" / "train.log").read_text()

    # The same console: the repetition report, train lines of numbers, eval lines of their own; the same train
    # scalars, among them the epoch as rows seen / packed rows (the sample track's 8 rows, 8 a step).
    logs = {backend: (run / "logs" / "train.log").read_text() for backend, run in runs.items()}
    reports = {
        b: [line for line in log.splitlines() if line.startswith(("repetition:", "warning:"))]
        for b, log in logs.items()
    }
    assert reports["kd"] == reports["hf"] and len(reports["kd"]) == 2
    kd_lines = train_lines(logs["kd"])
    assert [line["epoch"] for line in kd_lines] == [1.0, 2.0, 3.0, 4.0] and not GLUED.search(logs["kd"])
    assert all(isinstance(v, float) for line in kd_lines for v in line.values())
    scalars = {b: read_tensorboard_scalars(run / "logs" / "tensorboard") for b, run in runs.items()}
    assert scalars["kd"]["train/epoch"] == scalars["hf"]["train/epoch"] == {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}
    assert {tag for tag in scalars["kd"] if tag.startswith("train/")} <= set(scalars["hf"])

    # Same weights, same rows: the same losses, in evaluation and in every optimizer step.
    for a, b in zip(kd, hf):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-3), a["step"]
    assert train_losses(runs["kd"]) == pytest.approx(train_losses(runs["hf"]), rel=1e-3)
    assert kd[-1]["eval_loss"] < kd[0]["eval_loss"] - 0.5  # and they did train
    # The same greedy answers (an untrained and a 4-step model both answer with noise, so this is strict).
    for step in (0, 4):
        for qa_set in ("valqa", "testqa"):
            assert same_fraction(predictions(runs["kd"], qa_set, step), predictions(runs["hf"], qa_set, step)) >= 0.98


def test_lora_first_steps_agree_with_hf(run_main, tmp_path):
    """LoRA on the same base weights: the first 5 optimizer steps' losses agree within 2% while training moves them.

    (The LoRA factors are initialised by each library, B = 0, so both start from the base model's function.)
    """
    runs = run_both(
        run_main,
        tmp_path,
        "adapter=lora128",
        "training.num_train_steps=5",
        "training.eval_every=5",
        "training.save_every=5",
        "logging.log_every_n_steps=1",
        "optimizer.lr=1e-3",
    )
    kd, hf = train_losses(runs["kd"]), train_losses(runs["hf"])
    assert len(kd) == len(hf) == 5
    assert kd == pytest.approx(hf, rel=0.02)
    assert hf[-1] < 0.9 * hf[0] and kd[-1] < 0.9 * kd[0]


def test_killed_kd_run_resumes_from_latest_without_duplicate_metrics(run_main, run_main_killed_after_eval, tmp_path):
    steps = [
        "backend=kd",
        "training.num_train_steps=12",
        "training.eval_every=3",
        "training.save_every=6",
        "logging=none",
    ]
    proc = run_main(*steps, "logging.run_name=straight")
    assert not [banner for banner in TF_BANNERS if banner in proc.stderr]
    straight = eval_results(tmp_path / "outputs" / "cbe" / "straight")

    # Kill right after the step-9 evaluation, which no checkpoint covers (latest = ckpt_6).
    run = tmp_path / "outputs" / "cbe" / "killed"
    run_main_killed_after_eval(run, 9, *steps, "logging.run_name=killed")
    assert os.readlink(run / "checkpoints" / "latest") == "ckpt_6"

    resumed = run_main(*steps, "logging.run_name=killed")
    assert "resuming from" in resumed.stdout and "eval | step 0 " not in resumed.stdout
    results = eval_results(run)
    assert [m["step"] for m in results] == [m["step"] for m in straight] == [0, 3, 6, 9, 12]
    for a, b in zip(results, straight):
        assert_same_metrics(a, b)

    # mode=eval restores the orbax checkpoint and reproduces training's numbers at that step.
    checkpoint = run / "checkpoints" / "latest"
    run_main("backend=kd", "mode=eval", f"checkpoint={checkpoint}", "logging=none")
    [evaluated_dir] = (run / "eval" / "ckpt_12").iterdir()
    evaluated = eval_results(evaluated_dir)[0]
    assert_same_metrics(evaluated, results[-1])


def test_two_devices_shard_the_params_and_match_one_device(run_main, tmp_path, monkeypatch):
    common = [
        "backend=kd",
        "training.num_train_steps=3",
        "training.eval_every=3",
        "training.save_every=3",
        "training.per_device_batch_size=4",
        "backend.trainer.fsdp_min_size_mb=0",
        "logging=none",
    ]
    # 1 device: 2 accumulated micro-batches of 4 rows; 2 devices: 1 micro-batch of 8 rows, FSDP params.
    # Each step's loss is the mean over all its trained tokens, so both compute the same updates.
    run_main(*common, "logging.run_name=one")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    two = run_main(*common, "logging.run_name=two")
    assert "arrays sharded over 2 device(s) (FSDP), accumulation 1" in two.stdout
    assert " 0 of " not in two.stdout.split("params: ")[1].splitlines()[0]
    one_results, two_results = (eval_results(tmp_path / "outputs" / "cbe" / name) for name in ("one", "two"))
    for a, b in zip(one_results, two_results):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-5)


def test_zero_steps_gives_the_same_start_in_both_backends_on_gemma3_270m(run_main, tmp_path):
    """The real 270M model, converted from its HF checkpoint: the same step-0 eval loss and greedy answers."""
    runs = run_both(
        run_main,
        tmp_path,
        "model=gemma3_270m",
        "training.num_train_steps=0",
        "eval.max_questions=12",
        "eval.max_new_tokens=8",
        "eval.batch_size=24",
        "logging=none",
    )
    kd, hf = eval_results(runs["kd"]), eval_results(runs["hf"])
    assert kd[0]["eval_loss"] == pytest.approx(hf[0]["eval_loss"], rel=1e-3)
    for qa_set in ("valqa", "testqa"):
        assert same_fraction(predictions(runs["kd"], qa_set, 0), predictions(runs["hf"], qa_set, 0)) >= 0.98


def test_the_kd_demo_memorizes_the_sample_track(run_main, tmp_path):
    """`python main.py backend=kd` completes like the HF demo: valqa exact match climbs from ~0 to >= 0.8."""
    run_main("backend=kd", "logging.run_name=demo")
    results = eval_results(tmp_path / "outputs" / "cbe" / "demo")
    assert results[0]["valqa_exact_match"] <= 0.05 and results[-1]["valqa_exact_match"] >= 0.8
    assert results[-1]["eval_loss"] < results[0]["eval_loss"] / 5
