"""TensorBoard scalars read back with TensorBoard's own reader; eval metrics go to the jsonl and the console; console
lines are numbers and start lines of their own, also in a real run's train.log."""

import ast
import io
import re
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tqdm.auto import tqdm

from cbe.logging import Loggers, TensorBoardLogger, format_eval_line, format_train_line
from cbe.plot import read_tensorboard_scalars
from cbe.run import RunDir, read_jsonl

# An eval or train line glued onto the end of something else, as onto a progress bar drawn without a newline.
GLUED = re.compile(r"[^\r\n](eval \||\{'loss')")


def train_lines(log: str) -> list[dict]:
    """The train dicts printed in a train.log (split at carriage returns too: a bar redraws its line with them)."""
    return [ast.literal_eval(line) for line in log.splitlines() if line.startswith("{'")]


def test_tensorboard_and_jsonl_get_the_same_metrics(tmp_path, capsys):
    run = RunDir(tmp_path)
    loggers = Loggers(run, [TensorBoardLogger(run)])
    loggers.train(5, {"loss": 2.5, "learning_rate": 1e-4, "note": "not a number"})
    loggers.eval(
        {
            "step": 10,
            "timestamp": 0.0,
            "eval_loss": 1.25,
            "valqa_exact_match": 0.5,
            "valqa_substring_match": 0.625,
            "valqa_fuzzy_match": 0.75,
            "valqa_n": 4,
            "valqa_exact_match_supports_ge_2": None,
        }
    )
    loggers.close()

    events = EventAccumulator(str(run.tensorboard))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(5, 2.5)]
    assert [(e.step, e.value) for e in events.Scalars("eval/valqa_exact_match")] == [(10, 0.5)]
    assert "train/note" not in events.Tags()["scalars"]
    assert read_jsonl(run.eval_results)[0]["eval_loss"] == 1.25
    assert (
        "eval | step 10 | eval_loss 1.2500 | valqa exact 0.500 substring 0.625 fuzzy 0.750" in capsys.readouterr().out
    )


def test_console_line_skips_empty_sets():
    line = format_eval_line(
        {
            "step": 0,
            "eval_loss": 3.0,
            "valqa_exact_match": None,
            "testqa_exact_match": 0.25,
            "testqa_substring_match": 0.375,
            "testqa_fuzzy_match": 0.5,
        }
    )
    assert line == "eval | step 0 | eval_loss 3.0000 | testqa exact 0.250 substring 0.375 fuzzy 0.500"


def test_train_lines_are_numbers():
    line = format_train_line(
        {
            "loss": 5.33712,
            "learning_rate": 1e-4,
            "epoch": 2.0,
            "num_tokens": 123456.0,
            "grad_norm": float("nan"),
            "note": "text",
        }
    )
    assert (
        line == "{'loss': 5.337, 'learning_rate': 0.0001, 'epoch': 2.0, 'num_tokens': 123456.0, 'grad_norm': nan, "
        "'note': 'text'}"
    )


def test_console_lines_start_a_line_of_their_own_under_a_progress_bar(tmp_path, monkeypatch):
    """train.log holds stdout and stderr in one file, as here; the bar (stderr) is drawn there without a newline."""
    both = io.StringIO()
    monkeypatch.setattr(sys, "stdout", both)
    monkeypatch.setattr(sys, "stderr", both)
    loggers = Loggers(RunDir(tmp_path), [])
    with tqdm(total=4, desc="training") as bar:
        bar.update(1)
        loggers.train(1, {"loss": 2.5})
        loggers.eval({"step": 1, "eval_loss": 1.25})
    text = both.getvalue()
    assert "training:" in text and "eval | step 1 | eval_loss 1.2500" in text and "{'loss': 2.5}" in text
    assert not GLUED.search(text), text


def test_a_real_runs_log_and_tensorboard_count_epochs_of_the_corpus(tiny_wandb_run):
    """The shared tiny HF run (sample track: 8 packed rows, 8 a step; 4 steps, each logged, evaluated every 2)."""
    log = (tiny_wandb_run / "logs" / "train.log").read_text()
    lines = train_lines(log)
    assert len([line for line in lines if "loss" in line]) == 4
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for line in lines for v in line.values())
    # Rows seen / packed rows: one epoch a step.
    assert [line["epoch"] for line in lines] == [1.0, 2.0, 3.0, 4.0]
    assert read_tensorboard_scalars(tiny_wandb_run / "logs" / "tensorboard")["train/epoch"] == {
        1: 1.0,
        2: 2.0,
        3: 3.0,
        4: 4.0,
    }
    assert log.count("eval | step ") == 3 and not GLUED.search(log)
