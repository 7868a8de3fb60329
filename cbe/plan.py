"""The run's plan, fixed before it trains: its stages, the rows of every optimizer step and its learning rate.

A run without data.stages is one stage. A staged run trains its stages in turn, each for its own steps, the
schedule per stage or over the run (continual.schedule), optionally replaying earlier stages' rows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig

from cbe.data.packing import PackedRows, training_order


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
    return o.lr * np.array(
        [lr_multiplier(s, total_steps, o.warmup_fraction, o.schedule, o.end_lr_fraction) for s in range(total_steps)]
    )


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
    """The run's stages in order (data.stages), or the whole run as one stage without a name; the last one's
    `last_step` is the run's number of steps."""
    if not cfg.data.stages:
        return [Stage(None, cfg.data.train_path, 0, cfg.training.num_train_steps)]
    stages, first = [], 0
    for s in cfg.data.stages:
        steps = s.steps or cfg.continual.steps_per_stage
        stages.append(Stage(s.name, s.train_path, first, steps))
        first += steps
    return stages


def batch_plan(cfg: DictConfig, stages: list[Stage], rows: list[PackedRows]) -> np.ndarray:
    """[steps, effective batch] row indices into the stages' rows put end to end: each stage reads its own rows in
    `training_order` (seeded by training.seed + its index), and after the first, continual.replay_fraction of each
    batch are rows of earlier stages, drawn without replacement within a step, seeded by (seed, stage, step)."""
    t, batch = cfg.training, cfg.training.effective_batch_size
    offsets = np.cumsum([0] + [len(r) for r in rows])
    plan = []
    for k, (stage, stage_rows) in enumerate(zip(stages, rows)):
        replay = int(round(cfg.continual.replay_fraction * batch, 6)) if k else 0  # rounded down
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
