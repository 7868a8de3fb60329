"""`cbe plot`: every run under a folder on one figure: a QA metric, eval loss and train loss over optimizer steps.

A cbe run is a folder with metrics/eval_results.jsonl. The metric (any eval_results key: default
valqa_fuzzy_match, or valqa_substring_match, testqa_exact_match, ...; with its 95% band where eval_results has
`<metric>_ci95`) and eval loss come from eval_results.jsonl, which a resumed run keeps free of duplicates;
train loss comes from logs/tensorboard/ (`train/loss`, merged over the event files a resumed run leaves, the
later file winning for a repeated step).

A JAX run of the benchmark's own harness is a folder without eval_results.jsonl whose `train/` holds
TensorBoard scalars `loss` and whose `eval_loss/` holds scalars `eval_loss`: it adds both losses and no metric.

A staged (continual) run, one whose config.yaml lists data.stages, adds its losses to the figure and gets figures of
its own in <run>/plots/: the metric of every stage's QA (`<stage>_<metric>`, and the retention set's) over global
steps with the stage ends marked, and a heatmap of each matrix of metrics/stage_matrix.jsonl.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from cbe.continual import StageMatrix, stage_ends, stage_matrices, stage_names
from cbe.errors import UserError
from cbe.eval import keys
from cbe.eval.metrics import METRICS
from cbe.run import RunDir, open_atomic, read_jsonl
from cbe.specs import backend_of_checkpoint

DEFAULT_METRIC = "valqa_fuzzy_match"
BENCHMARK_JAX = "benchmark-jax"  # the backend label of a JAX run of the benchmark's own harness
BENCHMARK_LOSSES = {"train": "loss", "eval_loss": "eval_loss"}  # its TensorBoard subfolders -> the tag of their loss

Series = list[tuple[int, float]]


@dataclass
class RunCurves:
    """What one run contributes to the figure."""

    name: str  # the run dir relative to the plotted folder
    backend: str  # hf, kd, benchmark-jax, or "?" when neither the config nor the checkpoints tell
    metric: Series
    metric_ci95: list[tuple[int, float, float]]
    eval_loss: Series
    train_loss: Series
    train_loss_source: str = field(default="none")  # tensorboard or none
    root: Path | None = None  # the run dir (of a cbe run)
    stages: list[str] = field(default_factory=list)  # a staged run's stage names, in order
    stage_ends: list[int] = field(default_factory=list)  # the global step at which each stage ends
    stage_metric: dict[str, Series] = field(default_factory=dict)  # stage name (or retention) -> its metric curve
    plots: list[Path] = field(default_factory=list)  # the staged run's own figures, once written


def find_runs(folder: Path) -> list[Path]:
    """Run dirs under `folder`, sorted: cbe's and the benchmark's JAX runs, not runs nested in a run (<run>/eval/)."""
    ours = set(RunDir.find(folder))
    theirs = {p.parent.parent for p in folder.rglob("events.out.tfevents.*") if p.parent.name in BENCHMARK_LOSSES}
    runs = sorted(ours | theirs)
    return [r for r in runs if not any(other in r.parents for other in runs)]


def is_benchmark_jax_run(run: Path) -> bool:
    """A run dir of the benchmark's JAX harness: TensorBoard losses, no eval_results.jsonl."""
    return not RunDir(run).eval_results.is_file()


def backend_of(run: Path) -> str:
    """The backend named in config.yaml, else the one whose checkpoint names the run has."""
    config_path = RunDir(run).config
    if config_path.is_file():
        name = ((yaml.safe_load(config_path.read_text()) or {}).get("backend") or {}).get("name")
        if name:
            return str(name)
    return next(filter(None, map(backend_of_checkpoint, RunDir(run).saved_checkpoints())), "?")


def read_tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """tag -> step -> value over every event file in `folder`, oldest file first so a rewrite wins."""
    import sys
    import types

    # As in cbe.logging: without this marker tensorboard imports TensorFlow when it is installed (~20 s).
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    from tensorboard.util.tensor_util import make_ndarray

    files = []
    for path in folder.glob("events.out.tfevents.*"):
        events = list(LegacyEventFileLoader(str(path)).Load())
        if events:
            files.append((events[0].wall_time, path.name, events))
    scalars: dict[str, dict[int, float]] = {}
    for _, _, events in sorted(files, key=lambda f: f[:2]):
        for event in events:
            for value in event.summary.value:
                if value.HasField("simple_value"):  # our writer, and TF1-style summaries
                    scalars.setdefault(value.tag, {})[event.step] = value.simple_value
                elif value.metadata.plugin_data.plugin_name == "scalars":  # tf.summary / clu: a 0-d tensor
                    scalars.setdefault(value.tag, {})[event.step] = float(make_ndarray(value.tensor))
    return scalars


def _finite(points: Series) -> Series:
    return [(s, v) for s, v in points if v is not None and math.isfinite(v)]


def gather_benchmark_jax_run(name: str, run: Path) -> RunCurves:
    """The losses of one JAX run of the benchmark's harness (it keeps no QA metric curve)."""
    train, evaluation = (read_tensorboard_scalars(run / sub).get(tag, {}) for sub, tag in BENCHMARK_LOSSES.items())
    train_loss = _finite(sorted(train.items()))
    return RunCurves(
        name=name,
        backend=BENCHMARK_JAX,
        metric=[],
        metric_ci95=[],
        eval_loss=_finite(sorted(evaluation.items())),
        train_loss=train_loss,
        train_loss_source="tensorboard" if train_loss else "none",
    )


def gather_run(folder: Path, run: Path, metric: str) -> RunCurves:
    """The curves of one run dir."""
    name = str(run.relative_to(folder)) if run != folder else run.name
    if is_benchmark_jax_run(run):
        return gather_benchmark_jax_run(name, run)
    results = sorted(read_jsonl(RunDir(run).eval_results), key=lambda r: r["step"])
    train_loss = sorted(read_tensorboard_scalars(RunDir(run).tensorboard).get("train/loss", {}).items())
    curves = RunCurves(
        name=name,
        backend=backend_of(run),
        metric=_finite([(r["step"], r.get(metric)) for r in results]),
        metric_ci95=[(r["step"], *r[keys.ci95(metric)]) for r in results if r.get(keys.ci95(metric))],
        eval_loss=_finite([(r["step"], r.get("eval_loss")) for r in results]),
        train_loss=_finite(train_loss),
        train_loss_source="tensorboard" if train_loss else "none",
        root=run,
        stages=stage_names(run),
    )
    if curves.stages:
        curves.stage_ends = stage_ends(run)
        # valqa_fuzzy_match -> s1_valqa_fuzzy_match, ...; the retention set's is retention_fuzzy_match
        labels = {stage: keys.of_stage(stage, metric) for stage in curves.stages}
        parsed = keys.split(metric, METRICS)
        labels |= {keys.RETENTION: keys.metric_key(keys.RETENTION, parsed[1])} if parsed else {}
        stage_metric = {label: _finite([(r["step"], r.get(key)) for r in results]) for label, key in labels.items()}
        curves.stage_metric = {label: points for label, points in stage_metric.items() if points}
    return curves


def metric_keys(run: Path) -> set[str]:
    """What --metric can name for a cbe run: its numeric eval_results keys, and its stages' shared keys."""
    found = {
        k
        for line in read_jsonl(RunDir(run).eval_results)
        for k, v in line.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "timestamp", "stage")
    }
    stages = stage_names(run)
    return found | {k for k in (keys.without_stage(key, stages) for key in found) if k}


def gather_runs(folder: str | Path, metric: str = DEFAULT_METRIC) -> list[RunCurves]:
    """The curves of every run under `folder`; UserError if none, or no cbe run has `metric`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder; pass outputs/<project> or a folder of runs under it")
    run_dirs = find_runs(folder)
    runs = [gather_run(folder, run, metric) for run in run_dirs]
    if not runs:
        raise UserError(
            f"{folder}: no run under it (no metrics/eval_results.jsonl, nor a benchmark JAX run's "
            f"train/ or eval_loss/ TensorBoard files)"
        )
    ours = [run for run in run_dirs if not is_benchmark_jax_run(run)]
    if ours and not any(r.metric or r.stage_metric for r in runs):
        known = sorted({k for run in ours for k in metric_keys(run)})
        raise UserError(
            f"no run under {folder} has {metric!r} in eval_results.jsonl; try --metric with one of {', '.join(known)}"
        )
    return runs


def pyplot():
    """matplotlib's pyplot, drawing to files only (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> Path:
    """Write a figure as a PNG, atomically, and close it."""
    with open_atomic(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    pyplot().close(fig)
    return path


def plot_runs(runs: list[RunCurves], metric: str, path: Path) -> None:
    """Three panels (metric, eval loss, train loss), one colour per run, written atomically as a PNG."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for index, run in enumerate(runs):
        color = f"C{index % 10}"
        label = f"{run.name} ({run.backend})"
        for ax, points in zip(axes, (run.metric, run.eval_loss, run.train_loss)):
            if points:
                ax.plot(*zip(*points), color=color, marker="." if len(points) < 30 else None, label=label)
        if run.metric_ci95:
            steps, low, high = zip(*run.metric_ci95)
            axes[0].fill_between(steps, low, high, color=color, alpha=0.15, linewidth=0)
    for ax, title in zip(axes, (metric, "eval loss", "train loss")):
        ax.set_title(title)
        ax.set_xlabel("optimizer steps")
        ax.grid(alpha=0.3)
    legend = {}  # one entry per run, also for runs with no metric curve
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    labels, handles = list(legend), list(legend.values())
    fig.legend(handles, labels, loc="lower center", ncol=max(1, min(3, len(labels))), fontsize="small", frameon=False)
    fig.tight_layout(rect=(0, 0.06 * math.ceil(len(labels) / 3), 1, 1))
    save_png(fig, path)


def draw_stage_curves(ax, curves: RunCurves, metric: str) -> None:
    """Each stage's metric (and the retention set's, dashed) over global steps, a dotted line where a stage ends."""
    for index, (label, points) in enumerate(curves.stage_metric.items()):
        style = {"color": "black", "linestyle": "--"} if label == keys.RETENTION else {"color": f"C{index % 10}"}
        ax.plot(*zip(*points), marker=".", label=label, **style)
    start = 0
    for stage, end in zip(curves.stages, curves.stage_ends):
        ax.axvline(end, color="gray", linestyle=":", linewidth=1)
        ax.text((start + end) / 2, 1.01, stage, transform=ax.get_xaxis_transform(), ha="center", va="bottom")
        start = end
    ax.set_title(f"{curves.name}: {metric} of each stage's questions", pad=18)
    ax.set_xlabel("global optimizer steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def draw_matrix(ax, matrix: StageMatrix, stages: list[str], title: str) -> None:
    """A heatmap of R: rows trained through (base first), columns the stage evaluated, each value in its cell."""
    values = np.array([[np.nan if v is None else v for v in row] for row in matrix.values], dtype=float)
    stages = stages if len(stages) == values.shape[1] else [str(j + 1) for j in range(values.shape[1])]
    image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis")
    for (i, j), value in np.ndenumerate(values):
        if math.isfinite(value):  # a cell of a stage not reached yet stays blank
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="black" if value > 0.6 else "white")
    ax.set_xticks(range(len(stages)), stages)
    ax.set_yticks(range(len(stages) + 1), ["base", *(f"after {stage}" for stage in stages)])
    ax.set_xlabel("questions of stage")
    ax.set_ylabel("trained through")
    ax.set_title(title)
    ax.figure.colorbar(image, ax=ax)


def plot_stages(curves: RunCurves, metric: str) -> list[Path]:
    """A staged run's own figures, in <run>/plots/: its stage curves and a heatmap of each of its matrices."""
    plt, run, written = pyplot(), RunDir(curves.root), []
    plots = curves.root / run.plots.relative_to(run.root)  # the run dir as the user named it
    if curves.stage_metric:
        fig, ax = plt.subplots(figsize=(9, 5))
        draw_stage_curves(ax, curves, metric)
        fig.tight_layout()
        written.append(save_png(fig, plots / f"stage_curves_{metric}.png"))
    # A run killed before its base model was evaluated has no matrix lines.
    for key, matrix in stage_matrices(read_jsonl(run.stage_matrix)).items():
        size = len(matrix.n)
        fig, ax = plt.subplots(figsize=(2.5 + 1.1 * size, 1.5 + 0.7 * (size + 1)))
        draw_matrix(ax, matrix, curves.stages, f"{curves.name}: {key}")
        fig.tight_layout()
        written.append(save_png(fig, plots / f"matrix_{key}.png"))
    return written


def plot_folder(
    folder: str | Path, metric: str = DEFAULT_METRIC, output: str | Path | None = None
) -> tuple[Path, list[RunCurves]]:
    """Gather every run under `folder` and write the figure (default <folder>/runs_plot.png)."""
    runs = gather_runs(folder, metric)
    path = Path(output) if output else Path(folder) / "runs_plot.png"
    plot_runs(runs, metric, path)
    for run in runs:
        if run.stages:
            run.plots = plot_stages(run, metric)
    return path, runs
