"""The QA evaluator: the same prompts, parsing and metrics whichever backend generates."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol, Sequence

from omegaconf import DictConfig

from cbe.data.jsonl import load_qa
from cbe.eval.metrics import score_answer, summarize
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
                 num_examples: int | None, val_loss_batch_size: int, qa_data: str | None = None,
                 save_details: str | None = None):
        self.run = run
        self.prompt_template = prompt_template
        self.prefix = Path(prompt_prefix_file).read_text() if prompt_prefix_file else ""
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.parse = PARSERS[parser]
        self.support_thresholds = list(support_thresholds)
        self.val_loss_batch_size = val_loss_batch_size
        paths = {"valqa": data.valqa_path, "testqa": data.testqa_path, **data.extra_qa_paths}
        if qa_data:
            paths = {Path(qa_data).stem: qa_data}
        self.qa_sets = {name: load_qa(path)[:num_examples] for name, path in paths.items()}
        self.save_details = save_details
        self.last_details: dict[str, list[dict[str, Any]]] = {}

    def prompt(self, record: dict[str, Any]) -> str:
        return self.prefix + self.prompt_template.format(question=record["question"])

    def score(self, records: Sequence[dict[str, Any]], raw_predictions: Sequence[str]) -> list[dict[str, Any]]:
        """One details record per question: the record's own fields, the prompt, the raw and parsed answer, the scores."""
        details = []
        for record, raw in zip(records, raw_predictions):
            details.append({**record, "prompt": self.prompt(record), "raw_prediction": raw,
                            "ground_truth": record["answer"], **score_answer(raw, record["answer"], self.parse)})
        return details

    def evaluate(self, model: Model, step: int, val_rows: Any) -> dict[str, Any]:
        """eval_loss on the validation rows and every QA metric, as one flat dict for the loggers."""
        metrics: dict[str, Any] = {"step": step, "timestamp": time.time(),
                                   "eval_loss": model.loss(val_rows, self.val_loss_batch_size)}
        for name, records in self.qa_sets.items():
            raw = model.generate([self.prompt(r) for r in records], self.max_new_tokens, self.batch_size)
            details = self.last_details[name] = self.score(records, raw)
            if is_main_process():
                write_jsonl_atomic(self.run.details_path(name, step), details)
            metrics |= summarize(details, self.support_thresholds, prefix=f"{name}_")
        if self.save_details and is_main_process():
            write_jsonl_atomic(self.save_details, [{"qa_set": name, **d} for name, details in self.last_details.items()
                                                   for d in details])
        return metrics

    def report(self, metrics: dict[str, Any], examples: int = 3) -> str:
        """A table of every set's metrics with 95% CIs, then a few predictions marked exact, fuzzy or wrong."""
        def ci(bounds):
            return f"[{bounds[0]:.3f}, {bounds[1]:.3f}]"

        lines = [f"step {metrics['step']}  eval_loss {metrics['eval_loss']:.4f}",
                 f"{'set':<12}{'n':>6}{'exact':>8}{'95% CI':>16}{'fuzzy':>8}{'95% CI':>16}{'f1':>8}"]
        for name in self.qa_sets:
            m = {key: metrics[f"{name}_{key}"] for key in ("n", "exact_match", "exact_match_ci95", "fuzzy_match",
                                                            "fuzzy_match_ci95", "token_f1")}
            if not m["n"]:
                lines.append(f"{name:<12}{0:>6}")
                continue
            lines.append(f"{name:<12}{m['n']:>6}{m['exact_match']:>8.3f}{ci(m['exact_match_ci95']):>16}"
                         f"{m['fuzzy_match']:>8.3f}{ci(m['fuzzy_match_ci95']):>16}{m['token_f1']:>8.3f}")
        for name, details in self.last_details.items():
            for d in details[:examples]:
                mark = "exact" if d["exact_match"] else "fuzzy" if d["fuzzy_match"] else "wrong"
                lines.append(f"[{mark}] {name}: {d['question']!r} -> {d['parsed_prediction']!r} "
                             f"(gold {d['ground_truth']!r})")
        return "\n".join(lines)
