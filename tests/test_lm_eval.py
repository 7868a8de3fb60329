"""`cbe lm-eval`: lm-evaluation-harness on a checkpoint, offline on the bundled task from any dir, scoring what lm-eval
itself scores; results beside mode=eval's, one dir per set of settings; a mistake is one line."""

import json
import random
import re
import shutil
from pathlib import Path

import pytest

from cbe.cli import main
from cbe.lm_eval import BUNDLED, evaluate_model_dir, score_rows, settings_hash, task_manager
from cbe.run import RunDir

TASK = "cbe_general_mc"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run dir as main.py leaves it after its step-4 checkpoint (config.yaml, .hydra/overrides.yaml, `latest`), the
    checkpoint saved as the HF trainer saves one (save_pretrained of model and tokenizer): the tiny model as drawn,
    without training, which scores near chance on the bundled task (neither 0 nor 1)."""
    from cbe.backends.hf.models import load_base_model
    from cbe.config import settings_of, validate
    from tests.test_config import compose_config

    cfg = validate(compose_config())
    run = RunDir(tmp_path_factory.mktemp("lm_eval") / "run").create(cfg)
    run.overrides.parent.mkdir(parents=True)
    run.overrides.write_text("[]\n")
    model, tokenizer = load_base_model(settings_of(cfg))
    checkpoint = run.checkpoint_dir(4, "hf")
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    run.mark_latest(checkpoint)
    return run.root


def lm_eval_dirs(run: Path) -> list[Path]:
    return sorted((run / "eval" / "checkpoint-4").glob("lm-eval-*"))


def test_lm_eval_writes_lm_evals_own_scores_beside_the_checkpoints_evaluations(tiny_run, tmp_path, monkeypatch, capsys):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tmp_path)  # not the project: the bundled task's data files must still be found
    main(["lm-eval", str(tiny_run / "checkpoints" / "latest"), "--tasks", TASK])
    printed = capsys.readouterr().out
    out = Path(printed.splitlines()[-1].removeprefix("results: ")).parent
    # Beside mode=eval's evaluations of the checkpoint, `latest` named by its target as mode=eval names it.
    assert out.parent == tiny_run / "eval" / "checkpoint-4" and re.fullmatch(r"lm-eval-[0-9a-f]{8}", out.name)
    results = json.loads((out / "results.json").read_text())
    scores = results["results"][TASK]
    assert results["n-samples"][TASK]["effective"] == 40 and "samples" not in results
    assert len((out / f"samples_{TASK}.jsonl").read_text().splitlines()) == 40
    assert results["cbe"]["checkpoint"] == str(tiny_run / "checkpoints" / "checkpoint-4")
    assert f"{TASK}  acc       {scores['acc,none']:.4f}  {scores['acc_stderr,none']:.4f}" in printed

    # lm-eval on its own, on the checkpoint dir itself, from the task's dir (where its relative data_files resolve).
    monkeypatch.chdir(BUNDLED)
    direct = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(tiny_run / "checkpoints" / "checkpoint-4"), "dtype": "float32"},
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(BUNDLED), include_defaults=False),
        device="cpu",
        batch_size=8,
    )["results"][TASK]
    assert 0 < scores["acc,none"] < 1 and 0 < scores["acc_norm,none"] < 1  # a random model: some right, some wrong
    assert (scores["acc,none"], scores["acc_norm,none"]) == (direct["acc,none"], direct["acc_norm,none"])


def test_the_same_settings_replace_their_dir_and_another_limit_sits_beside_it(tiny_run, capsys):
    def lm_eval_limit(limit: int) -> Path:
        main(["lm-eval", str(tiny_run / "checkpoints" / "latest"), "--tasks", TASK, "--limit", str(limit)])
        results = Path(capsys.readouterr().out.splitlines()[-1].removeprefix("results: "))
        assert json.loads(results.read_text())["n-samples"][TASK]["effective"] == limit
        return results.parent

    first = lm_eval_limit(10)
    (first / "stale").write_text("from the first run")
    again = lm_eval_limit(10)
    assert again == first and not (first / "stale").exists()  # replaced whole, not added to
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no temporary dir left behind
    other = lm_eval_limit(20)
    assert other != first and first.is_dir() and {first, other} <= set(lm_eval_dirs(tiny_run))


def test_a_mistake_is_one_line_and_writes_nothing(tiny_run, tmp_path, capsys):
    before = sorted(tiny_run.rglob("*"))
    mistakes = {
        (str(tiny_run / "checkpoints" / "latest"), f"{TASK},no_such_task"): r"unknown lm-eval task 'no_such_task'",
        (str(tmp_path / "nothing"), TASK): r"checkpoint=.*/nothing: no such checkpoint dir",
    }
    for (checkpoint, tasks), message in mistakes.items():
        with pytest.raises(SystemExit) as exit:
            main(["lm-eval", checkpoint, "--tasks", tasks])
        assert exit.value.code == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert re.match(rf"cbe: error: {message}", line)
    assert sorted(tiny_run.rglob("*")) == before


def test_the_hash_covers_what_changes_the_scores(tmp_path):
    """Task names, limit, few-shot, dtype and a local task's files: each changes the hash; nothing else does."""
    mine = tmp_path / "tasks"
    shutil.copytree(BUNDLED, mine)
    config = (mine / f"{TASK}.yaml").read_text().replace(f"task: {TASK}", "task: my_mc")
    (mine / f"{TASK}.yaml").write_text(config)
    manager = task_manager(["my_mc", TASK], [mine])

    def digest(tasks=("my_mc",), limit=None, num_fewshot=None, dtype="fp32"):
        return settings_hash(manager, list(tasks), limit, num_fewshot, dtype)

    base = digest()
    assert re.fullmatch(r"[0-9a-f]{8}", base) and digest() == base
    changed = [digest((TASK,)), digest(("my_mc", TASK)), digest(limit=10), digest(num_fewshot=0), digest(dtype="bf16")]
    assert len({base, *changed}) == 6
    with open(mine / f"{TASK}.jsonl", "a") as f:  # one more question in the user's data
        f.write('{"question": "What is 2 plus 2?", "choices": ["3", "4", "5", "6"], "answer": 1}\n')
    assert digest() != base and digest((TASK,)) == changed[0]  # the bundled task's hash is its own files'


def test_a_users_task_dir_reads_its_data_relative_to_the_current_dir(tiny_run, tmp_path, monkeypatch, capsys):
    """--include-path takes lm-eval's own YAML format and rules: relative data_files name files from where cbe runs."""
    mine = tmp_path / "tasks"
    shutil.copytree(BUNDLED, mine)
    config = (mine / f"{TASK}.yaml").read_text().replace(f"task: {TASK}", "task: my_mc")
    (mine / f"{TASK}.yaml").write_text(config.replace(f": {TASK}", f": tasks/{TASK}"))  # tasks/<file>.jsonl
    command = ["lm-eval", str(tiny_run / "checkpoints" / "latest"), "--tasks", "my_mc", "--include-path", str(mine)]
    monkeypatch.chdir(mine)  # tasks/... is not here
    before = sorted(tiny_run.rglob("*"))
    with pytest.raises(SystemExit):
        main([*command, "--limit", "5"])
    (line,) = capsys.readouterr().err.splitlines()  # before the export: nothing else printed, nothing written
    assert sorted(tiny_run.rglob("*")) == before
    assert re.match(r"cbe: error: lm-eval could not load a task's data: .*tasks/cbe_general_mc", line)
    monkeypatch.chdir(tmp_path)
    main([*command, "--limit", "5"])
    results = json.loads(Path(capsys.readouterr().out.splitlines()[-1].removeprefix("results: ")).read_text())
    assert results["n-samples"]["my_mc"]["effective"] == 5 and results["cbe"]["include_path"] == [str(mine)]


def test_evaluating_in_a_process_leaves_its_random_generators_as_they_were(tiny_run):
    """evaluate_model_dir, as a run calls it between training steps (continual.lm_eval_tasks): lm-eval seeds and
    draws from the global generators, which come back as they were, and its scores come back as rows."""
    import numpy as np
    import torch

    def seed() -> None:
        random.seed(7), np.random.seed(7), torch.manual_seed(7)

    def draws() -> tuple:
        return random.random(), np.random.random(), torch.rand(1).item()

    seed()
    expected = draws()
    seed()
    results = evaluate_model_dir(tiny_run / "checkpoints" / "checkpoint-4", [TASK], 5)
    assert draws() == expected
    rows = score_rows(results)
    assert [(r["lm_eval_task"], r["metric"], r["n"]) for r in rows] == [(TASK, "acc", 5), (TASK, "acc_norm", 5)]
    scores = results["results"][TASK]
    assert [r["value"] for r in rows] == [scores["acc,none"], scores["acc_norm,none"]] and rows[0]["stderr"] > 0
