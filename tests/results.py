"""Reading a run's results in tests (no torch: the JAX environment's tests use these too)."""

from pathlib import Path

import pytest

from cbe.run import read_jsonl


def eval_results(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "metrics" / "eval_results.jsonl")


def raw_predictions(run_dir: Path, qa_set: str, step: int) -> list[str]:
    return [d["raw_prediction"] for d in read_jsonl(run_dir / "eval_details" / f"{qa_set}_step_{step:06d}.jsonl")]


def assert_same_metrics(a: dict, b: dict) -> None:
    """Two evaluations agree on every metric (the timestamp aside, the eval losses up to float noise)."""
    assert a.keys() == b.keys()
    losses = {"eval_loss", "eval_loss_token_mean"}
    for key in a.keys() - {"timestamp", *losses}:
        assert a[key] == b[key], key
    for key in losses:
        assert a[key] == pytest.approx(b[key], rel=1e-5), key
