"""Continual learning's numbers: a staged run's accuracy matrices (StageRecorder builds them as its stages end), their
summary with paired bootstrap CIs (from the recorder at the end of a run, or from a finished run's files: one
computation), the retention of what the base model knew, and `cbe retention-set`, which builds such a set.

R[i][j] is the QA accuracy on stage j's questions after training through stage i (i = 0: the base model; stages
count from 1), one matrix per (set, metric) of metrics/stage_matrix.jsonl. With T stages and b_j = R[0][j]:

    ACC        = 1/T     Σ_{j=1..T}   R[T][j]                                   (Lopez-Paz & Ranzato 2017, GEM)
    BWT        = 1/(T−1) Σ_{j=1..T−1} (R[T][j] − R[j][j])                       (GEM)
    forgetting = 1/(T−1) Σ_{j=1..T−1} (max_{l∈[j,T−1]} R[l][j] − R[T][j])      (Chaudhry et al. 2018)
    FWT        = 1/(T−1) Σ_{j=2..T}   (R[j−1][j] − b_j)                         (GEM)

With T = 1, BWT, forgetting and FWT average over no stage: they are null, not 0. ACC is R[1][1] then.

Each number gets a 95% CI from a paired bootstrap over questions (eval_details of each row's step, 1000 resamples,
fixed seed): a resample draws stage j's questions once and scores every row on that draw, so a change from row to row
is measured on the same questions. The retention set (continual.retention_qa_path) gives G_i, its accuracy at the
steps of the matrix's rows, and G_0 − G_T with a CI from the same paired bootstrap. continual.lm_eval_tasks adds
lm-evaluation-harness scores at the same rows (lines with `lm_eval_task`), summarized as their change from the base
model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from cbe.data.jsonl import QA_FIELDS, iter_jsonl
from cbe.errors import UserError
from cbe.eval import keys
from cbe.eval.details import load_details
from cbe.eval.metrics import METRICS
from cbe.ranks import is_main_process
from cbe.run import RunDir, read_jsonl, write_atomic, write_jsonl_atomic

DetailsOf = Callable[[str, int], list[dict[str, Any]]]  # (QA set, step) -> the details of that evaluation
NUMBERS = {"acc": "ACC", "bwt": "BWT", "forgetting": "forgetting", "fwt": "FWT"}  # key -> its name in reports
RESAMPLES, SEED = 1000, 0  # the bootstrap: fixed, so the same files give the same CIs


class DetailsShortfall(Exception):
    """The eval_details a CI needs are missing or do not pair up (the numbers stand; their CIs are left out)."""


@dataclass
class StageMatrix:
    """R of one (set, metric): rows after_stage 0..T, columns eval_stage 1..T; None where no line gives a value."""

    set: str
    metric: str
    values: list[list[float | None]]
    n: list[int | None]  # questions of each eval stage
    steps: list[int | None]  # the global step of each row


def stage_names(run: str | Path) -> list[str]:
    """The names of a run's stages, in order, from its config.yaml (empty for a run without data.stages)."""
    path = RunDir(run).config
    config = yaml.safe_load(path.read_text()) if path.is_file() else None
    return [str(stage["name"]) for stage in ((config or {}).get("data") or {}).get("stages") or []]


def stage_ends(run: str | Path) -> list[int]:
    """The global step at which each stage of a run ends (its `steps`, else continual.steps_per_stage)."""
    config = yaml.safe_load(RunDir(run).config.read_text()) or {}
    per_stage = (config.get("continual") or {}).get("steps_per_stage")
    return [int(s) for s in np.cumsum([stage.get("steps") or per_stage for stage in config["data"]["stages"]])]


def stage_matrices(lines: list[dict[str, Any]]) -> dict[str, StageMatrix]:
    """Every matrix of the lines of metrics/stage_matrix.jsonl, keyed `<set>_<metric>`; a later line wins a cell."""
    lines = [line for line in lines if "eval_stage" in line]  # not lm-eval's (summarize_lm_eval)
    stages = max((line["eval_stage"] for line in lines), default=0)
    matrices: dict[str, StageMatrix] = {}
    for line in lines:
        key = keys.metric_key(line["set"], line["metric"])
        if key not in matrices:
            empty = [[None] * stages for _ in range(stages + 1)]
            matrices[key] = StageMatrix(line["set"], line["metric"], empty, [None] * stages, [None] * (stages + 1))
        m, i, j = matrices[key], line["after_stage"], line["eval_stage"] - 1
        m.values[i][j], m.n[j], m.steps[i] = line["value"], line["n"], line["step"]
    return matrices


def summary_numbers(R: np.ndarray) -> dict[str, np.ndarray | None]:
    """ACC, BWT, forgetting and FWT of R (shape (..., T+1, T): leading axes are bootstrap resamples)."""
    T = R.shape[-1]
    final = R[..., T, :]  # R[T][j]
    numbers: dict[str, np.ndarray | None] = {"acc": final.mean(-1), "bwt": None, "forgetting": None, "fwt": None}
    if T == 1:
        return numbers
    learned = R[..., range(1, T + 1), range(T)]  # R[j][j]
    best = np.stack([R[..., j:T, j - 1].max(-1) for j in range(1, T)], -1)  # max over l in [j, T-1] of R[l][j]
    numbers["bwt"] = (final - learned)[..., :-1].mean(-1)
    numbers["forgetting"] = (best - final[..., :-1]).mean(-1)
    numbers["fwt"] = (R[..., range(1, T), range(1, T)] - R[..., 0, 1:]).mean(-1)  # R[j-1][j] - b_j, j = 2..T
    return numbers


def _number(value: Any) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _ci95(samples: np.ndarray | None) -> list[float] | None:
    if samples is None or not np.isfinite(samples).all():
        return None
    return [float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))]


def paired_resamples(scores: list[list[np.ndarray]], resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """Bootstrap matrices (resamples, rows, stages): stage j's questions drawn once for every row, so paired."""
    rng = np.random.default_rng(seed)
    columns = []
    for j in range(len(scores[0])):
        n = len(scores[0][j])
        draw = rng.integers(0, n, (resamples, n))
        columns.append(np.stack([row[j][draw].mean(-1) for row in scores], -1))  # (resamples, rows)
    return np.stack(columns, -1)


def details_file(run: RunDir, qa_set: str, step: int) -> list[dict[str, Any]]:
    """The eval_details of a QA set at a step, from the run's files; DetailsShortfall where there is none."""
    path = run.details_path(qa_set, step)
    if not path.is_file():
        raise DetailsShortfall(f"no {path.relative_to(run.root)}")
    return read_jsonl(path)


def question_scores(details_of: DetailsOf, qa_sets: list[str], steps: list[int], n: list[int | None]) -> dict:
    """metric -> scores[row][stage] of qa_sets[stage] at steps[row]; DetailsShortfall where they do not pair."""
    files = [[details_of(qa_set, step) for qa_set in qa_sets] for step in steps]
    for j, qa_set in enumerate(qa_sets):
        questions = [[d["question"] for d in row[j]] for row in files]
        if not questions[0]:
            raise DetailsShortfall(f"the {qa_set} details have no questions")
        if any(q != questions[0] for q in questions) or (n[j] is not None and len(questions[0]) != n[j]):
            raise DetailsShortfall(f"the {qa_set} details differ in questions from step to step or from the matrix's n")
    return {m: [[np.array([float(d[m]) for d in f]) for f in row] for row in files] for m in METRICS}


def scores_of_set(details_of: DetailsOf, names: list[str], matrix: StageMatrix, notes: list[str]) -> dict:
    """metric -> per-question scores[row][stage] of the matrix's set; {} and a note where the details fall short."""
    try:
        if len(names) != len(matrix.n):
            raise DetailsShortfall(f"config.yaml names {len(names)} stages, the matrix has {len(matrix.n)}")
        return question_scores(details_of, [keys.of_stage(name, matrix.set) for name in names], matrix.steps, matrix.n)
    except DetailsShortfall as e:
        notes.append(f"no 95% CIs for {matrix.set}: {e}")
        return {}


def summarize_matrix(matrix: StageMatrix, scores: list[list[np.ndarray]] | None) -> dict[str, Any]:
    """One summary entry: the four numbers, their 95% CIs (None without per-question scores), the matrix."""
    R = np.array([[np.nan if v is None else v for v in row] for row in matrix.values], dtype=float)
    point = summary_numbers(R)
    resampled = summary_numbers(paired_resamples(scores)) if scores else {}
    entry: dict[str, Any] = {}
    for name in NUMBERS:
        entry[name] = _number(point[name])
        entry[keys.ci95(name)] = _ci95(resampled.get(name)) if point[name] is not None else None
    return entry | {"matrix": matrix.values, "n": matrix.n, "steps": matrix.steps}


def summarize_retention(
    results: dict[int, dict[str, Any]], details_of: DetailsOf, steps: list[int], notes: list[str]
) -> dict[str, Any]:
    """`retention_<metric>` entries: G_i at each row's step (`results`: metrics by step), G_0 − G_T and its CI."""
    metrics = [m for m in METRICS if any(keys.metric_key(keys.RETENTION, m) in r for r in results.values())]
    if not metrics:
        return {}
    try:
        scores = question_scores(details_of, [keys.RETENTION], [steps[0], steps[-1]], [None])
    except DetailsShortfall as e:
        scores = {}
        notes.append(f"no 95% CI for G_0 - G_T: {e}")
    entries = {}
    for metric in metrics:
        key = keys.metric_key(keys.RETENTION, metric)
        g = [_number(results.get(step, {}).get(key)) for step in steps]
        drop = None if g[0] is None or g[-1] is None else g[0] - g[-1]
        resampled = paired_resamples(scores[metric]) if scores and drop is not None else None  # rows: G_0 and G_T
        ci = None if resampled is None else _ci95(resampled[:, 0, 0] - resampled[:, 1, 0])
        entries[key] = {"g": g, "g0_minus_gt": drop, "g0_minus_gt_ci95": ci, "steps": steps}
    return entries


def summarize_lm_eval(lines: list[dict[str, Any]], steps: list[int]) -> dict[str, Any]:
    """`lm_eval/<task>/<metric>` entries of continual.lm_eval_tasks' lines: the score of the base model and after each
    stage (rows as the matrices'), lm-eval's standard errors, and the change from the base model to the last row."""
    entries: dict[str, Any] = {}
    for line in (line for line in lines if "lm_eval_task" in line):
        key = f"lm_eval/{line['lm_eval_task']}/{line['metric']}"
        empty = {"value": [None] * len(steps), "stderr": [None] * len(steps), "n": line.get("n"), "steps": steps}
        entry = entries.setdefault(key, empty)
        entry["value"][line["after_stage"]], entry["stderr"][line["after_stage"]] = line["value"], line["stderr"]
    for entry in entries.values():
        first, last = entry["value"][0], entry["value"][-1]
        entry["change"] = None if first is None or last is None else last - first
    return entries


def summarize_stages(
    lines: list[dict[str, Any]], names: list[str], details_of: DetailsOf, results: dict[int, dict], where: Path
) -> tuple[dict[str, Any], list[str]]:
    """The summary object, keyed `<set>_<metric>`, and notes, of a staged run's matrix lines (those of `where`)."""
    matrices = stage_matrices(lines)
    if not matrices:
        raise UserError(f"{where}: no lines; the run has not evaluated its base model yet")
    missing = sorted({i for m in matrices.values() for i, step in enumerate(m.steps) if step is None})
    if missing:
        raise UserError(
            f"{where}: no rows after stage {', '.join(map(str, missing))}: the run has not finished "
            f"them; re-run its command to resume it, then summarize"
        )
    notes, summary, scores = [], {}, {}
    for key, matrix in matrices.items():
        if matrix.set not in scores:  # one read of a set's details serves its four metrics
            scores[matrix.set] = scores_of_set(details_of, names, matrix, notes)
        summary[key] = summarize_matrix(matrix, scores[matrix.set].get(matrix.metric))
    steps = next(iter(matrices.values())).steps
    return summary | summarize_retention(results, details_of, steps, notes) | summarize_lm_eval(lines, steps), notes


def continual_summary(run_dir: str | Path) -> tuple[dict[str, Any], list[str]]:
    """The summary object of a finished staged run, from its files, and notes for the user."""
    run = RunDir(run_dir)
    if not run.stage_matrix.is_file():
        where = run.stage_matrix.relative_to(run.root)
        raise UserError(f"{run_dir}: no {where}; pass the run dir of a staged run (a task with data.stages)")
    results = {line["step"]: line for line in read_jsonl(run.eval_results)}
    lines, names = read_jsonl(run.stage_matrix), stage_names(run)
    return summarize_stages(lines, names, partial(details_file, run), results, run.stage_matrix)


def save_continual_summary(run_dir: str | Path, summary: dict[str, Any]) -> Path:
    """Write the summary object to metrics/continual_summary.json, atomically."""
    path = RunDir(run_dir).summary
    write_atomic(path, json.dumps(summary, indent=1) + "\n")
    return path


def _text(value: float | None, ci: list[float] | None = None, digits: int = 3) -> str:
    """A number as the report shows it, with its CI when there is one; n/a for null."""
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def describe_summary(summary: dict[str, Any], stages: list[str]) -> str:
    """The summary as text: a line of numbers per entry, and the valqa matrices as tables."""
    lines = []
    for key, entry in summary.items():
        if key.startswith("lm_eval/"):
            scores = " ".join(_text(v) for v in entry["value"])
            lines.append(f"{key}: after stages 0..{len(entry['value']) - 1}: {scores}; change {_text(entry['change'])}")
            continue
        qa_set, _ = keys.split(key, METRICS)
        if qa_set == keys.RETENTION:
            g = " ".join(_text(v) for v in entry["g"])
            drop = _text(entry["g0_minus_gt"], entry["g0_minus_gt_ci95"])
            lines.append(f"{key}: G after stages 0..{len(entry['g']) - 1}: {g}; G_0 - G_T {drop}")
            continue
        numbers = "  ".join(f"{label} {_text(entry[n], entry[keys.ci95(n)])}" for n, label in NUMBERS.items())
        lines.append(f"{key}: {numbers}")
        if qa_set == "valqa":
            names = stages if len(stages) == len(entry["n"]) else [str(j + 1) for j in range(len(entry["n"]))]
            lines.append(" " * 14 + "".join(f"{name:>8}" for name in names))
            for label, row in zip(["base", *(f"after {name}" for name in names)], entry["matrix"]):
                lines.append(f"  {label:<12}" + "".join(f"{_text(v, digits=2):>8}" for v in row))
    return "\n".join(lines)


def _report(run: RunDir, summary: dict[str, Any], notes: list[str], names: list[str]) -> str:
    """Write the summary (main process only) and return it as text to print."""
    path = save_continual_summary(run, summary) if is_main_process() else run.summary
    return "\n".join([describe_summary(summary, names), *(f"note: {note}" for note in notes), f"wrote {path}"])


def write_continual_summary(run_dir: str | Path) -> str:
    """Summarize a finished staged run from its files, write metrics/continual_summary.json and return the text."""
    return _report(RunDir(run_dir), *continual_summary(run_dir), stage_names(run_dir))


class StageRecorder:
    """The accuracy matrix of a staged run, row by row as its stages end, and its summary."""

    def __init__(self, run: RunDir, stage_names: list[str]):
        self.run, self.names = run, list(stage_names)
        self.lines = read_jsonl(run.stage_matrix)  # a resumed run's rows (those after its checkpoint are dropped)
        self.resumed = bool(self.lines)  # the details and metrics of those rows are on file
        self.results: dict[int, dict] = {}  # step -> the metrics of its evaluation
        self.scores: dict[tuple[str, int], list[dict]] = {}  # (QA set, step) -> per-question scores

    def _keep(self, qa_set: str, step: int, details: list[dict]) -> None:
        self.scores[qa_set, step] = [{"question": d["question"], **{m: d[m] for m in METRICS}} for d in details]

    def on_eval(self, step: int, metrics: dict, details: dict[str, list[dict]]) -> None:
        """Every evaluation: its metrics and the retention set's per-question scores (G_i and its CI)."""
        self.results[step] = metrics
        if keys.RETENTION in details:
            self._keep(keys.RETENTION, step, details[keys.RETENTION])

    def on_stage_end(
        self, after: int, step: int, metrics: dict, details: dict[str, list[dict]], general: list[dict] = ()
    ) -> None:
        """After stage `after` (0: the base model; on_eval has seen it): R[after][j], and the lm-eval scores
        `general` (cbe.lm_eval.score_rows), to metrics/stage_matrix.jsonl."""
        rows = {line["step"] for line in self.lines} | {step}  # retention scores between rows are not needed
        self.scores = {k: v for k, v in self.scores.items() if k[0] != keys.RETENTION or k[1] in rows}
        for j, name in enumerate(self.names, 1):
            for kind in keys.KINDS:
                qa_set = keys.of_stage(name, kind)
                self._keep(qa_set, step, details[qa_set])
                cell = {"after_stage": after, "eval_stage": j, "set": kind}
                n = metrics[keys.metric_key(qa_set, "n")]
                values = {m: metrics[keys.metric_key(qa_set, m)] for m in METRICS}
                self.lines += [cell | {"metric": m, "value": v, "n": n, "step": step} for m, v in values.items()]
        self.lines += [{"after_stage": after, **score, "step": step} for score in general]
        if is_main_process():
            write_jsonl_atomic(self.run.stage_matrix, self.lines)

    def details_of(self, qa_set: str, step: int) -> list[dict]:
        """The per-question scores of an evaluation this process held, else (before a resume) the run's files'."""
        held = self.scores.get((qa_set, step))
        return held if held is not None else details_file(self.run, qa_set, step)

    def summary(self) -> str:
        """The summary as text to print (write_continual_summary's); writes metrics/continual_summary.json."""
        results = {line["step"]: line for line in read_jsonl(self.run.eval_results)} if self.resumed else {}
        where = self.run.stage_matrix
        summary, notes = summarize_stages(self.lines, self.names, self.details_of, results | self.results, where)
        return _report(self.run, summary, notes, self.names)

    def on_end(self) -> None:
        """At the end of the run: print the summary (main process)."""
        if is_main_process():
            print(self.summary(), flush=True)


def build_retention_set(details_path: str | Path, qa_path: str | Path, output: str | Path) -> str:
    """Write the QA records the base model answered exactly (per a details file) to `output`; a line to report."""
    details = load_details(details_path, "build a retention set from", predictions=("raw_prediction",))
    answered = {(str(d["question"]).strip(), str(d["ground_truth"])) for d in details if d.get("exact_match")}
    asked = {(str(d["question"]).strip(), str(d["ground_truth"])) for d in details}
    records = list(iter_jsonl(qa_path, QA_FIELDS))
    key = [(r["question"].strip(), str(r["answer"])) for r in records]
    if not asked & set(key):
        raise UserError(f"{qa_path}: none of the questions of {details_path} is in it; pass the QA file evaluated")
    kept = [r for r, k in zip(records, key) if k in answered]
    if not kept:
        raise UserError(f"{details_path}: the model answered no question exactly; no retention set to write")
    write_jsonl_atomic(output, kept)
    unasked = sum(k not in asked for k in key)
    left_out = f"; {unasked} were not in the details file and are left out" if unasked else ""
    return f"kept {len(kept)} of {len(records)} questions of {qa_path} (answered exactly){left_out}; wrote {output}"
