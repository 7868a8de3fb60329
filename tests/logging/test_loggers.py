"""TensorBoard scalars read back with TensorBoard's own reader; eval metrics go to the jsonl and the console."""
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cbe.logging import Loggers, TensorBoardLogger, format_eval_line
from cbe.run import RunDir, read_jsonl


def test_tensorboard_and_jsonl_get_the_same_metrics(tmp_path, capsys):
    run = RunDir(tmp_path)
    loggers = Loggers(run, [TensorBoardLogger(run)])
    loggers.train(5, {"loss": 2.5, "learning_rate": 1e-4, "note": "not a number"})
    loggers.eval({"step": 10, "timestamp": 0.0, "eval_loss": 1.25, "valqa_exact_match": 0.5,
                  "valqa_substring_match": 0.625, "valqa_fuzzy_match": 0.75, "valqa_n": 4, "valqa_exact_match_supports_ge_2": None})
    loggers.close()

    events = EventAccumulator(str(run.tensorboard))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(5, 2.5)]
    assert [(e.step, e.value) for e in events.Scalars("eval/valqa_exact_match")] == [(10, 0.5)]
    assert "train/note" not in events.Tags()["scalars"]
    assert read_jsonl(run.eval_results)[0]["eval_loss"] == 1.25
    assert "eval | step 10 | eval_loss 1.2500 | valqa exact 0.500 substring 0.625 fuzzy 0.750" in capsys.readouterr().out


def test_console_line_skips_empty_sets():
    line = format_eval_line({"step": 0, "eval_loss": 3.0, "valqa_exact_match": None, "testqa_exact_match": 0.25,
                             "testqa_substring_match": 0.375, "testqa_fuzzy_match": 0.5})
    assert line == "eval | step 0 | eval_loss 3.0000 | testqa exact 0.250 substring 0.375 fuzzy 0.500"
