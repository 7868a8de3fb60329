"""`cbe plot`: which runs it finds (ours, and the benchmark harness's JAX run dirs), the curves it reads
(TensorBoard files merged across a resume, eval_results with CIs, a JAX run's tf.summary
losses) and the PNG it writes."""

from __future__ import annotations

import json
import math
import sys
import time
import types
from pathlib import Path

import pytest
import yaml

from cbe import cli
from cbe.errors import UserError
from cbe.logging import TensorBoardLogger
from cbe.plot import gather_runs, plot_folder
from cbe.run import RunDir, read_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(
    root: Path,
    name: str,
    results: list[dict],
    tensorboard_files: list[dict[int, float]] = (),
    backend: str | None = None,
    checkpoints: dict[str, dict | None] | None = None,
) -> RunDir:
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


def write_benchmark_jax_run(run: Path, train: list[dict[int, float]], eval_loss: dict[int, float]) -> None:
    """A JAX run dir as the benchmark's harness leaves it: no eval_results.jsonl, no config.yaml, and scalars
    written as tf.summary (and clu) write them, 0-d tensors: `loss` (and the learning rate) in train/, one event
    file per (re)start, and `eval_loss` in eval_loss/."""
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.plugins.scalar.summary_v2 import scalar_pb
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    files = [("train", "loss", losses) for losses in train] + [("eval_loss", "eval_loss", eval_loss)]
    for folder, tag, values in files:
        (run / folder).mkdir(parents=True, exist_ok=True)
        writer = EventFileWriter(str(run / folder))
        for step, value in values.items():
            for summary in (scalar_pb(tag, value), scalar_pb("learning_rate", 1e-4)):
                writer.add_event(Event(summary=summary, step=step, wall_time=time.time()))
        writer.close()
        time.sleep(0.01)  # a restart writes its event file later


def result(step: int, fuzzy: float, eval_loss: float, ci: list[float] | None = None) -> dict:
    return {
        "step": step,
        "timestamp": 0.0,
        "eval_loss": eval_loss,
        "valqa_fuzzy_match": fuzzy,
        "valqa_fuzzy_match_ci95": ci,
        "valqa_exact_match": fuzzy / 2,
        "valqa_n": 4,
    }


@pytest.fixture
def runs_folder(tmp_path) -> Path:
    folder = tmp_path / "outputs" / "cbe" / "sample"
    make_run(
        folder,
        "tiny-full-hf",
        [result(0, 0.0, 3.0, [0.0, 0.0]), result(2, 0.5, 2.0, [0.25, 0.75]), result(4, 1.0, 1.0, [1.0, 1.0])],
        tensorboard_files=[{1: 4.0, 2: 3.5, 3: 3.0, 4: 2.5}],
        backend="hf",
    )
    # Killed after step 4 with a checkpoint at 2, resumed: the second event file rewrites steps 3 and 4.
    make_run(
        folder,
        "tiny-full-kd",
        [result(0, 0.0, 3.5), result(2, 0.25, 2.5), result(4, 0.75, 1.5)],
        tensorboard_files=[{1: 9.0, 2: 8.0, 3: 7.0, 4: 6.0}, {3: 2.75, 4: 2.25}],
        checkpoints={"ckpt_2": None, "ckpt_4": None},
    )
    # A sweep job without TensorBoard (logging=none): no train loss; a NaN eval loss is skipped.
    make_run(
        folder,
        "sweep/optimizer.lr=0.001",
        [result(0, 0.0, float("nan")), result(2, 0.5, 2.0)],
        checkpoints={"checkpoint-1": None, "checkpoint-2": None},
    )
    # mode=eval results of a checkpoint live inside the training run: not a run of their own.
    make_run(folder / "tiny-full-hf", "eval/checkpoint-4/valqa+testqa-0a1b2c3d", [result(4, 1.0, 1.0)], backend="hf")
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
    assert sweep.train_loss == [] and sweep.train_loss_source == "none"
    exact = {r.name: r for r in gather_runs(runs_folder, "valqa_exact_match")}["tiny-full-hf"]
    assert exact.metric == [(0, 0.0), (2, 0.25), (4, 0.5)] and exact.metric_ci95 == []


def test_plot_writes_one_png_in_the_folder(runs_folder, capsys):
    cli.main(["plot", str(runs_folder), "--metric", "valqa_exact_match"])
    png = runs_folder / "runs_plot.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 20_000
    assert [p.name for p in runs_folder.iterdir() if p.name.startswith(".")] == []  # no temp file left
    out = capsys.readouterr().out
    assert "tiny-full-kd (kd): 3 evaluations, 3 eval-loss points, 4 train-loss points from tensorboard" in out
    assert f"wrote {png}" in out


@pytest.mark.parametrize(
    "case, message",
    [
        (
            "empty",
            "no run under it (no metrics/eval_results.jsonl, nor a benchmark JAX run's train/ or eval_loss/ "
            "TensorBoard files)",
        ),
        ("missing", "no such folder"),
        (
            "metric",
            "has 'valqa_bleu' in eval_results.jsonl; try --metric with one of eval_loss, valqa_exact_match, "
            "valqa_fuzzy_match, valqa_n",
        ),
    ],
)
def test_plot_mistakes_are_one_line(runs_folder, tmp_path, capfd, case, message):
    args = {
        "empty": [str(tmp_path / "outputs" / "cbe" / "sample" / "tiny-full-hf" / "logs")],
        "missing": [str(tmp_path / "nowhere")],
        "metric": [str(runs_folder), "--metric", "valqa_bleu"],
    }[case]
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
    assert run.eval_loss == [(r["step"], r["eval_loss"]) for r in results] and [s for s, _ in run.eval_loss] == [
        0,
        2,
        4,
    ]
    assert [s for s, _ in run.train_loss] == [1, 2, 3, 4] and run.train_loss_source == "tensorboard"
    assert all(math.isfinite(v) and 0 < v < 20 for _, v in run.train_loss)


def test_benchmark_jax_runs_plot_their_losses_beside_our_runs(tmp_path, capsys):
    folder = tmp_path / "outputs"
    make_run(
        folder,
        "tiny-full-hf",
        [
            {"step": 0, "eval_loss": 3.0, "valqa_substring_match": 0.25},
            {"step": 20, "eval_loss": 2.0, "valqa_substring_match": 0.75},
        ],
        tensorboard_files=[{10: 4.0, 20: 3.5}],
        backend="hf",
    )
    # Killed after step 30 and restarted from 20: the second event file rewrites step 30.
    write_benchmark_jax_run(
        folder / "benchmark" / "gemma3-1b-news",
        train=[{10: 3.0, 20: 2.5, 30: 9.5}, {30: 2.0, 40: 1.75}],
        eval_loss={20: 2.75, 40: 2.25},
    )
    cli.main(["plot", str(folder), "--metric", "valqa_substring_match"])
    png = folder / "runs_plot.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    runs = {r.name: r for r in gather_runs(folder, "valqa_substring_match")}
    assert sorted(runs) == ["benchmark/gemma3-1b-news", "tiny-full-hf"]
    jax = runs["benchmark/gemma3-1b-news"]
    assert (jax.backend, jax.metric, jax.metric_ci95) == ("benchmark-jax", [], [])
    assert jax.train_loss == [(10, 3.0), (20, 2.5), (30, 2.0), (40, 1.75)] and jax.train_loss_source == "tensorboard"
    assert jax.eval_loss == [(20, 2.75), (40, 2.25)]
    assert runs["tiny-full-hf"].metric == [(0, 0.25), (20, 0.75)]
    out = capsys.readouterr().out
    assert (
        "benchmark/gemma3-1b-news (benchmark-jax): no valqa_substring_match curve (the benchmark's JAX runs keep "
        "only losses), 2 eval-loss points, 4 train-loss points from tensorboard"
    ) in out
    assert "tiny-full-hf (hf): 2 evaluations, 2 eval-loss points, 2 train-loss points from tensorboard" in out


def test_a_folder_of_benchmark_jax_runs_alone_is_plotted(tmp_path):
    write_benchmark_jax_run(tmp_path / "run", train=[{1: 2.5, 2: 2.0}], eval_loss={2: 2.25})
    path, (run,) = plot_folder(tmp_path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert (run.name, run.metric, run.eval_loss, run.train_loss) == ("run", [], [(2, 2.25)], [(1, 2.5), (2, 2.0)])


def make_staged_run(root: Path, rows: int = 3) -> Path:
    """A staged run as the loop leaves it: config.yaml with data.stages (s1 of continual.steps_per_stage=4 steps, s2
    of 6), eval_results.jsonl keyed per stage and set, with the retention set, and metrics/stage_matrix.jsonl
    holding the rows after stages 0 .. rows-1."""
    run = make_run(
        root,
        "sample_stages/tiny-full-hf",
        [
            {"step": step, "stage": stage, "eval_loss": 3.0 - step / 10, **values}
            for step, stage, values in [
                (0, 0, {"s1_valqa_fuzzy_match": 0.0, "s2_valqa_fuzzy_match": 0.0, "retention_fuzzy_match": 1.0}),
                (2, 1, {"s1_valqa_fuzzy_match": 0.5, "s2_valqa_fuzzy_match": 0.0, "retention_fuzzy_match": 1.0}),
                (4, 1, {"s1_valqa_fuzzy_match": 1.0, "s2_valqa_fuzzy_match": 0.25, "retention_fuzzy_match": 0.75}),
                (7, 2, {"s1_valqa_fuzzy_match": 0.75, "s2_valqa_fuzzy_match": 0.5, "retention_fuzzy_match": 0.75}),
                (10, 2, {"s1_valqa_fuzzy_match": 0.5, "s2_valqa_fuzzy_match": 1.0, "retention_fuzzy_match": 0.5}),
            ]
        ],
        tensorboard_files=[{s: 3.0 - s / 10 for s in range(1, 11)}],
    )
    config = {
        "backend": {"name": "hf"},
        "data": {"stages": [{"name": "s1", "steps": None}, {"name": "s2", "steps": 6}]},
        "continual": {"steps_per_stage": 4},
    }
    (run.root / "config.yaml").write_text(yaml.safe_dump(config))
    matrix = {
        "exact_match": [[0.0, 0.0], [0.75, 0.25], [0.5, 0.75]],
        "fuzzy_match": [[0.0, 0.0], [1.0, 0.25], [0.5, 1.0]],
    }
    lines = [
        {"after_stage": i, "eval_stage": j + 1, "set": "valqa", "metric": metric, "value": v, "n": 4, "step": step}
        for metric, R in matrix.items()
        for i, step in list(enumerate([0, 4, 10]))[:rows]
        for j, v in enumerate(R[i])
    ]
    (run.root / "metrics" / "stage_matrix.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run.root


def test_a_staged_run_has_a_curve_per_stage_and_its_stage_ends(tmp_path):
    make_staged_run(tmp_path)
    (run,) = gather_runs(tmp_path)  # no run has valqa_fuzzy_match itself: the stages' curves count
    assert (run.name, run.backend, run.stages, run.stage_ends) == (
        "sample_stages/tiny-full-hf",
        "hf",
        ["s1", "s2"],
        [4, 10],
    )
    assert run.metric == []
    assert run.stage_metric == {
        "s1": [(0, 0.0), (2, 0.5), (4, 1.0), (7, 0.75), (10, 0.5)],
        "s2": [(0, 0.0), (2, 0.0), (4, 0.25), (7, 0.5), (10, 1.0)],
        "retention": [(0, 1.0), (2, 1.0), (4, 0.75), (7, 0.75), (10, 0.5)],
    }
    with pytest.raises(
        UserError,
        match="try --metric with one of eval_loss, retention_fuzzy_match, "
        "s1_valqa_fuzzy_match, s2_valqa_fuzzy_match, valqa_fuzzy_match$",
    ):
        gather_runs(tmp_path, "valqa_exact_match")  # eval_results has no such curve, neither a stage's nor the run's


def test_plot_of_a_staged_run_writes_its_curves_and_a_heatmap_per_matrix(tmp_path, capsys):
    run = make_staged_run(tmp_path)
    cli.main(["plot", str(tmp_path)])
    out = capsys.readouterr().out
    figures = [
        run / "plots" / name
        for name in (
            "stage_curves_valqa_fuzzy_match.png",
            "matrix_valqa_exact_match.png",
            "matrix_valqa_fuzzy_match.png",
        )
    ]
    for figure in [*figures, tmp_path / "runs_plot.png"]:
        assert figure.read_bytes()[:8] == PNG_MAGIC and f"wrote {figure}\n" in out
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(f.name for f in figures)  # no temp file left
    assert "sample_stages/tiny-full-hf (hf): 2 stages, 5 evaluations, 5 eval-loss points, 10 train-loss points" in out


def test_a_heatmap_writes_each_value_in_its_cell(tmp_path):
    from cbe.continual import stage_matrices
    from cbe.plot import draw_matrix, pyplot

    run = make_staged_run(tmp_path, rows=2)  # killed in stage 2: the row after it is not there yet
    matrix = stage_matrices(read_jsonl(RunDir(run).stage_matrix))["valqa_exact_match"]
    fig, ax = pyplot().subplots()
    draw_matrix(ax, matrix, ["s1", "s2"], "valqa_exact_match")
    cells = {(t.get_position(), t.get_text()) for t in ax.texts}
    # (column, row): rows are base, after s1, after s2; columns the stage whose questions were asked
    assert cells == {((0, 0), "0.00"), ((1, 0), "0.00"), ((0, 1), "0.75"), ((1, 1), "0.25")}
    assert [t.get_text() for t in ax.get_yticklabels()] == ["base", "after s1", "after s2"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["s1", "s2"]
    pyplot().close(fig)


def test_stage_curves_mark_where_each_stage_ends(tmp_path):
    from cbe.plot import draw_stage_curves, pyplot

    make_staged_run(tmp_path)
    (run,) = gather_runs(tmp_path)
    fig, ax = pyplot().subplots()
    draw_stage_curves(ax, run, "valqa_fuzzy_match")
    vertical = [
        line.get_xdata()[0] for line in ax.lines if len(set(line.get_xdata())) == 1 and line.get_linestyle() == ":"
    ]
    assert vertical == [4, 10]
    assert {t.get_text(): t.get_position()[0] for t in ax.texts} == {"s1": 2, "s2": 7}  # each stage named mid-span
    curves = {line.get_label(): line for line in ax.lines if line.get_label() in run.stage_metric}
    assert list(curves["s2"].get_xdata()) == [0, 2, 4, 7, 10] and curves["retention"].get_linestyle() == "--"
    pyplot().close(fig)
