"""The contract every backend fulfils, so the loop (cbe.loop), data, evaluation, logging and the run layout are
shared: a backend only holds a model and its state, and does the model's work."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from cbe.backends.sampling import GREEDY, Sampling
from cbe.data.packing import PackedRows
from cbe.eval.parse import marker_at_word_start


class Backend(Protocol):
    """What cbe.loop asks of a backend; cbe.loop.build instantiates `backend.trainer` (its `_target_` with its own
    typed options, cbe.specs) with `settings` and `run`."""

    tokenizer: Any  # set by start() or load()

    def start(self, checkpoint: Path | None) -> None:
        """The training state: the base model with the adapter and a fresh optimizer, or the state saved in
        `checkpoint` (a dir `save` wrote)."""

    def train_steps(self, rows: PackedRows, batches: np.ndarray, learning_rates: np.ndarray) -> list[dict[str, float]]:
        """One optimizer step per row of `batches` ([steps, effective batch] indices into `rows`), at the given
        learning rates; returns each step's `loss` (the mean over its trained tokens) and `mean_token_accuracy` (the
        share of them that are the model's top-1 prediction). With one document per row (the benchmark's layout),
        each micro-batch's documents are computed end to end without padding (cbe.data.packing.back_to_back)."""

    def reset_optimizer(self) -> None:
        """A fresh optimizer state, the parameters kept (continual.reset_optimizer, between stages)."""

    def save(self, step: int) -> Path:
        """Write the training state to `run.checkpoint_dir(step, backend)`, complete before it returns."""

    def load(self, checkpoint: str) -> None:
        """mode=eval: the model of a checkpoint dir, or the base model for `base`."""

    def export(self, out: Path, merge_lora: bool, dtype: str) -> None:
        """Write the model it holds (trained, or loaded) into the empty dir `out` as an HF model dir (config,
        safetensors in `dtype`, bf16 or fp32, tokenizer); a LoRA-adapted one as a PEFT adapter dir for the base model's
        name, or folded into the weights when `merge_lora` (cbe export)."""

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int,
        batch_size: int,
        stop_strings: Sequence[str],
        sampling: Sampling = GREEDY,
    ) -> list[str]:
        """Continuations, prompt excluded, each ending as `answer_ended` says (or at EOS, or after max_new_tokens):
        greedy, or drawn as cbe.backends.sampling defines, prompt i with the uniforms of question i."""

    def loss_sums(self, rows: PackedRows, batches: list[np.ndarray]) -> np.ndarray:
        """[len(batches), 3]: for each batch of row indices, the next-token loss summed over its trained tokens,
        their number, and how many of them are the model's top-1 prediction (cbe.eval.metrics.eval_loss_metrics)."""


def answer_ended(text: str, stop_strings: Sequence[str]) -> bool:
    """A generated answer is complete at a stop string that starts a word (the template's question marker, e.g. "Q:"
    at the start or after whitespace, not the "Q:" of "FAQ:", as cbe.eval.parse cuts: the model asks itself the next
    question) or at a newline after its first non-blank text (so an answer that starts with "\n" is not empty)."""
    return bool(marker_at_word_start(stop_strings).search(text)) or "\n" in text.lstrip()


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
