"""The QA evaluator: the same prompts, parsing and metrics whichever backend generates."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol, Sequence

from omegaconf import DictConfig

from cbe.data.jsonl import load_qa
from cbe.eval.metrics import METRICS, summarize
from cbe.eval.parse import PARSERS
from cbe.run import RunDir, is_main_process, write_jsonl_atomic


class Model(Protocol):
    """What the evaluator needs from a backend."""

    def generate(self, prompts: Sequence[str], max_new_tokens: int, batch_size: int) -> list[str]: ...

    def loss(self, rows: Any, batch_size: int) -> float: ...


class QAEvaluator:
    """Asks every QA set's questions, scores the parsed answers and writes eval_details/."""

    def __init__(self, data: DictConfig, run: RunDir, prompt_template: str, prompt_prefix_file: str | None,
                 max_new_tokens: int, batch_size: int, parser: str, support_thresholds: Sequence[int],
                 num_examples: int | None, val_loss_batch_size: int):
        self.run = run
        self.prompt_template = prompt_template
        self.prefix = Path(prompt_prefix_file).read_text() if prompt_prefix_file else ""
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.parse = PARSERS[parser]
        self.support_thresholds = list(support_thresholds)
        self.val_loss_batch_size = val_loss_batch_size
        paths = {"valqa": data.valqa_path, "testqa": data.testqa_path, **data.extra_qa_paths}
        self.qa_sets = {name: load_qa(path)[:num_examples] for name, path in paths.items()}

    def prompt(self, record: dict[str, Any]) -> str:
        return self.prefix + self.prompt_template.format(question=record["question"])

    def score(self, records: Sequence[dict[str, Any]], raw_predictions: Sequence[str]) -> list[dict[str, Any]]:
        """One details record per question: the record's own fields, the prompt, the raw and parsed answer, the scores."""
        details = []
        for record, raw in zip(records, raw_predictions):
            parsed = self.parse(raw)
            scores = {name: metric(parsed, record["answer"]) for name, metric in METRICS.items()}
            details.append({**record, "prompt": self.prompt(record), "raw_prediction": raw,
                            "parsed_prediction": parsed, "ground_truth": record["answer"], **scores})
        return details

    def evaluate(self, model: Model, step: int, val_rows: Any) -> dict[str, Any]:
        """eval_loss on the validation rows and every QA metric, as one flat dict for the loggers."""
        metrics: dict[str, Any] = {"step": step, "timestamp": time.time(),
                                   "eval_loss": model.loss(val_rows, self.val_loss_batch_size)}
        for name, records in self.qa_sets.items():
            raw = model.generate([self.prompt(r) for r in records], self.max_new_tokens, self.batch_size)
            details = self.score(records, raw)
            if is_main_process():
                write_jsonl_atomic(self.run.details_path(name, step), details)
            metrics |= summarize(name, details, self.support_thresholds)
        return metrics
