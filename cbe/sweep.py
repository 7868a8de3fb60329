"""What a multirun leaves behind: one summary line per job, and failed SLURM jobs that fail for SLURM too.

Hydra calls these callbacks (conf/config.yaml `hydra.callbacks`); `cbe sweep-summary DIR` rebuilds the
summary by hand, e.g. after the submitting shell was closed while SLURM jobs ran on.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import yaml
from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback

from cbe.errors import UserError
from cbe.eval import keys
from cbe.eval.metrics import MATCHES, METRICS
from cbe.run import RunDir, read_jsonl, write_jsonl_atomic

SUMMARY_FILE = "sweep_summary.jsonl"


def summarize_job(job_dir: Path) -> dict[str, Any]:
    """One job's overrides with its final and best QA metrics and eval loss (best = highest, lowest for loss)."""
    job = RunDir(job_dir)
    overrides = yaml.safe_load(job.overrides.read_text()) if job.overrides.exists() else []
    results = read_jsonl(job.eval_results)
    last = results[-1] if results else {}
    summary = {"job": job_dir.name, "overrides": overrides, "last_step": last["step"] if results else None}
    # eval loss and the QA metrics (keys.split gives None for other keys, support strata's and CIs included)
    for key in [k for k in last if k == "eval_loss" or keys.split(k, METRICS) is not None]:
        values = [m[key] for m in results if isinstance(m.get(key), (int, float)) and not math.isnan(m[key])]
        summary[f"final_{key}"] = last[key]
        summary[f"best_{key}"] = (min if key == "eval_loss" else max)(values) if values else None
    return summary


def summarize_sweep(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Summaries of every job under a sweep dir (a folder with .hydra/overrides.yaml), in sweep_summary.jsonl."""
    sweep_dir = Path(sweep_dir)
    jobs = RunDir.find(sweep_dir, RunDir.OVERRIDES, "*")
    if not jobs:
        raise UserError(f"{sweep_dir}: no sweep jobs here (no */{RunDir.OVERRIDES}); pass a multirun's sweep dir")
    summaries = [summarize_job(job) for job in jobs]
    write_jsonl_atomic(sweep_dir / SUMMARY_FILE, summaries)
    return summaries


def format_table(summaries: list[dict[str, Any]]) -> str:
    """The sweep at a glance: per job, overrides, last step, eval loss and valqa/testqa matches (final / best)."""
    columns = [("eval_loss", "eval_loss")] + [
        (keys.metric_key(qa_set, m), f"{qa_set} {m.removesuffix('_match')}") for qa_set in keys.KINDS for m in MATCHES
    ]
    columns = [(key, title) for key, title in columns if any(f"final_{key}" in s for s in summaries)]

    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}"

    shared = set.intersection(*(set(s["overrides"]) for s in summaries))  # name jobs by what differs
    rows = [["job", "step", *(f"{title} final/best" for _, title in columns)]]
    for s in summaries:
        name = " ".join(o for o in s["overrides"] if o not in shared) or s["job"]
        step = "-" if s["last_step"] is None else str(s["last_step"])
        final_best = [f"{cell(s.get(f'final_{key}'))} / {cell(s.get(f'best_{key}'))}" for key, _ in columns]
        rows.append([name, step, *final_best])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip() for row in rows)


class SweepSummary(Callback):
    """Writes sweep_summary.jsonl and prints its table when a multirun ends (on the submitting machine)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        """Summarize the sweep and print its table."""
        summaries = summarize_sweep(config.hydra.sweep.dir)
        print(f"\n{format_table(summaries)}\nsweep summary: {Path(config.hydra.sweep.dir) / SUMMARY_FILE}", flush=True)


class FailJobOnError(Callback):
    """Hydra keeps a job's exception in its result, so a crashed SLURM job would still end COMPLETED;
    re-raising it makes the job exit non-zero, which SLURM records and submitit reports."""

    def on_job_end(self, config, job_return, **kwargs) -> None:
        """Re-raise a failed job's exception inside a SLURM job."""
        if "SUBMITIT_EXECUTOR" in os.environ and job_return.status == JobStatus.FAILED:
            job_return.return_value  # raises the job's exception
