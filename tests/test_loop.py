"""The one run loop (cbe.loop), on both backends: runs killed at any moment and re-run until they finish write every
evaluation once, with the numbers of an uninterrupted run; a finished run is left alone; a changed re-run is refused
whether or not a checkpoint exists."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from cbe.config import validate
from cbe.data.packing import PackedRows, training_order
from cbe.errors import UserError
from cbe.loop import next_event
from cbe.plan import batch_plan, schedule, stages_of
from cbe.run import RunDir, read_jsonl
from tests.conftest import ROOT, main_command, run_main_under
from tests.results import assert_same_metrics, raw_predictions
from tests.test_config import compose_config

# 24 steps of 2 rows (the sample track at 64 tokens a row is 35 rows), so a wrong resume position changes the numbers.
SOAK = [
    "data.sequence_length=64",
    "training.effective_batch_size=2",
    "training.per_device_batch_size=2",
    "training.num_train_steps=12",
    "training.eval_every=4",
    "training.save_every=6",
    "optimizer.weight_decay=0.1",
    "eval.max_questions=2",
    "logging=none",
]


def eval_losses(run: Path) -> dict[int, float]:
    results = read_jsonl(run / "metrics" / "eval_results.jsonl")
    steps = [m["step"] for m in results]
    assert steps == sorted(set(steps)), f"eval steps written more than once or out of order: {steps}"
    return {m["step"]: m["eval_loss"] for m in results}


def start(output_root: Path, cache_dir: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "CBE_CACHE_DIR": str(cache_dir), "TOKENIZERS_PARALLELISM": "false"}
    command = main_command(f"output_root={output_root}", *overrides)
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> bool:
    """SIGKILL the process once `ready()`; False if it ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    return proc.wait() == -signal.SIGKILL


def snapshot(run: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of a run dir but Hydra's own record, with its content and modification time."""
    return {
        str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in run.rglob("*")
        if p.is_file() and ".hydra" not in p.parts
    }


@pytest.mark.parametrize("backend", ["hf", pytest.param("kd", marks=pytest.mark.kd)])
def test_a_run_killed_at_random_moments_and_rerun_writes_each_eval_once(backend, tmp_path, cache_dir):
    run_args = [f"backend={backend}", *SOAK]
    started = time.time()
    run_main_under(tmp_path / "straight", cache_dir, *run_args)
    straight_seconds = time.time() - started
    reference = eval_losses(tmp_path / "straight" / "cbe" / "sample" / f"tiny-full-{backend}")
    assert sorted(reference) == [0, 4, 8, 12]

    output = tmp_path / "killed"
    run = output / "cbe" / "sample" / f"tiny-full-{backend}"
    # After the step-4 evaluation and before the first checkpoint (step 6): the re-run starts afresh.
    proc = start(output, cache_dir, *run_args)
    assert kill_when(proc, lambda: 4 in eval_losses(run) if (run / "metrics").exists() else False)
    assert not (run / "checkpoints" / "latest").exists()
    # Then at seeded random moments across a run's length, re-running after each kill, until it finishes.
    rng = np.random.default_rng(0)
    for delay in rng.uniform(0.3, 0.9, size=2) * straight_seconds:
        proc = start(output, cache_dir, *run_args)
        if not kill_when(proc, lambda t=time.time() + delay: time.time() > t):
            break
    run_main_under(output, cache_dir, *run_args)
    resumed = eval_losses(run)
    assert sorted(resumed) == [0, 4, 8, 12]
    assert resumed == pytest.approx(reference, rel=1e-5)
    straight = tmp_path / "straight" / "cbe" / "sample" / f"tiny-full-{backend}"
    assert raw_predictions(run, "valqa", 12) == raw_predictions(straight, "valqa", 12)

    # Re-running the finished run: one line, exit 0, its files untouched.
    before = snapshot(run)
    proc = run_main_under(output, cache_dir, *run_args)
    assert proc.stdout.strip().splitlines() == [
        f"{run} is complete: 12 steps trained and evaluated; raise training.num_train_steps to extend it"
    ]
    assert snapshot(run) == before
    # A larger num_train_steps extends it.
    run_main_under(output, cache_dir, *run_args, "training.num_train_steps=16")
    assert sorted(eval_losses(run)) == [0, 4, 8, 12, 16]
    assert sorted(p.name for p in RunDir(run).saved_checkpoints()) == sorted(
        RunDir(run).checkpoint_dir(s, backend).name for s in (12, 16)
    )
    # mode=eval of the last checkpoint, and of the base model, reproduce the run's numbers at 16 and 0 (KD's base:
    # its step 0 is checked against HF's on the real 270M, tests/backends/kd/test_kd_trainer.py).
    results = {m["step"]: m for m in read_jsonl(run / "metrics" / "eval_results.jsonl")}
    evaluated_checkpoints = [(run / "checkpoints" / "latest", 16)] + ([("base", 0)] if backend == "hf" else [])
    for checkpoint, step in evaluated_checkpoints:
        run_main_under(output, cache_dir, *run_args, "mode=eval", f"checkpoint={checkpoint}")
        label = "base" if checkpoint == "base" else RunDir(run).checkpoint_dir(16, backend).name
        [evaluated] = (run / "eval" / label).iterdir()
        assert_same_metrics(read_jsonl(evaluated / "metrics" / "eval_results.jsonl")[0], results[step])
        assert raw_predictions(evaluated, "valqa", step) == raw_predictions(run, "valqa", step)


def test_a_changed_rerun_is_refused_before_the_first_checkpoint_as_after_it(tmp_path):
    first = compose_config("training.effective_batch_size=8")
    changed = compose_config("training.effective_batch_size=4", "training.per_device_batch_size=4")
    run = RunDir(tmp_path / "run")
    run.create(first)  # started, no checkpoint yet
    for checkpointed in (False, True):
        if checkpointed:
            run.checkpoint_dir(4, "hf").mkdir(parents=True)
            run.mark_latest(run.checkpoint_dir(4, "hf"))
        run.refuse_a_different_run(first)  # the same settings resume
        with pytest.raises(UserError, match="training.effective_batch_size=8, not 4"):
            run.refuse_a_different_run(changed)


def test_the_loop_stops_at_every_log_eval_save_and_the_end():
    cfg = OmegaConf.create(
        {"training": {"num_train_steps": 10, "eval_every": 4, "save_every": 6}, "logging": {"log_every_n_steps": 5}}
    )
    steps, stops = 0, []
    while steps < 10:
        steps = next_event(steps, cfg)
        stops.append(steps)
    assert stops == [4, 5, 6, 8, 10]


def staged_config(*overrides: str):
    return validate(compose_config("task=sample_stages", "training.effective_batch_size=8", *overrides))


def fake_rows(n: int) -> PackedRows:
    ids = np.zeros((n, 4), np.int32)
    return PackedRows(ids, ids, ids, np.zeros(n, np.int64))


def test_replay_draws_exact_counts_from_earlier_stages_only_seeded():
    sizes = [10, 12, 9]  # rows of stages s1, s2, s3, end to end: [0, 10), [10, 22), [22, 31)
    cfg = staged_config("continual.replay_fraction=0.25", "continual.steps_per_stage=5")
    stages = stages_of(cfg)
    plan = batch_plan(cfg, stages, [fake_rows(n) for n in sizes])
    assert plan.shape == (15, 8)
    for step, batch in enumerate(plan):
        k = step // 5
        start, end = sum(sizes[:k]), sum(sizes[: k + 1])
        own, past = batch[batch >= start], batch[batch < start]
        assert len(past) == (2 if k else 0)  # 0.25 x 8 rows replayed in stages 2 and 3, none in stage 1
        assert np.all(own < end)  # nothing from a later stage
        assert len(set(past)) == len(past)  # without replacement within a step
    assert {int(i) for i in plan[10:, 6:].ravel()} - set(range(22)) == set()  # stage 3 replays s1 and s2 rows
    assert np.array_equal(plan, batch_plan(cfg, stages, [fake_rows(n) for n in sizes]))  # seeded
    other = staged_config("continual.replay_fraction=0.25", "continual.steps_per_stage=5", "training.seed=7")
    assert not np.array_equal(plan, batch_plan(other, stages_of(other), [fake_rows(n) for n in sizes]))
    # Fraction 0: every stage reads only its own rows, in training_order, as a run of that corpus alone would.
    plain = staged_config("continual.steps_per_stage=5")
    no_replay = batch_plan(plain, stages_of(plain), [fake_rows(n) for n in sizes])
    assert np.array_equal(no_replay[:5].ravel(), training_order(10, 40, 42))
    assert np.array_equal(no_replay[5:10].ravel() - 10, training_order(12, 40, 43))


def test_stage_steps_and_the_schedule_per_stage_or_global():
    cfg = staged_config("continual.steps_per_stage=4", "+data.stages.1.steps=6", "optimizer.warmup_fraction=0.25")
    stages = stages_of(cfg)
    assert [(s.name, s.first_step, s.steps) for s in stages] == [("s1", 0, 4), ("s2", 4, 6), ("s3", 10, 4)]
    assert stages[-1].last_step == 14 and cfg.training.num_train_steps is None  # derived, not written back
    lr = cfg.optimizer.lr
    per_stage = schedule(cfg, stages)
    # Every stage warms up again from lr 0: 1 step of 4 (ceil(0.25 x 4)), peak at its second step ...
    assert per_stage[[0, 1, 10, 11]] == pytest.approx([0, lr, 0, lr])
    assert per_stage[4:7] == pytest.approx([0, lr / 2, lr])  # ... and 2 of 6 (ceil(0.25 x 6))
    assert per_stage[3] < per_stage[1] and per_stage[9] < per_stage[6]  # and decays within the stage
    cfg.continual.schedule = "global"
    whole = schedule(cfg, stages)
    assert whole[:5] == pytest.approx([0, lr / 4, lr / 2, 3 * lr / 4, lr])  # ceil(0.25 x 14) = 4 warmup steps
    assert np.all(np.diff(whole[4:]) <= 0)  # one decay across the stages
