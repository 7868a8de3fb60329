"""logging=tensorboard_wandb with W&B offline: the .wandb file of a real tiny run holds the same scalars as
TensorBoard and eval_results.jsonl and the resolved config, and no secret reaches the run dir; a resumed run
continues its W&B run."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from conftest import FAKE_SECRETS

from cbe.logging import WandbLogger
from cbe.plot import read_tensorboard_scalars
from cbe.run import RunDir, read_jsonl

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
        _checksum, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:
            break
        fragment += data[position + 7 : position + 7 + length]
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


def offline_runs(run_dir: Path) -> list:
    """(run record, history) of each W&B offline run in a run dir, oldest first."""
    runs = []
    for path in sorted((run_dir / "logs" / "wandb").glob("offline-run-*/run-*.wandb")):
        records = wandb_records(path)
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        runs.append((run, history(records)))
    return runs


def test_wandb_holds_the_scalars_and_config_of_a_real_run(tiny_wandb_run):
    ((run, rows),) = offline_runs(tiny_wandb_run)
    tensorboard = read_tensorboard_scalars(tiny_wandb_run / "logs" / "tensorboard")
    results = {r["step"]: r for r in read_jsonl(tiny_wandb_run / "metrics" / "eval_results.jsonl")}
    train_loss = {step: row["train/loss"] for step, row in rows.items() if "train/loss" in row}
    assert sorted(train_loss) == [1, 2, 3, 4]
    # TensorBoard keeps float32: the same numbers to its precision.
    assert train_loss == pytest.approx(tensorboard["train/loss"], rel=1e-6)
    assert "train/learning_rate" in rows[1]
    eval_loss = {step: row["eval/eval_loss"] for step, row in rows.items() if "eval/eval_loss" in row}
    assert eval_loss == {step: r["eval_loss"] for step, r in results.items()} and sorted(eval_loss) == [0, 2, 4]
    assert rows[4]["eval/valqa_fuzzy_match"] == results[4]["valqa_fuzzy_match"]
    assert "eval/valqa_fuzzy_match_ci95" not in rows[4]  # only scalars

    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["training"]["num_train_steps"] == 4 and config["backend"]["name"] == "hf"
    assert config["logging"]["loggers"]["wandb"]["project"] == "cbe-test"
    assert (run.project, run.display_name) == ("cbe-test", "sample/tiny")
    assert run.run_id == (tiny_wandb_run / "logs" / "wandb_run_id").read_text().strip()


def test_no_secret_reaches_the_run_dir(tiny_wandb_run):
    files = [p for p in tiny_wandb_run.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.suffix == ".wandb" for p in files) and len(files) > 20
    for path in files:
        content = path.read_bytes()
        for name, secret in FAKE_SECRETS.items():
            assert secret.encode() not in content, f"{name} leaked into {path}"


def test_a_resumed_run_continues_its_wandb_run_and_another_run_dir_gets_its_own(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")

    def log(run: RunDir, steps: range) -> None:
        logger = WandbLogger(run, project="cbe-test", name="sample/tiny")
        for step in steps:
            logger.scalars(step, {"train/loss": 1.0 / step, "note": "not a number"})
        logger.close()

    run, sweep_job = RunDir(tmp_path / "lr=1e-4"), RunDir(tmp_path / "lr=3e-4")  # two jobs, one run_name
    try:
        for job in (run, sweep_job):
            job.logs.mkdir(parents=True)
            (job.root / "config.yaml").write_text("training: {num_train_steps: 4}\n")
        log(run, range(1, 3))
        log(run, range(3, 5))  # the re-run after a kill
        log(sweep_job, range(1, 3))
    finally:
        wandb.teardown()
    (first, first_rows), (second, second_rows) = offline_runs(run.root)
    run_id = (run.logs / "wandb_run_id").read_text().strip()
    assert run_id.startswith("sample-tiny-") and first.run_id == second.run_id == run_id
    assert sorted(first_rows) == [1, 2] and sorted(second_rows) == [3, 4]
    assert second_rows[4] == {
        "train/loss": 0.25,
        "_timestamp": second_rows[4]["_timestamp"],
        "_runtime": second_rows[4]["_runtime"],
    }
    ((other, _),) = offline_runs(sweep_job.root)
    assert other.run_id != run_id and other.run_id.startswith("sample-tiny-")
