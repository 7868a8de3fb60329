"""The one run loop, above the backends: what happens when, in which order, for either backend.

A run trains `training.num_train_steps` optimizer steps over the corpus's rows (packed, or one document per row:
data.packing) in `training_order`, at the learning rates of `lr_multiplier`, in chunks between events. After each
chunk, in this order: the train line (every `logging.log_every_n_steps`), the evaluation (every
`training.eval_every`), the checkpoint (every `training.save_every`); all three at the last step. The base model
is evaluated at step 0 of a fresh run.

A run with `data.stages` goes through them in turn, each for its own steps (the schedule per stage or over the
run, optionally replaying earlier stages' rows and resetting the optimizer), evaluates every stage's QA sets and, at
step 0 and at each stage's end, adds a row of the accuracy matrix (metrics/stage_matrix.jsonl).

A re-run resumes from `checkpoints/latest` and first drops the metric lines after it (a fresh run drops them all):
steps past the last checkpoint are trained and evaluated again, and written exactly once. Evaluating before saving
keeps that true: a kill between an evaluation and its checkpoint only repeats work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm.auto import tqdm

from cbe.backends.base import Backend
from cbe.continual import write_continual_summary
from cbe.data.packing import PackedRows, corpus_rows, epochs_seen, repetition_report, training_order
from cbe.eval.evaluator import QAEvaluator
from cbe.eval.metrics import MATCHES
from cbe.logging import Loggers
from cbe.run import RunDir, is_main_process, read_jsonl, step_of, write_jsonl_atomic


def lr_multiplier(step: int, total_steps: int, warmup_fraction: float, schedule: str, end_fraction: float) -> float:
    """The learning rate of optimizer step `step` + 1 as a fraction of the peak, as transformers' schedulers (and so
    the benchmark) give it: 0 at the first step, rising linearly to the peak at step W + 1, W = ceil(warmup_fraction
    x total_steps) (transformers' warmup_ratio), then cosine or linear decay to end_fraction at the end
    (get_cosine_with_min_lr_schedule_with_warmup's min_lr_rate; 0: get_cosine_schedule_with_warmup)."""
    warmup = math.ceil(warmup_fraction * total_steps)
    if step < warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return end_fraction + (1 - end_fraction) * decay


def learning_rates(optimizer: DictConfig, total_steps: int) -> np.ndarray:
    """The learning rate of every optimizer step of a run."""
    o = optimizer
    multipliers = [
        lr_multiplier(s, total_steps, o.warmup_fraction, o.schedule, o.end_lr_fraction) for s in range(total_steps)
    ]
    return o.lr * np.array(multipliers)


def build(cfg: DictConfig, run: RunDir) -> tuple[Backend, QAEvaluator]:
    """The backend and the evaluator a config names (main.py, bench/ and tests wire a run with this)."""
    evaluator = instantiate(cfg.eval, data=cfg.data, run=run, retention_qa_path=cfg.continual.retention_qa_path)
    backend = instantiate(cfg.backend.trainer, _recursive_=False, cfg=cfg, run=run)
    return backend, evaluator


@dataclass(frozen=True)
class Stage:
    """A stretch of training on one corpus: the whole run, or one of data.stages."""

    name: str | None  # None: a run without stages
    train_path: str
    first_step: int  # the global step the stage starts after
    steps: int

    @property
    def last_step(self) -> int:
        return self.first_step + self.steps


def stages_of(cfg: DictConfig) -> list[Stage]:
    """The run's stages in order (data.stages), or the whole run as one stage without a name."""
    if not cfg.data.stages:
        return [Stage(None, cfg.data.train_path, 0, cfg.training.num_train_steps)]
    stages, first = [], 0
    for s in cfg.data.stages:
        steps = s.steps or cfg.continual.steps_per_stage
        stages.append(Stage(s.name, s.train_path, first, steps))
        first += steps
    return stages


def replayed_rows(fraction: float, batch: int) -> int:
    """Rows of each batch that replay earlier stages: fraction x batch, rounded down."""
    return int(round(fraction * batch, 6))


def batch_plan(cfg: DictConfig, stages: list[Stage], rows: list[PackedRows]) -> np.ndarray:
    """[steps, effective batch] row indices into the stages' rows put end to end: each stage reads its own rows in
    `training_order` (seeded by training.seed + its index), and after the first, continual.replay_fraction of each
    batch are rows of earlier stages, drawn without replacement within a step, seeded by (seed, stage, step)."""
    t, batch = cfg.training, cfg.training.effective_batch_size
    offsets = np.cumsum([0] + [len(r) for r in rows])
    plan = []
    for k, (stage, stage_rows) in enumerate(zip(stages, rows)):
        replay = replayed_rows(cfg.continual.replay_fraction, batch) if k else 0
        fresh = batch - replay
        own = offsets[k] + training_order(len(stage_rows), stage.steps * fresh, t.seed + k).reshape(-1, fresh)
        past = [
            np.random.default_rng([t.seed, k, step]).choice(offsets[k], replay, replace=replay > offsets[k])
            for step in range(stage.first_step, stage.last_step)
        ]
        plan.append(np.concatenate([own, np.array(past, dtype=own.dtype).reshape(stage.steps, replay)], axis=1))
    return np.concatenate(plan)


def schedule(cfg: DictConfig, stages: list[Stage]) -> np.ndarray:
    """The learning rate of every step: warmup and decay over each stage (continual.schedule=per_stage, and a run
    without stages) or over the whole run (global)."""
    if cfg.continual.schedule == "global":
        return learning_rates(cfg.optimizer, stages[-1].last_step)
    return np.concatenate([learning_rates(cfg.optimizer, s.steps) for s in stages])


def next_event(step: int, cfg: DictConfig, stage_end: int | None = None) -> int:
    """The first step after `step` at which the loop logs, evaluates, saves, ends a stage or ends."""
    t = cfg.training
    cadences = (cfg.logging.log_every_n_steps, t.eval_every, t.save_every)
    return min([t.num_train_steps, stage_end or t.num_train_steps, *(step + c - step % c for c in cadences)])


class Loop:
    """Trains (mode=train) or evaluates a checkpoint (mode=eval) through a backend."""

    def __init__(self, cfg: DictConfig, run: RunDir, backend: Backend, evaluator: QAEvaluator, loggers: Loggers):
        self.cfg, self.run, self.backend, self.evaluator, self.loggers = cfg, run, backend, evaluator, loggers
        self.val_rows: PackedRows | None = None

    def rows(self, path: str, name: str) -> PackedRows:
        """One corpus file, tokenized (cached) and laid out as data.packing says, its layout printed to the run log."""
        d = self.cfg.data
        rows = corpus_rows(path, self.backend.tokenizer, d.sequence_length, d.cache_dir, d.packing)
        print(rows.describe(name), flush=True)
        return rows

    def evaluate(self, step: int, stage: int | None = None) -> dict:
        """Evaluate at `step` (of stage `stage`, numbered from 1, 0 for the base model, in a run with stages)."""
        if self.val_rows is None and self.evaluator.loss_data:
            self.val_rows = self.rows(self.evaluator.loss_data, "val")
        metrics = self.evaluator.evaluate(self.backend, step, self.val_rows)
        if stage is not None:
            metrics["stage"] = stage
        self.loggers.eval(metrics)
        return metrics

    def train(self) -> None:
        cfg, t, run = self.cfg, self.cfg.training, self.run
        checkpoint = run.latest_checkpoint()
        step = step_of(checkpoint) if checkpoint else 0
        run.drop_checkpoints_after(step)
        self.backend.start(checkpoint)
        if checkpoint is not None:
            print(f"resuming from {checkpoint}", flush=True)
        run.drop_metrics_after(step if checkpoint else -1)  # what comes after is redone, so written once
        stages = stages_of(cfg)
        staged = stages[0].name is not None
        rows = [self.rows(s.train_path, f"train {s.name}" if staged else "train") for s in stages]
        for stage, stage_rows in zip(stages, rows):
            unit = "document" if stage_rows.one_document_per_row else "packed row"
            report = repetition_report(len(stage_rows), t.effective_batch_size, stage.steps, unit)
            print("\n".join(f"{stage.name}: {line}" if staged else line for line in report), flush=True)
        plan, rates = batch_plan(cfg, stages, rows), schedule(cfg, stages)
        all_rows = PackedRows.concatenate(rows)
        if checkpoint is None:
            self.evaluate_stage_end(0, stages) if staged else self.evaluate(0)
        steps: list[dict[str, float]] = []  # each step's metrics since the last train line
        bar = tqdm(initial=step, total=t.num_train_steps, desc="training", unit="step", disable=not is_main_process())
        while step < t.num_train_steps:
            k = next(i for i, s in enumerate(stages) if step < s.last_step)
            if cfg.continual.reset_optimizer and k and step == stages[k].first_step:
                self.backend.reset_optimizer()
            end = next_event(step, cfg, stages[k].last_step)
            steps += self.backend.train_steps(all_rows, plan[step:end], rates[step:end])
            bar.update(end - step)
            step = end
            last = step == t.num_train_steps
            if step % cfg.logging.log_every_n_steps == 0 or last:
                epoch = epochs_seen(step - stages[k].first_step, t.effective_batch_size, len(rows[k]))
                train = {key: float(np.mean([s[key] for s in steps])) for key in steps[0]}
                train |= {"learning_rate": float(rates[step - 1]), "epoch": epoch}
                self.loggers.train(step, train | ({"stage": k + 1} if staged else {}))
                steps = []
            if staged and step == stages[k].last_step:
                self.evaluate_stage_end(k + 1, stages)
            elif step % t.eval_every == 0 or last:
                self.evaluate(step, k + 1 if staged else None)
            if step % t.save_every == 0 or last:
                saved = self.backend.save(step)
                if is_main_process():
                    run.mark_latest(saved)
                    run.prune_checkpoints(t.max_checkpoints)
        bar.close()
        if staged and is_main_process():
            print(write_continual_summary(run.root), flush=True)

    def evaluate_stage_end(self, after: int, stages: list[Stage]) -> None:
        """Evaluate every stage's QA sets after stage `after` (0: the base model) and add its row of the accuracy
        matrix, R[after][j] for every stage j, set and metric, to metrics/stage_matrix.jsonl."""
        step = stages[after - 1].last_step if after else 0
        metrics = self.evaluate(step, after)
        if not is_main_process():
            return
        matrix = [
            {
                "after_stage": after,
                "eval_stage": j,
                "set": kind,
                "metric": metric,
                "value": metrics[f"{stage.name}_{kind}_{metric}"],
                "n": metrics[f"{stage.name}_{kind}_n"],
                "step": step,
            }
            for j, stage in enumerate(stages, 1)
            for kind in ("valqa", "testqa")
            for metric in (*MATCHES, "token_f1")
        ]
        write_jsonl_atomic(self.run.stage_matrix, read_jsonl(self.run.stage_matrix) + matrix)

    def evaluate_checkpoint(self) -> None:
        """mode=eval: one evaluation of cfg.checkpoint and its report table."""
        checkpoint = self.cfg.checkpoint
        step = 0 if checkpoint == "base" else step_of(Path(checkpoint))
        self.backend.load(checkpoint)
        self.run.drop_metrics_after(step - 1)  # evaluating the same checkpoint again replaces its line
        print(self.evaluator.report(self.evaluate(step)), flush=True)
        print(f"wrote {self.run.root}", flush=True)
