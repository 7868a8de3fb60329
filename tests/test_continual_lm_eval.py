"""continual.lm_eval_tasks: a staged run scores lm-eval's tasks on the base model and after every stage; the rows
join metrics/stage_matrix.jsonl and the continual summary, and are the scores lm-eval gives those models itself."""

from __future__ import annotations

import json

import pytest

from cbe.cli import main as cbe
from cbe.export import export_checkpoint
from cbe.lm_eval import evaluate_model_dir, score_rows
from cbe.run import RunDir, read_jsonl
from tests.conftest import loop_in_process

TASK = "cbe_general_mc"  # the bundled task
STAGED = ("task=sample_stages", "logging=none", "continual.steps_per_stage=4", "training.eval_every=4")
STAGED += (
    "training.save_every=4",
    "eval.max_questions=4",
    f"continual.lm_eval_tasks=[{TASK}]",
    "continual.lm_eval_limit=16",
)


@pytest.mark.slow
def test_a_staged_run_scores_general_ability_after_every_stage(tmp_path, cache_dir, capsys):
    root = tmp_path / "run"
    overrides = [*STAGED, "training.max_checkpoints=3", f"data.cache_dir={cache_dir}"]
    loop_in_process(root, *overrides).train()
    run = RunDir(root)

    rows = [line for line in read_jsonl(run.stage_matrix) if "lm_eval_task" in line]
    assert {(r["after_stage"], r["metric"]) for r in rows} == {(i, m) for i in range(4) for m in ("acc", "acc_norm")}
    assert all(r["lm_eval_task"] == TASK and r["n"] == 16 and r["stderr"] > 0 for r in rows)
    assert [r["step"] for r in rows if r["metric"] == "acc"] == [0, 4, 8, 12]

    # Each row is what lm-eval scores for that model: the base model, and the model after the last stage.
    for after, checkpoint in ((0, "base"), (3, str(run.checkpoints / "latest"))):
        model = export_checkpoint(checkpoint, tmp_path / f"model-{after}", overrides=overrides)
        direct = {(r["metric"], r["value"]) for r in score_rows(evaluate_model_dir(model, [TASK], limit=16))}
        assert {(r["metric"], r["value"]) for r in rows if r["after_stage"] == after} == direct

    assert f"lm_eval/{TASK}/acc: after stages 0..3: " in capsys.readouterr().out  # the run's own report
    cbe(["continual-summary", str(root)])
    printed = json.loads(capsys.readouterr().out)
    entry = printed[f"lm_eval/{TASK}/acc"]
    acc = [r["value"] for r in rows if r["metric"] == "acc"]
    assert (
        entry["value"] == acc and entry["change"] == pytest.approx(acc[-1] - acc[0]) and entry["steps"] == [0, 4, 8, 12]
    )
    assert json.loads(run.summary.read_text())[f"lm_eval/{TASK}/acc"] == entry


def test_lm_eval_tasks_need_stages_and_one_process(tmp_path):
    from cbe.config import validate
    from cbe.errors import UserError
    from tests.test_config import compose_config

    with pytest.raises(UserError, match="has none; score a checkpoint with `cbe lm-eval"):
        validate(compose_config("task=sample", f"continual.lm_eval_tasks=[{TASK}]"))
    with pytest.raises(UserError, match="in one process, and this run has several"):
        validate(
            compose_config(*STAGED[:1], "training.per_device_batch_size=2", f"continual.lm_eval_tasks=[{TASK}]"),
            world_size=2,
        )
