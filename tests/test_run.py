"""The run dir: atomic writes, the latest link, metrics that survive a resume without duplicates."""

import os
import re

import pytest

from cbe.errors import UserError
from cbe.run import RunDir, read_jsonl, step_of, write_atomic
from tests.test_config import compose_config


def test_write_atomic_leaves_old_content_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "a" / "f.txt"
    write_atomic(path, "old")
    assert path.read_text() == "old" and oct(path.stat().st_mode & 0o777) != "0o600"

    def crash(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, "new")
    assert path.read_text() == "old" and os.listdir(path.parent) == ["f.txt"]


def test_eval_results_drop_newer_lines_on_resume(tmp_path):
    run = RunDir(tmp_path)
    for step in (0, 10, 20, 30):
        run.append_eval_result({"step": step})
    run.drop_metrics_after(20)
    assert [m["step"] for m in read_jsonl(run.eval_results)] == [0, 10, 20]


def test_latest_link_follows_checkpoints(tmp_path):
    run = RunDir(tmp_path)
    assert run.latest_checkpoint() is None
    for step in (10, 20):
        run.checkpoint_dir(step, "hf").mkdir(parents=True)
        run.mark_latest(run.checkpoint_dir(step, "hf"))
    assert run.latest_checkpoint() == run.checkpoint_dir(20, "hf") and step_of(run.latest_checkpoint()) == 20
    assert os.readlink(run.checkpoints / "latest") == "checkpoint-20"  # relative: the run dir can move


# Each part of a run's trajectory, changed by the override a user would type, and the key the refusal names.
TRAJECTORY_CHANGES = [
    ("data.sequence_length=64", "data"),
    ("data.train_path=data/sample/val.jsonl", "data"),
    ("model=gemma3_270m", "model"),
    ("adapter=lora128", "adapter"),
    ("training.effective_batch_size=16", "training.effective_batch_size"),
    ("training.seed=7", "training.seed"),
    ("optimizer.lr=1e-3", "optimizer"),
    ("backend=kd", "backend.name"),
]


@pytest.mark.parametrize("change, key", TRAJECTORY_CHANGES)
def test_resuming_with_another_trajectory_is_refused(tmp_path, change, key):
    run = RunDir(tmp_path).create(compose_config())
    # Extending the run, or changing how often it evaluates or how a step is split into micro-batches, resumes it.
    RunDir(tmp_path).refuse_a_different_run(
        compose_config("training.num_train_steps=400", "training.eval_every=5", "training.per_device_batch_size=4")
    )
    with pytest.raises(UserError) as refused:
        RunDir(tmp_path).refuse_a_different_run(compose_config(change))
    assert re.fullmatch(
        rf"{re.escape(str(run.root))} holds a run with {re.escape(key)}=.+; re-run with the same settings to resume "
        r"it, or pick another logging.run_name",
        str(refused.value),
    ), str(refused.value)
