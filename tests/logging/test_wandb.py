"""logging=tensorboard_wandb with W&B offline: the .wandb files of a real tiny run (resumed once) hold the same
scalars as TensorBoard and eval_results.jsonl, the resolved config, one stable run id, and no secret."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from conftest import FAKE_SECRETS

from cbe.plot import read_tensorboard_scalars
from cbe.run import read_jsonl

BLOCK = 32 * 1024  # the .wandb file is a LevelDB-style log: 32 KiB blocks of checksummed record fragments


def wandb_records(path: Path) -> list:
    """The protobuf Records of a .wandb transaction log (wandb 0.31 has no Python reader of its own)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, fragment, position = [], b"", 7  # after the 7-byte file header
    while position + 7 <= len(data):
        if BLOCK - position % BLOCK < 7:  # a block's tail too short for a fragment header is padding
            position += BLOCK - position % BLOCK
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:
            break
        fragment += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            records.append(wandb_internal_pb2.Record.FromString(fragment))
            fragment = b""
    return records


def history(records) -> dict[int, dict[str, float]]:
    """step -> logged scalars."""
    rows = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows[row.pop("_step")] = row
    return rows


@pytest.fixture(scope="module")
def offline_runs(tiny_wandb_run):
    """(run record, history) of each W&B offline run in the run dir, oldest first."""
    files = sorted((tiny_wandb_run / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    runs = []
    for path in files:
        records = wandb_records(path)
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        runs.append((run, history(records)))
    return runs


def test_wandb_holds_the_scalars_and_config(tiny_wandb_run, offline_runs):
    assert len(offline_runs) == 2  # the first run, then its resume
    (first, first_rows), (second, second_rows) = offline_runs
    tensorboard = read_tensorboard_scalars(tiny_wandb_run / "logs" / "tensorboard")
    results = {r["step"]: r for r in read_jsonl(tiny_wandb_run / "metrics" / "eval_results.jsonl")}
    rows = {**first_rows, **second_rows}
    train_loss = {step: row["train/loss"] for step, row in rows.items() if "train/loss" in row}
    assert sorted(train_loss) == [1, 2, 3, 4, 5, 6]
    # TensorBoard keeps float32: the same numbers to its precision.
    assert train_loss == pytest.approx(tensorboard["train/loss"], rel=1e-6)
    assert "train/learning_rate" in rows[1]
    eval_loss = {step: row["eval/eval_loss"] for step, row in rows.items() if "eval/eval_loss" in row}
    assert eval_loss == {step: r["eval_loss"] for step, r in results.items()} and sorted(eval_loss) == [0, 2, 4, 6]
    assert rows[6]["eval/valqa_fuzzy_match"] == results[6]["valqa_fuzzy_match"]
    assert "eval/valqa_fuzzy_match_ci95" not in rows[6]  # only scalars

    for run, steps in ((first, 4), (second, 6)):
        config = {item.key: json.loads(item.value_json) for item in run.config.update}
        assert config["training"]["num_train_steps"] == steps and config["backend"]["name"] == "hf"
        assert config["logging"]["loggers"]["wandb"]["project"] == "cbe-test"
        assert (run.project, run.display_name) == ("cbe-test", "sample/tiny")


def test_a_resumed_run_continues_the_same_wandb_run(tiny_wandb_run, offline_runs):
    (first, first_rows), (second, second_rows) = offline_runs
    run_id = (tiny_wandb_run / "logs" / "wandb_run_id").read_text().strip()
    assert run_id.startswith("sample-tiny-") and first.run_id == second.run_id == run_id
    assert max(first_rows) == 4 and sorted(second_rows) == [5, 6]  # the resume logs from after its checkpoint


def test_no_secret_reaches_the_run_dir(tiny_wandb_run):
    files = [p for p in tiny_wandb_run.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.suffix == ".wandb" for p in files) and len(files) > 20
    for path in files:
        content = path.read_bytes()
        for name, secret in FAKE_SECRETS.items():
            assert secret.encode() not in content, f"{name} leaked into {path}"
