"""The one run loop, above the backends: what happens when, in which order, for either backend.

A run trains the optimizer steps of its plan (cbe.plan: the rows of every step, packed or one document per row as
data.packing says, and its learning rate) in chunks between events. After each chunk, in this order: the train line
(every `logging.log_every_n_steps`), the evaluation (every `training.eval_every`, and at each stage's end), the
checkpoint (every `training.save_every`); all three at the last step. The base model is evaluated at step 0 of a
fresh run. The loop tells its listeners (a staged run's cbe.continual.StageRecorder, ...) `on_eval`,
`on_stage_end`, `on_save` and `on_end`.

A re-run resumes from `checkpoints/latest` and first drops the metric lines after it (a fresh run drops them all):
steps past the last checkpoint are trained and evaluated again, and written exactly once. Evaluating before saving
keeps that true: a kill between an evaluation and its checkpoint only repeats work."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm.auto import tqdm

from cbe.backends.base import Backend
from cbe.config import backend_options, settings_of
from cbe.continual import StageRecorder
from cbe.data.packing import PackedRows, corpus_rows, epochs_seen, repetition_report
from cbe.eval.evaluator import QAEvaluator
from cbe.logging import Loggers
from cbe.plan import batch_plan, schedule, stages_of
from cbe.ranks import is_main_process
from cbe.run import RunDir, step_of


def build(cfg: DictConfig, run: RunDir) -> tuple[Backend, QAEvaluator]:
    """The backend and the evaluator a config names (main.py, bench/ and tests wire a run with this): the backend
    gets its typed options and the run's settings, not the config."""
    evaluator = instantiate(cfg.eval, data=cfg.data, run=run, retention_qa_path=cfg.continual.retention_qa_path)
    settings = settings_of(cfg)
    backend = instantiate(backend_options(cfg), _recursive_=False, _convert_="object", settings=settings, run=run)
    return backend, evaluator


def next_event(step: int, cfg: DictConfig, end: int | None = None) -> int:
    """The first step after `step` at which the loop logs, evaluates or saves, or its stage (or run) ends at
    `end` (default: training.num_train_steps)."""
    t = cfg.training
    cadences = (cfg.logging.log_every_n_steps, t.eval_every, t.save_every)
    return min([end or t.num_train_steps, *(step + c - step % c for c in cadences)])


class Loop:
    """Trains (mode=train) or evaluates a checkpoint (mode=eval) through a backend."""

    def __init__(self, cfg: DictConfig, run: RunDir, backend: Backend, evaluator: QAEvaluator, loggers: Loggers):
        self.cfg, self.run, self.backend, self.evaluator, self.loggers = cfg, run, backend, evaluator, loggers
        self.listeners: list[Any] = []  # what `emit` tells; train adds a staged run's StageRecorder

    def emit(self, event: str, *args: Any) -> None:
        """Tell every listener that handles `event` (on_eval, on_stage_end, on_save, on_end)."""
        for listener in self.listeners:
            getattr(listener, event, lambda *_: None)(*args)

    def rows(self, path: str, name: str) -> PackedRows:
        """One corpus file, tokenized (cached) and laid out as data.packing says, its layout printed to the run log."""
        d = self.cfg.data
        rows = corpus_rows(path, self.backend.tokenizer, d.sequence_length, d.cache_dir, d.packing)
        print(rows.describe(name), flush=True)
        return rows

    def evaluate(self, step: int, stage: int | None = None) -> dict:
        """Evaluate at `step` (of stage `stage`, numbered from 1, 0 for the base model, in a run with stages)."""
        metrics = self.evaluator.evaluate(self.backend, step)
        if stage is not None:
            metrics["stage"] = stage
        self.loggers.eval(metrics)
        self.emit("on_eval", step, metrics, self.evaluator.last_details)
        return metrics

    def evaluate_stage_end(self, after: int, step: int) -> None:
        """Evaluate after stage `after` (0: the base model): every stage's QA sets, a row of the accuracy matrix, and
        continual.lm_eval_tasks' general-ability scores."""
        metrics, details = self.evaluate(step, after), self.evaluator.last_details
        self.emit("on_stage_end", after, step, metrics, details, self.general_ability())

    def general_ability(self) -> list[dict[str, Any]]:
        """lm-eval's scores of the model as it is now, on continual.lm_eval_tasks (none where it names none): the
        model exported (LoRA merged, fp32) into a temporary dir beside the run, which lm-eval's hf model reads."""
        tasks = list(self.cfg.continual.lm_eval_tasks)
        if not tasks:
            return []
        from cbe.lm_eval import evaluate_model_dir, score_rows

        with tempfile.TemporaryDirectory(dir=self.run.root, prefix=".lm-eval-model-") as model_dir:
            self.backend.export(Path(model_dir), merge_lora=True, dtype="fp32")
            results = evaluate_model_dir(model_dir, tasks, self.cfg.continual.lm_eval_limit)
        return score_rows(results)

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
        staged, total = stages[0].name is not None, stages[-1].last_step
        if staged:
            self.listeners.append(StageRecorder(run, [s.name for s in stages]))
        rows = [self.rows(s.train_path, f"train {s.name}" if staged else "train") for s in stages]
        for stage, stage_rows in zip(stages, rows):
            unit = "document" if stage_rows.one_document_per_row else "packed row"
            report = repetition_report(len(stage_rows), t.effective_batch_size, stage.steps, unit)
            print("\n".join(f"{stage.name}: {line}" if staged else line for line in report), flush=True)
        plan, rates, all_rows = batch_plan(cfg, stages, rows), schedule(cfg, stages), PackedRows.concatenate(rows)
        if checkpoint is None:
            self.evaluate_stage_end(0, 0) if staged else self.evaluate(0)
        steps: list[dict[str, float]] = []  # each step's metrics since the last train line
        bar = tqdm(initial=step, total=total, desc="training", unit="step", disable=not is_main_process())
        while step < total:
            k = next(i for i, s in enumerate(stages) if step < s.last_step)
            if cfg.continual.reset_optimizer and k and step == stages[k].first_step:
                self.backend.reset_optimizer()
            end = next_event(step, cfg, stages[k].last_step)
            steps += self.backend.train_steps(all_rows, plan[step:end], rates[step:end])
            bar.update(end - step)
            step = end
            if step % cfg.logging.log_every_n_steps == 0 or step == total:
                epoch = epochs_seen(step - stages[k].first_step, t.effective_batch_size, len(rows[k]))
                train = {key: float(np.mean([s[key] for s in steps])) for key in steps[0]}
                train |= {"learning_rate": float(rates[step - 1]), "epoch": epoch}
                self.loggers.train(step, train | ({"stage": k + 1} if staged else {}))
                steps = []
            if staged and step == stages[k].last_step:
                self.evaluate_stage_end(k + 1, step)
            elif step % t.eval_every == 0 or step == total:
                self.evaluate(step, k + 1 if staged else None)
            if step % t.save_every == 0 or step == total:
                self.save(step)
        bar.close()
        self.emit("on_end")

    def save(self, step: int) -> None:
        saved = self.backend.save(step)
        if is_main_process():
            self.run.mark_latest(saved)
            self.run.prune_checkpoints(self.cfg.training.max_checkpoints)
        self.emit("on_save", saved)

    def evaluate_checkpoint(self) -> None:
        """mode=eval: one evaluation of cfg.checkpoint and its report table."""
        checkpoint = self.cfg.checkpoint
        step = 0 if checkpoint == "base" else step_of(Path(checkpoint))
        self.backend.load(checkpoint)
        self.run.drop_metrics_after(step - 1)  # evaluating the same checkpoint again replaces its line
        print(self.evaluator.report(self.evaluate(step)), flush=True)
        print(f"wrote {self.run.root}", flush=True)
