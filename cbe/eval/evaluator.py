"""The QA evaluator: the same prompts, parsing and metrics whichever backend generates."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
from omegaconf import DictConfig

from cbe.backends.sampling import GREEDY, Sampling
from cbe.data.jsonl import load_qa, strata_fields
from cbe.data.packing import PackedRows, corpus_rows
from cbe.eval import keys
from cbe.eval.metrics import MATCHES, eval_loss_metrics, score_answer, summarize
from cbe.eval.parse import question_markers
from cbe.ranks import is_main_process
from cbe.run import RunDir, write_jsonl_atomic


class Model(Protocol):
    """What the evaluator needs from a backend."""

    tokenizer: Any  # packs the validation corpus

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int,
        batch_size: int,
        stop_strings: Sequence[str],
        sampling: Sampling = GREEDY,
    ) -> list[str]: ...

    def loss_sums(self, rows: Any, batches: list[np.ndarray]) -> np.ndarray: ...


def few_shot_prefix(path: str | None) -> str:
    """A prefix file's text, ending in the blank line that separates its last example from the question."""
    return Path(path).read_text(encoding="utf-8").rstrip() + "\n\n" if path else ""


def unescape(template: str) -> str:
    """A prompt template with `\\n` and `\\t` as a newline and a tab (a shell cannot pass the characters)."""
    return template.replace("\\n", "\n").replace("\\t", "\t")


def qa_paths(data: DictConfig, qa_data: str | None, retention_qa_path: str | None = None) -> dict[str, str]:
    """Name -> file of each QA set evaluated: the task's (or each stage's), the extra and retention sets; or qa_data."""
    if qa_data:
        return {Path(qa_data).stem: qa_data}
    sets = {kind: data[f"{kind}_path"] for kind in keys.KINDS}
    if data.get("stages"):
        sets = {keys.of_stage(s.name, kind): s[f"{kind}_path"] for s in data.stages for kind in keys.KINDS}
    return {**sets, **data.extra_qa_paths, **({keys.RETENTION: retention_qa_path} if retention_qa_path else {})}


class QAEvaluator:
    """Asks every QA set's questions, scores the parsed answers and writes eval_details/."""

    def __init__(
        self,
        data: DictConfig,
        run: RunDir,
        prompt_template: str,
        prompt_prefix_file: str | None,
        max_new_tokens: int,
        batch_size: int,
        parser: str,
        support_thresholds: Sequence[int],
        num_examples: int,
        max_questions: int | None,
        loss_batch_size: int,
        loss_max_batches: int | None = None,
        qa_data: str | None = None,
        save_details: str | None = None,
        loss: bool = True,
        retention_qa_path: str | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
    ):
        self.run, self.data = run, data
        self.sampling = Sampling(float(temperature), int(top_k), float(top_p), int(seed))  # temperature 0: greedy
        self.prompt_template = unescape(prompt_template)
        self.stop_strings = question_markers(self.prompt_template)
        self.prefix = few_shot_prefix(prompt_prefix_file)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.parser = parser
        self.support_thresholds = list(support_thresholds)
        self.num_examples = num_examples
        self.loss_batch_size, self.loss_max_batches = loss_batch_size, loss_max_batches
        self.loss_data = data.val_path if loss else None  # the corpus eval_loss is measured on
        self.val_rows: PackedRows | None = None  # packed at the first evaluation
        self.qa_sets = {
            name: load_qa(path)[:max_questions] for name, path in qa_paths(data, qa_data, retention_qa_path).items()
        }
        self.prompt_shown = False
        self.save_details = save_details
        self.last_details: dict[str, list[dict[str, Any]]] = {}

    def prompt(self, record: dict[str, Any]) -> str:
        """What the model is asked for a QA record: the few-shot prefix, then the template with its question."""
        return self.prefix + self.prompt_template.format(question=record["question"])

    def score(self, records: Sequence[dict[str, Any]], raw_predictions: Sequence[str]) -> list[dict[str, Any]]:
        """One details record per question: what scoring, judging and strata need, never the whole (large) QA record."""
        return [
            {
                "question": record["question"],
                "ground_truth": record["answer"],
                **strata_fields(record),
                "prompt": self.prompt(record),
                "raw_prediction": raw,
                **score_answer(raw, record["answer"], self.parser, record["question"], self.stop_strings),
            }
            for record, raw in zip(records, raw_predictions)
        ]

    def evaluate(self, model: Model, step: int) -> dict[str, Any]:
        """eval_loss on the validation corpus and every QA metric, as one flat dict for the loggers."""
        metrics: dict[str, Any] = {"step": step, "timestamp": time.time(), "eval_loss": None}
        if self.loss_data:
            if self.val_rows is None:  # tokenized (cached) and laid out as data.packing says, its layout printed
                d = self.data
                self.val_rows = corpus_rows(self.loss_data, model.tokenizer, d.sequence_length, d.cache_dir, d.packing)
                print(self.val_rows.describe("val"), flush=True)
            metrics |= self.loss_metrics(model, self.val_rows)
        metrics["eval_loss_data"] = self.loss_data
        if not self.prompt_shown and is_main_process():
            name, records = next(((n, r) for n, r in self.qa_sets.items() if r), ("", []))
            if records:  # the exact text the model sees, newlines shown, once a process
                print(f"prompt of the first {name} question: {self.prompt(records[0])!r}", flush=True)
            self.prompt_shown = True
        for name, records in self.qa_sets.items():
            prompts = [self.prompt(r) for r in records]
            raw = model.generate(prompts, self.max_new_tokens, self.batch_size, self.stop_strings, self.sampling)
            details = self.last_details[name] = self.score(records, raw)
            if is_main_process():
                write_jsonl_atomic(self.run.details_path(name, step), details)
            metrics |= summarize(details, self.support_thresholds, qa_set=name)
        if self.save_details and is_main_process():
            all_details = [{"qa_set": name, **d} for name, details in self.last_details.items() for d in details]
            write_jsonl_atomic(self.save_details, all_details)
        return metrics

    def loss_metrics(self, model: Model, rows: Any) -> dict[str, float]:
        """eval_loss and its companions, eval.loss_batch_size rows a batch in file order, alike on every backend."""
        size = self.loss_batch_size
        batches = [np.arange(s, min(s + size, len(rows))) for s in range(0, len(rows), size)][: self.loss_max_batches]
        sums = model.loss_sums(rows, batches)
        return eval_loss_metrics(sums, np.array([len(b) for b in batches]), rows.one_document_per_row)

    def report(self, metrics: dict[str, Any]) -> str:
        """A table of every set's metrics with 95% CIs, then eval.num_examples predictions per set, marked."""

        def ci(bounds):
            return f"[{bounds[0]:.3f}, {bounds[1]:.3f}]"

        width = max([18, *(len(name) + 2 for name in self.qa_sets)])
        eval_loss = metrics["eval_loss"]
        loss = "not measured" if eval_loss is None else f"{eval_loss:.4f} on {metrics['eval_loss_data']}"
        lines = [
            f"step {metrics['step']}  eval_loss {loss}",
            f"{'set':<{width}}{'n':>6}"
            + "".join(f"{title:>8}{'95% CI':>16}" for title in ("exact", "substr", "fuzzy"))
            + f"{'f1':>8}",
        ]
        for name in self.qa_sets:
            n, key = metrics[keys.metric_key(name, "n")], partial(keys.metric_key, name)
            row = f"{name:<{width}}{n:>6}"
            if n:
                row += "".join(f"{metrics[key(m)]:>8.3f}{ci(metrics[keys.ci95(key(m))]):>16}" for m in MATCHES)
                row += f"{metrics[key('token_f1')]:>8.3f}"
            lines.append(row)
        for name, details in self.last_details.items():
            for d in details[: self.num_examples]:
                mark = next((m.removesuffix("_match") for m in MATCHES if d[m]), "wrong")
                lines.append(
                    f"[{mark}] {name}: {d['question']!r} -> {d['parsed_prediction']!r} (gold {d['ground_truth']!r})"
                )
        return "\n".join(lines)
