"""Where metrics go: always the console and metrics/eval_results.jsonl; TensorBoard and W&B by config.

Each logger takes `scalars(step, values)` and `close()`; only rank 0 builds real ones. Console lines go out with
`tqdm.write`, which lifts any active progress bar, so each starts a line of its own in the console and train.log.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
import types
from typing import Any

from tqdm.auto import tqdm

from cbe.eval import keys
from cbe.ranks import is_main_process
from cbe.run import RunDir, write_atomic


def _scalars(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardLogger:
    """Scalars to logs/tensorboard, written with the tensorboard package alone (no torch, no TensorFlow)."""

    def __init__(self, run: RunDir):
        # tensorboard imports TensorFlow when it is installed (the kd extra brings it), which costs ~20 s per
        # process; the `notf` marker module makes it use its own TF-free file writer.
        sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._writer = EventFileWriter(str(run.tensorboard))

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=k, simple_value=v) for k, v in _scalars(values).items()])
        self._writer.add_event(Event(summary=summary, step=step, wall_time=time.time()))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbLogger:
    """Scalars and the resolved config (no secrets: they live in the environment, never in the config) to
    Weights & Biases. WANDB_MODE=offline keeps the run in logs/wandb/ for a later `wandb sync`."""

    def __init__(self, run: RunDir, project: str, name: str):
        import wandb
        import yaml

        config = yaml.safe_load(run.config.read_text())
        self._run = wandb.init(
            project=project, name=name, id=self.run_id(run, name), resume="allow", dir=str(run.logs), config=config
        )

    @staticmethod
    def run_id(run: RunDir, name: str) -> str:
        """The run dir's W&B id, kept in logs/wandb_run_id: a resumed run continues it, a sweep's jobs stay apart."""
        path = run.logs / "wandb_run_id"
        if not path.exists():
            slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:48]
            write_atomic(path, f"{slug}-{os.urandom(4).hex()}\n")
        return path.read_text().strip()

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        self._run.log(_scalars(values), step=step)

    def close(self) -> None:
        self._run.finish()


def format_train_line(values: dict[str, Any]) -> str:
    """The console line of train scalars: HF's dict, with floats as numbers to 4 significant digits, not strings."""

    def rounded(v: Any) -> Any:
        finite_fraction = isinstance(v, float) and math.isfinite(v) and not v.is_integer()
        return float(f"{v:.4g}") if finite_fraction else v  # whole numbers (epoch 2.0, token counts) stay whole

    return str({k: rounded(v) for k, v in values.items()})


def format_eval_line(metrics: dict[str, Any]) -> str:
    """A compact console line: step, eval loss, and exact/substring/fuzzy match per QA set."""
    parts = [f"step {metrics['step']}"]
    if metrics.get("eval_loss") is not None and not math.isnan(metrics["eval_loss"]):
        parts.append(f"eval_loss {metrics['eval_loss']:.4f}")
    for key, value in metrics.items():
        qa_set = (keys.split(key, ["exact_match"]) or [None])[0]
        if qa_set and value is not None:
            parts.append(
                f"{qa_set} exact {value:.3f} substring {metrics[keys.metric_key(qa_set, 'substring_match')]:.3f} "
                f"fuzzy {metrics[keys.metric_key(qa_set, 'fuzzy_match')]:.3f}"
            )
    return "eval | " + " | ".join(parts)


class Loggers:
    """Fans metrics out: train scalars to the loggers, eval metrics also to eval_results.jsonl and the console."""

    def __init__(self, run: RunDir, loggers: list[Any]):
        self.run = run
        self.loggers = loggers

    def train(self, step: int, values: dict[str, Any]) -> None:
        """A train line: to the console and the loggers (train/<key>)."""
        if is_main_process():
            _console(format_train_line(values))
            for logger in self.loggers:
                logger.scalars(step, {f"train/{k}": v for k, v in values.items()})

    def eval(self, metrics: dict[str, Any]) -> None:
        """An evaluation: to eval_results.jsonl, the console and the loggers (eval/<key>)."""
        if is_main_process():
            self.run.append_eval_result(metrics)
            _console(format_eval_line(metrics))
            for logger in self.loggers:
                logger.scalars(metrics["step"], {f"eval/{k}": v for k, v in metrics.items() if k != "step"})

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def _console(line: str) -> None:
    tqdm.write(line)  # to sys.stdout, as print; tqdm.auto is the class the training bars are made of
    sys.stdout.flush()
