"""The one run loop, above the backends: what happens when, in which order, for either backend.

A run trains `training.num_train_steps` optimizer steps over the packed corpus in `training_order`, at the learning
rates of `lr_multiplier`, in chunks between events. After each chunk, in this order: the train line (every
`logging.log_every_n_steps`), the evaluation (every `training.eval_every`), the checkpoint (every
`training.save_every`); all three at the last step. The base model is evaluated at step 0 of a fresh run.

A re-run resumes from `checkpoints/latest` and first drops the metric lines after it (a fresh run drops them all):
steps past the last checkpoint are trained and evaluated again, and written exactly once. Evaluating before saving
keeps that true: a kill between an evaluation and its checkpoint only repeats work.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm.auto import tqdm

from cbe.backends.base import Backend
from cbe.data.packing import PackedRows, epochs_seen, packed_corpus, repetition_report, training_order
from cbe.eval.evaluator import QAEvaluator
from cbe.logging import Loggers
from cbe.run import RunDir, is_main_process, step_of


def lr_multiplier(step: int, total_steps: int, warmup_fraction: float, schedule: str, end_fraction: float) -> float:
    """The learning rate at an optimizer step as a fraction of the peak: linear warmup, then the schedule."""
    warmup = int(warmup_fraction * total_steps)
    if step < warmup:
        return (step + 1) / warmup
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
    evaluator = instantiate(cfg.eval, data=cfg.data, run=run)
    backend = instantiate(cfg.backend.trainer, _recursive_=False, cfg=cfg, run=run)
    return backend, evaluator


def next_event(step: int, cfg: DictConfig) -> int:
    """The first step after `step` at which the loop logs, evaluates, saves or ends."""
    t = cfg.training
    cadences = (cfg.logging.log_every_n_steps, t.eval_every, t.save_every)
    return min([t.num_train_steps, *(step + c - step % c for c in cadences)])


class Loop:
    """Trains (mode=train) or evaluates a checkpoint (mode=eval) through a backend."""

    def __init__(self, cfg: DictConfig, run: RunDir, backend: Backend, evaluator: QAEvaluator, loggers: Loggers):
        self.cfg, self.run, self.backend, self.evaluator, self.loggers = cfg, run, backend, evaluator, loggers
        self.val_rows: PackedRows | None = None

    def packed(self, path: str, name: str) -> PackedRows:
        """One corpus file, tokenized (cached) and packed, with its size printed to the run log."""
        rows = packed_corpus(path, self.backend.tokenizer, self.cfg.data.sequence_length, self.cfg.data.cache_dir)
        print(rows.describe(name), flush=True)
        return rows

    def evaluate(self, step: int) -> dict:
        if self.val_rows is None and self.evaluator.loss_data:
            self.val_rows = self.packed(self.evaluator.loss_data, "val")
        metrics = self.evaluator.evaluate(self.backend, step, self.val_rows)
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
        run.drop_eval_results_after(step if checkpoint else -1)  # what comes after is redone, so written once
        rows = self.packed(cfg.data.train_path, "train")
        print("\n".join(repetition_report(len(rows), t.effective_batch_size, t.num_train_steps)), flush=True)
        if checkpoint is None:
            self.evaluate(0)
        batch = t.effective_batch_size
        order = training_order(len(rows), t.num_train_steps * batch, t.seed).reshape(-1, batch)
        rates = learning_rates(cfg.optimizer, t.num_train_steps)
        losses: list[float] = []
        bar = tqdm(initial=step, total=t.num_train_steps, desc="training", unit="step", disable=not is_main_process())
        while step < t.num_train_steps:
            end = next_event(step, cfg)
            losses += self.backend.train_steps(rows, order[step:end], rates[step:end])
            bar.update(end - step)
            step = end
            last = step == t.num_train_steps
            if step % cfg.logging.log_every_n_steps == 0 or last:
                lr, epoch = float(rates[step - 1]), epochs_seen(step, batch, len(rows))
                self.loggers.train(step, {"loss": float(np.mean(losses)), "learning_rate": lr, "epoch": epoch})
                losses = []
            if step % t.eval_every == 0 or last:
                self.evaluate(step)
            if step % t.save_every == 0 or last:
                saved = self.backend.save(step)
                if is_main_process():
                    run.mark_latest(saved)
                    run.prune_checkpoints(t.max_checkpoints)
        bar.close()

    def evaluate_checkpoint(self) -> None:
        """mode=eval: one evaluation of cfg.checkpoint and its report table."""
        checkpoint = self.cfg.checkpoint
        step = 0 if checkpoint == "base" else step_of(Path(checkpoint))
        self.backend.load(checkpoint)
        self.run.drop_eval_results_after(step - 1)  # evaluating the same checkpoint again replaces its line
        print(self.evaluator.report(self.evaluate(step)), flush=True)
        print(f"wrote {self.run.root}", flush=True)
