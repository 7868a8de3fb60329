"""mode=eval of a run's checkpoint: the run's settings are replayed first, a mismatched backend or adapter is one
line before anything loads, and each evaluation of a checkpoint has a run dir of its own."""

import os
from pathlib import Path

import pytest
import yaml

from cbe.checkpoints import check_checkpoint, evaluation_name, inherit_run_overrides, written_by
from cbe.config import eval_dir_override, validate
from cbe.errors import UserError
from tests.conftest import ROOT
from tests.test_config import compose_config


def make_run(root: Path, overrides: list[str], adapter: str, checkpoint: str) -> Path:
    """A run dir as main.py leaves it: .hydra/overrides.yaml, config.yaml, one checkpoint and `latest`."""
    (root / ".hydra").mkdir(parents=True)
    (root / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (root / "config.yaml").write_text(yaml.safe_dump({"adapter": {"name": adapter}}))
    (root / "checkpoints" / checkpoint).mkdir(parents=True)
    os.symlink(checkpoint, root / "checkpoints" / "latest")
    return root / "checkpoints" / "latest"


def test_the_runs_overrides_go_first_and_the_command_line_wins(tmp_path):
    latest = make_run(
        tmp_path / "run",
        [
            "task=news",
            "adapter=lora128",
            'eval.prompt_template="A {question}"',
            "output_root=/elsewhere",
            "logging=none",
            "optimizer.lr=1e-3",
        ],
        "lora128",
        "checkpoint-4",
    )
    argv = ["-m", "mode=eval", f"checkpoint={latest}", "eval.qa_data=x.jsonl", "task=geminon"]
    assert inherit_run_overrides(argv) == [
        "-m",
        "task=news",
        "adapter=lora128",
        'eval.prompt_template="A {question}"',
        "optimizer.lr=1e-3",
        "mode=eval",
        f"checkpoint={latest}",
        "eval.qa_data=x.jsonl",
        "task=geminon",
    ]
    assert inherit_run_overrides(["mode=eval", "checkpoint=base"]) == ["mode=eval", "checkpoint=base"]
    assert inherit_run_overrides(["task=news", f"checkpoint={latest}"]) == ["task=news", f"checkpoint={latest}"]
    assert inherit_run_overrides(["mode=eval", f'checkpoint="{latest}"'])[0] == "task=news"  # Hydra's quoting


def test_a_checkpoint_evaluated_by_another_backend_or_adapter_is_one_line(tmp_path):
    latest = make_run(tmp_path / "run", [], "lora128", "checkpoint-4")
    (latest / "adapter_config.json").write_text("{}")
    assert written_by(latest) == ("hf", "lora128")
    with pytest.raises(
        UserError,
        match=r"written by backend=hf adapter=lora128; evaluate it with backend=hf "
        r"adapter=lora128 \(not backend=kd adapter=lora128\)",
    ):
        check_checkpoint(compose_config("mode=eval", f"checkpoint={latest}", "backend=kd", "adapter=lora128"))
    with pytest.raises(UserError, match=r"\(not backend=hf adapter=full\)"):
        check_checkpoint(compose_config("mode=eval", f"checkpoint={latest}"))
    check_checkpoint(compose_config("mode=eval", f"checkpoint={latest}", "adapter=lora128"))

    kd = make_run(tmp_path / "kd", [], "full", "ckpt_8")
    assert written_by(kd) == ("kd", "full")
    with pytest.raises(UserError, match=r"written by backend=kd adapter=full"):
        check_checkpoint(compose_config("mode=eval", f"checkpoint={kd}"))
    loose = tmp_path / "my-adapter"
    loose.mkdir()
    (loose / "adapter_config.json").write_text("{}")
    assert written_by(loose) == ("hf", "lora128")
    with pytest.raises(UserError, match=r"no such checkpoint dir"):
        check_checkpoint(compose_config("mode=eval", f"checkpoint={tmp_path / 'nothing'}"))


def test_a_missing_prefix_file_is_named_by_validate_not_by_the_run_dir():
    cfg = compose_config("mode=eval", "checkpoint=base", "eval.prompt_prefix_file=no/such/prefix.txt")
    assert evaluation_name(cfg).startswith("valqa+testqa-")  # the run dir resolves; validate then names the file
    with pytest.raises(UserError, match=r"^eval.prompt_prefix_file: file no/such/prefix.txt does not exist"):
        validate(cfg)


def test_evaluations_that_ask_different_things_are_named_apart():
    default = evaluation_name(compose_config("mode=eval", "checkpoint=base"))
    assert default.startswith("valqa+testqa-") and default == evaluation_name(
        compose_config("mode=eval", "checkpoint=base")
    )
    others = {
        evaluation_name(compose_config("mode=eval", "checkpoint=base", *o))
        for o in (
            ["eval.qa_data=data/sample/valqa.jsonl"],
            ['eval.prompt_template="Q: {question}"'],
            ["eval.prompt_prefix_file=conf/prompts/news_3shot.txt"],
            ["eval.max_questions=5"],
        )
    }
    assert len(others) == 4 and default not in others
    assert evaluation_name(
        compose_config("mode=eval", "checkpoint=base", "eval.qa_data=data/sample/valqa.jsonl")
    ).startswith("valqa-")
    # The same prompt written with a backslash-n is the same evaluation.
    typed = compose_config("mode=eval", "checkpoint=base", 'eval.prompt_template="Q: {question}\\nA:"')
    real_newline = compose_config(
        "mode=eval",
        "checkpoint=base",
        "task=news",
        "eval.prompt_prefix_file=null",
        "data.valqa_path=data/sample/valqa.jsonl",
        "data.testqa_path=data/sample/testqa.jsonl",
        "eval.parser=default",
        "eval.max_new_tokens=16",
    )  # news's template, on the sample sets
    assert evaluation_name(typed) == evaluation_name(real_newline)


def test_sampled_evaluations_are_named_apart_and_greedy_ones_as_before():
    def name(*overrides: str) -> str:
        return evaluation_name(compose_config("mode=eval", "checkpoint=base", *overrides))

    sampled = ["eval.temperature=0.8", "eval.top_k=40", "eval.top_p=0.9", "eval.seed=1"]
    changed = [sampled, *(sampled[:i] + [f"{sampled[i]}5"] + sampled[i + 1 :] for i in range(4))]
    names = {name(*overrides) for overrides in changed}
    assert len(names) == 5 and name() not in names  # each setting changes the answers, hence the name
    # Greedy decoding ignores top_k, top_p and seed: the name every greedy evaluation has had.
    assert name("eval.top_k=40", "eval.top_p=0.9", "eval.seed=1") == name() == "valqa+testqa-" + name()[-8:]


def test_the_eval_dir_is_named_before_composing_and_composing_imports_no_evaluator(tmp_path):
    """main.py's argv pre-pass names a single mode=eval's run dir (its QA sets and settings hash); a training run,
    a multirun and a run dir given on the command line are left alone; composing a mode=eval config then resolves
    without the evaluator."""
    argv = ["mode=eval", "checkpoint=base", f"output_root={tmp_path}"]
    (override,) = eval_dir_override(argv)
    name = evaluation_name(compose_config(*argv))
    assert override == f"hydra.run.dir='{tmp_path}/cbe/sample/tiny-full-hf/eval/base/{name}'"
    assert eval_dir_override(["-m", *argv]) == eval_dir_override(["training.seed=1"]) == []
    assert eval_dir_override([*argv, "hydra.run.dir=/somewhere"]) == []
    import subprocess
    import sys

    code = (
        "import sys; from tests.test_config import compose_config; "
        "cfg = compose_config('mode=eval', 'checkpoint=base'); from omegaconf import OmegaConf; "
        "OmegaConf.to_container(cfg, resolve=True); print('cbe.eval.evaluator' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "False"
