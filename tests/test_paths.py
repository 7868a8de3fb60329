"""The files that ship with cbe (the sample tracks, conf/prompts/, the tiny model's tokenizer) are found from any
working directory, a run resumes from another directory, and `mode=eval` writes under output_root whatever
model.name is."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cbe.checkpoints import eval_run_dir
from cbe.config import validate
from cbe.errors import UserError
from cbe.paths import PROJECT_ROOT, resolve_path
from cbe.run import RunDir, read_jsonl
from tests.conftest import ROOT, loop_in_process
from tests.test_config import compose_config

NEWS_PREFIX = "conf/prompts/news_3shot.txt"
SHORT = ("training.num_train_steps=2", "training.eval_every=2", "training.save_every=2", "eval.max_questions=2")


def test_a_relative_path_is_the_working_directorys_else_the_projects(tmp_path, monkeypatch):
    assert PROJECT_ROOT == ROOT  # the checkout cbe is installed from (pip install -e .)
    monkeypatch.chdir(tmp_path)
    assert resolve_path(NEWS_PREFIX) == str(ROOT / NEWS_PREFIX)
    (tmp_path / "conf" / "prompts").mkdir(parents=True)
    (tmp_path / NEWS_PREFIX).write_text("mine")
    assert resolve_path(NEWS_PREFIX) == NEWS_PREFIX  # the user's own file first, as typed
    assert resolve_path("google/gemma-3-1b-pt") == "google/gemma-3-1b-pt"  # a hub id, in neither place
    assert resolve_path(str(tmp_path / "absent.txt")) == str(tmp_path / "absent.txt")


@pytest.mark.parametrize("prefix", [None, NEWS_PREFIX], ids=["sample", "news_prefix"])
def test_a_run_started_in_another_directory_finds_the_files_that_ship_with_cbe(
    prefix, tmp_path, monkeypatch, cache_dir
):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    extra = [f"eval.prompt_prefix_file={prefix}"] if prefix else []
    loop_in_process(run, *SHORT, *extra, "logging=none", f"data.cache_dir={cache_dir}").train()

    assert [m["step"] for m in read_jsonl(run / "metrics" / "eval_results.jsonl")] == [0, 2]
    assert (run / "checkpoints" / "checkpoint-2").is_dir()
    prompt = json.loads(RunDir(run).details_path("valqa", 2).read_text().splitlines()[0])["prompt"]
    if prefix:
        assert prompt.startswith((ROOT / prefix).read_text().rstrip() + "\n\n")
    # The run's record names the files it read: the project's, by their absolute paths.
    saved = (run / "config.yaml").read_text()
    for file in ("data/sample/train.jsonl", "data/sample/valqa.jsonl", "cbe/assets/tiny_tokenizer", prefix or ""):
        assert str(ROOT / file) in saved
    assert os.listdir(tmp_path) == ["run"]  # nothing else lands in the working directory


def test_a_run_resumes_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    in_project = validate(compose_config())
    assert in_project.data.train_path == "data/sample/train.jsonl"  # found in the working directory: as typed
    started_here = RunDir(tmp_path / "a").create(in_project)
    monkeypatch.chdir(tmp_path)
    elsewhere = validate(compose_config())
    assert elsewhere.data.train_path == str(ROOT / "data/sample/train.jsonl")
    assert elsewhere.model.tokenizer == str(ROOT / "cbe/assets/tiny_tokenizer")
    started_here.refuse_a_different_run(elsewhere)  # the same files: it resumes
    started_elsewhere = RunDir(tmp_path / "b").create(elsewhere)
    monkeypatch.chdir(ROOT)
    started_elsewhere.refuse_a_different_run(validate(compose_config()))  # and back
    with pytest.raises(UserError, match=r"holds a run with data="):  # another file is another run
        started_elsewhere.refuse_a_different_run(validate(compose_config("data.train_path=data/sample/val.jsonl")))


@pytest.mark.parametrize("name", ["/an/absolute/dir", "../../../escape"])
def test_mode_eval_of_a_model_dir_lands_under_output_root(name, tmp_path):
    cfg = compose_config("mode=eval", "checkpoint=base", f"model.name={name}", f"output_root={tmp_path}")
    where = Path(eval_run_dir(cfg))
    assert where.resolve().is_relative_to(tmp_path / "cbe" / "sample")
    assert where.parts[-4].endswith("-full-hf") and where.parts[-3:-1] == ("eval", "base")


def test_mode_eval_from_another_directory_with_an_absolute_model_name(tmp_path, cache_dir):
    """main.py in a fresh process, started away from the project: the sample track, the news prefix and the tiny
    tokenizer are found, and the results of model.name=<absolute dir> land under output_root, not beside the dir."""
    work, model = tmp_path / "work", tmp_path / "models" / "mine"
    work.mkdir()
    overrides = [
        "mode=eval",
        "checkpoint=base",
        f"model.name={model}",  # model=tiny initializes its weights: the name is only a label here
        f"eval.prompt_prefix_file={NEWS_PREFIX}",
        "eval.max_questions=2",
        "logging=none",
    ]
    env = {**os.environ, "CBE_CACHE_DIR": str(cache_dir), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *overrides],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    evaluations = work / "outputs" / "cbe" / "sample" / f"{str(model).lstrip('/')}-full-hf" / "eval" / "base"
    [evaluated] = evaluations.iterdir()
    assert [m["step"] for m in read_jsonl(evaluated / "metrics" / "eval_results.jsonl")] == [0]
    assert os.listdir(tmp_path) == ["work"]  # nothing beside the model's dir
