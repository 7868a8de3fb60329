"""`cbe plot`: which runs it finds, the curves it reads (TensorBoard files merged across a resume, HF
trainer_state, eval_results with CIs) and the PNG it writes."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cbe import cli
from cbe.logging import TensorBoardLogger
from cbe.plot import gather_runs
from cbe.run import RunDir, read_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(root: Path, name: str, results: list[dict], tensorboard_files: list[dict[int, float]] = (),
             backend: str | None = None, checkpoints: dict[str, dict | None] | None = None) -> RunDir:
    """A run dir as the harness leaves it: eval_results.jsonl, one TensorBoard event file per (re)start."""
    run = RunDir(root / name)
    run.eval_results.parent.mkdir(parents=True)
    run.eval_results.write_text("".join(json.dumps(r) + "\n" for r in results))
    if backend:
        (run.root / "config.yaml").write_text(f"backend:\n  name: {backend}\nmode: train\n")
    for losses in tensorboard_files:
        logger = TensorBoardLogger(run)
        for step, loss in losses.items():
            logger.scalars(step, {"train/loss": loss, "train/learning_rate": 1e-4})
        logger.close()
    for checkpoint, trainer_state in (checkpoints or {}).items():
        (run.checkpoints / checkpoint).mkdir(parents=True)
        if trainer_state:
            (run.checkpoints / checkpoint / "trainer_state.json").write_text(json.dumps(trainer_state))
    return run


def result(step: int, fuzzy: float, eval_loss: float, ci: list[float] | None = None) -> dict:
    return {"step": step, "timestamp": 0.0, "eval_loss": eval_loss, "valqa_fuzzy_match": fuzzy,
            "valqa_fuzzy_match_ci95": ci, "valqa_exact_match": fuzzy / 2, "valqa_n": 4}


@pytest.fixture
def runs_folder(tmp_path) -> Path:
    folder = tmp_path / "outputs" / "cbe" / "sample"
    make_run(folder, "tiny-full-hf", [result(0, 0.0, 3.0, [0.0, 0.0]), result(2, 0.5, 2.0, [0.25, 0.75]),
                                      result(4, 1.0, 1.0, [1.0, 1.0])],
             tensorboard_files=[{1: 4.0, 2: 3.5, 3: 3.0, 4: 2.5}], backend="hf")
    # Killed after step 4 with a checkpoint at 2, resumed: the second event file rewrites steps 3 and 4.
    make_run(folder, "tiny-full-kd", [result(0, 0.0, 3.5), result(2, 0.25, 2.5), result(4, 0.75, 1.5)],
             tensorboard_files=[{1: 9.0, 2: 8.0, 3: 7.0, 4: 6.0}, {3: 2.75, 4: 2.25}],
             checkpoints={"ckpt_2": None, "ckpt_4": None})
    # A sweep job without TensorBoard: train loss from the newest trainer_state.json; a NaN eval loss is skipped.
    make_run(folder, "sweep/optimizer.lr=0.001", [result(0, 0.0, float("nan")), result(2, 0.5, 2.0)],
             checkpoints={"checkpoint-1": {"log_history": [{"loss": 5.0, "step": 1}]},
                          "checkpoint-2": {"log_history": [{"loss": 5.0, "step": 1}, {"loss": 4.5, "step": 2},
                                                           {"train_loss": 4.75, "step": 2}]}})
    # mode=eval results of a checkpoint live inside the training run: not a run of their own.
    make_run(folder / "tiny-full-hf", "eval/checkpoint-4", [result(4, 1.0, 1.0)], backend="hf")
    return folder


def test_gather_reads_every_run_with_merged_event_files(runs_folder):
    runs = {r.name: r for r in gather_runs(runs_folder)}
    assert sorted(runs) == ["sweep/optimizer.lr=0.001", "tiny-full-hf", "tiny-full-kd"]
    hf, kd, sweep = runs["tiny-full-hf"], runs["tiny-full-kd"], runs["sweep/optimizer.lr=0.001"]
    assert (hf.backend, kd.backend, sweep.backend) == ("hf", "kd", "hf")
    assert hf.metric == [(0, 0.0), (2, 0.5), (4, 1.0)]
    assert hf.metric_ci95 == [(0, 0.0, 0.0), (2, 0.25, 0.75), (4, 1.0, 1.0)]
    assert hf.eval_loss == [(0, 3.0), (2, 2.0), (4, 1.0)]
    assert hf.train_loss == [(1, 4.0), (2, 3.5), (3, 3.0), (4, 2.5)] and hf.train_loss_source == "tensorboard"
    assert kd.train_loss == [(1, 9.0), (2, 8.0), (3, 2.75), (4, 2.25)]
    assert kd.metric_ci95 == []
    assert sweep.eval_loss == [(2, 2.0)]
    assert sweep.train_loss == [(1, 5.0), (2, 4.5)] and sweep.train_loss_source == "trainer_state"
    exact = {r.name: r for r in gather_runs(runs_folder, "valqa_exact_match")}["tiny-full-hf"]
    assert exact.metric == [(0, 0.0), (2, 0.25), (4, 0.5)] and exact.metric_ci95 == []


def test_plot_writes_one_png_in_the_folder(runs_folder, capsys):
    cli.main(["plot", str(runs_folder), "--metric", "valqa_exact_match"])
    png = runs_folder / "runs_plot.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 20_000
    assert [p.name for p in runs_folder.iterdir() if p.name.startswith(".")] == []  # no temp file left
    out = capsys.readouterr().out
    assert "tiny-full-kd (kd): 3 evaluations, 4 train-loss points from tensorboard" in out
    assert f"wrote {png}" in out


@pytest.mark.parametrize("case, message", [
    ("empty", "no run under it has metrics/eval_results.jsonl"),
    ("missing", "no such folder"),
    ("metric", "has 'valqa_bleu' in eval_results.jsonl; try --metric with one of eval_loss, valqa_exact_match, "
               "valqa_fuzzy_match, valqa_n"),
])
def test_plot_mistakes_are_one_line(runs_folder, tmp_path, capfd, case, message):
    args = {"empty": [str(tmp_path / "outputs" / "cbe" / "sample" / "tiny-full-hf" / "logs")],
            "missing": [str(tmp_path / "nowhere")],
            "metric": [str(runs_folder), "--metric", "valqa_bleu"]}[case]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plot", *args])
    err = capfd.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("cbe: error: ") and message in err and err.count("\n") == 1


def test_plot_of_a_real_run(tiny_wandb_run, tmp_path):
    """The shared tiny run (4 steps, evaluated every 2) as `cbe plot` sees it."""
    output = tmp_path / "plot.png"
    cli.main(["plot", str(tiny_wandb_run.parent), "--output", str(output)])
    assert output.read_bytes()[:8] == PNG_MAGIC
    (run,) = gather_runs(tiny_wandb_run.parent)
    results = read_jsonl(tiny_wandb_run / "metrics" / "eval_results.jsonl")
    assert (run.name, run.backend) == ("tiny", "hf")
    assert run.eval_loss == [(r["step"], r["eval_loss"]) for r in results] and [s for s, _ in run.eval_loss] == [0, 2, 4]
    assert [s for s, _ in run.train_loss] == [1, 2, 3, 4] and run.train_loss_source == "tensorboard"
    assert all(math.isfinite(v) and 0 < v < 20 for _, v in run.train_loss)
