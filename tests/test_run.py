"""The run dir: atomic writes, the latest link, metrics that survive a resume without duplicates."""

import os

import pytest

from cbe.errors import UserError
from cbe.run import RunDir, read_jsonl, write_atomic


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
    run.drop_eval_results_after(20)
    assert [m["step"] for m in read_jsonl(run.eval_results)] == [0, 10, 20]


def test_latest_link_follows_checkpoints(tmp_path):
    run = RunDir(tmp_path)
    assert run.latest_checkpoint() is None
    for step in (10, 20):
        run.checkpoint_dir(step).mkdir(parents=True)
        run.mark_latest(run.checkpoint_dir(step))
    assert run.latest_checkpoint() == run.checkpoint_dir(20) and RunDir.step_of(run.latest_checkpoint()) == 20
    assert os.readlink(run.checkpoints / "latest") == "checkpoint-20"  # relative: the run dir can move


def test_resuming_with_another_trajectory_is_refused(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"optimizer": {"lr": 1e-4}, "training": {"seed": 1, "num_train_steps": 10}})
    run = RunDir(tmp_path).create(cfg)
    run.checkpoint_dir(10).mkdir(parents=True)
    run.mark_latest(run.checkpoint_dir(10))
    RunDir(tmp_path).create(OmegaConf.merge(cfg, {"training": {"num_train_steps": 20}}))  # extending is fine
    with pytest.raises(UserError, match="optimizer=.*pick another logging.run_name"):
        RunDir(tmp_path).create(OmegaConf.merge(cfg, {"optimizer": {"lr": 3e-4}}))
