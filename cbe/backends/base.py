"""The contract every backend fulfils, so data, evaluation, logging and the run layout are shared.

A backend trainer is built by `hydra.utils.instantiate(cfg.backend.trainer, cfg=..., run=..., evaluator=...,
loggers=...)` and then:
- `train()`: loads the model and tokenizer, packs the corpus with `cbe.data.packing.packed_corpus`, resumes
  from `run.latest_checkpoint()` if there is one (after `run.drop_eval_results_after(step)`), evaluates at
  step 0 of a fresh run, every `training.eval_every` optimizer steps and at the end by handing
  `evaluator.evaluate(self, step, val_rows)` to `loggers.eval`, saves `run.checkpoint_dir(step)` every
  `training.save_every` steps and at the end, then `run.mark_latest(...)`.
- `generate(prompts, max_new_tokens, batch_size) -> list[str]`: greedy continuations, prompt excluded, each
  ending as `answer_ended` says (or at EOS, or after max_new_tokens).
- `loss(rows, batch_size) -> float`: mean next-token loss over the trained positions of packed rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from cbe.data.packing import PackedRows, packed_corpus, repetition_report


def answer_ended(text: str) -> bool:
    """A generated answer is complete at "Q:" (a re-emitted question) or at a newline after its first
    non-blank text; a newline before it is not an end, so an answer that starts with "\n" is not empty."""
    return "Q:" in text or "\n" in text.lstrip()


@dataclass(frozen=True)
class NewlineStop:
    """`answer_ended`'s newline rule per token id, for a decode loop that checks it on the device: a row ends at a
    token that `ends_alone`, or at a `newline` token once an earlier token was not `blank`."""

    newline: np.ndarray  # [vocab] bool: the token's text holds a newline
    ends_alone: np.ndarray  # [vocab] bool: ... after non-blank text of its own (" Paris\n")
    blank: np.ndarray  # [vocab] bool: whitespace only, or a special token

    @classmethod
    def of(cls, tokenizer: Any, vocab_size: int = 0) -> "NewlineStop":
        """The tables of a tokenizer, padded to a model's `vocab_size` (ids past the tokenizer's are plain text)."""
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
        texts += ["x"] * (vocab_size - len(texts))
        return cls(
            newline=np.array(["\n" in t for t in texts]),
            ends_alone=np.array(["\n" in t.lstrip() for t in texts]),
            blank=np.array([not t.strip() for t in texts]),
        )

    def end(self, ids: list[int], eos_id: int) -> int:
        """How many of a row's generated ids the answer keeps: up to and including its EOS or ending newline."""
        text_before = False
        for n, t in enumerate(ids):
            if t == eos_id or self.ends_alone[t] or (self.newline[t] and text_before):
                return n + 1
            text_before = text_before or not self.blank[t]
        return len(ids)


def lr_multiplier(step: int, total_steps: int, warmup_fraction: float, schedule: str, end_fraction: float) -> float:
    """The learning rate at an optimizer step as a fraction of the peak: linear warmup, then the schedule.

    Both backends use this function, so `optimizer.*` means the same thing everywhere.
    """
    warmup = int(warmup_fraction * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return end_fraction + (1 - end_fraction) * decay


class Backend:
    """What both trainers do the same way; each sets cfg, run, evaluator, loggers, tokenizer and val_rows."""

    def packed(self, path: str, name: str) -> PackedRows:
        """One corpus file, tokenized (cached) and packed, with its size printed to the run log."""
        rows = packed_corpus(path, self.tokenizer, self.cfg.data.sequence_length, self.cfg.data.cache_dir)
        print(rows.describe(name), flush=True)
        return rows

    def packed_train(self) -> PackedRows:
        """The training corpus, packed, with how often the run repeats it printed to the run log, once at the start."""
        rows = self.packed(self.cfg.data.train_path, "train")
        t = self.cfg.training
        print("\n".join(repetition_report(len(rows), t.effective_batch_size, t.num_train_steps)), flush=True)
        return rows

    def evaluate(self, step: int) -> dict[str, Any]:
        metrics = self.evaluator.evaluate(self, step, self.val_rows)
        self.loggers.eval(metrics)
        return metrics

    def report_checkpoint(self, step: int) -> None:
        """mode=eval: evaluate the loaded checkpoint once and print the report table."""
        self.run.drop_eval_results_after(step - 1)  # evaluating the same checkpoint again replaces its line
        print(self.evaluator.report(self.evaluate(step)), flush=True)
        print(f"wrote {self.run.root}", flush=True)
