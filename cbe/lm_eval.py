"""`cbe lm-eval`: EleutherAI's lm-evaluation-harness (lm-eval 0.4) on any checkpoint, offline on local task data.

The checkpoint is exported as a whole HF model dir (cbe.export, a LoRA adapter merged into the weights) into a
temporary dir, lm-eval's HF model (`hf`) scores it, and the results land beside mode=eval's evaluations of the same
checkpoint: <run>/eval/<checkpoint>/lm-eval-<hash>/results.json, with samples_<task>.jsonl (every question, its
prompt and the model's log-likelihoods) beside it. <run>/eval/<checkpoint> is what cbe.checkpoints.evaluations_dir names
for `mode=eval checkpoint=...` (`latest` resolved to its target; `base` and a dir outside a run under
<output_root>/<project>/<task>/<model>-<adapter>-<backend>/), and <hash> covers what changes the scores (settings_hash),
so the same settings replace their own results and other settings sit beside them.

Tasks are lm-eval's own (hub data: arc_easy, hellaswag, mmlu, ...), the task YAMLs of the dirs given as include_path,
and cbe's bundled ones in cbe/assets/lm_eval/ (cbe_general_mc: 40 general-knowledge questions, offline).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, Sequence

import yaml

from cbe.errors import UserError

BUNDLED = Path(__file__).resolve().parent / "assets" / "lm_eval"
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # cbe export's names -> torch's, as lm-eval's model_args take them
RESULTS, SAMPLES = "results.json", "samples_{task}.jsonl"


def task_manager(tasks: Sequence[str], include_path: Sequence[str | Path] | None = ()):
    """lm-eval's TaskManager over the bundled tasks and the user's YAML dirs, after checking that every task is known.
    lm-eval's own tasks are indexed only when a task is not in those dirs: indexing reads all their YAMLs (7 s)."""
    from lm_eval.tasks import TaskManager

    include_path = list(include_path or ())
    for path in include_path:
        if not Path(path).is_dir():
            raise UserError(f"--include-path {path}: no such dir; pass a dir of lm-eval task YAML files")
    paths = [str(BUNDLED), *map(str, include_path)]  # later dirs win a name: the user's over the bundled ones
    manager = TaskManager(include_path=paths, include_defaults=False)
    if not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=paths)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        import difflib

        near = sorted({m for task in unknown for m in difflib.get_close_matches(task, manager.all_tasks, 3, 0.8)})
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise UserError(
            f"unknown lm-eval task {', '.join(map(repr, unknown))}{hint} (bundled: {', '.join(bundled_tasks())}; "
            "add your own task YAML dirs with --include-path)"
        )
    return manager


def bundled_tasks() -> list[str]:
    return sorted(_read_yaml(path)["task"] for path in BUNDLED.glob("*.yaml"))


class _AnyTagLoader(yaml.SafeLoader):
    """Reads a task YAML for its plain keys: lm-eval's `!function` tags (and any other) read as None."""


_AnyTagLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _read_yaml(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=_AnyTagLoader) or {}


def _entry(manager, name: str) -> tuple[Path | None, list[str]]:
    """A task name's YAML (None for a tag or a Python task) and the names it stands for (a group's or a tag's
    members), from lm-eval's index: an Entry in lm-eval 0.4.12 and later, a dict before."""
    entry = manager.task_index[name]
    if isinstance(entry, dict):  # {"type": ..., "yaml_path": path or -1, "task": [members] for a tag}
        path, kind, tag_members = entry.get("yaml_path"), entry.get("type"), entry.get("task")
    else:
        path, kind, tag_members = entry.yaml_path, entry.kind.name.lower(), entry.tags
    path = Path(path) if isinstance(path, (str, Path)) else None
    if kind == "tag":
        return None, sorted(tag_members or [])
    listed = _read_yaml(path).get("task") if path else None  # a group lists its members under `task`
    members = [m if isinstance(m, str) else m.get("task") or m.get("group") for m in listed or []]
    return path, [m for m in members if isinstance(m, str)] if isinstance(listed, list) else []


def _task_spec(manager, name: str) -> str | dict[str, Any]:
    """What simple_evaluate gets for a task: a bundled task as its config with absolute data_files, any other by name.
    lm-eval passes data_files to datasets.load_dataset, which resolves relative paths against the current dir, not
    the YAML's: a bundled task's files are named relative to its YAML and made absolute here, so it runs from any
    dir. A user's YAML follows lm-eval's own rule (paths relative to where cbe runs, or absolute)."""
    path, _ = _entry(manager, name)
    if path is None or path.resolve().parent != BUNDLED:
        return name
    config = _read_yaml(path)
    files = config["dataset_kwargs"]["data_files"]  # the bundled tasks name theirs as {split: file}
    config["dataset_kwargs"]["data_files"] = {split: str(BUNDLED / file) for split, file in files.items()}
    return config


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _local_files(manager, name: str, seen: set[str]) -> list[str]:
    """Digests of the files a bundled or user task is made of: every file beside its YAML (the YAML, its includes
    and utils, data kept there) and the local files its data_files name; a group's or tag's: its members'. lm-eval's
    own tasks: none (the lm-eval version, hashed beside them, fixes their YAMLs; their data is the hub's)."""
    if name in seen:
        return []
    seen.add(name)
    import lm_eval

    path, members = _entry(manager, name)
    digests = []
    if path is not None and Path(lm_eval.__file__).parent not in path.resolve().parents:
        digests += [_digest(p) for p in sorted(path.parent.iterdir()) if p.is_file() and not p.name.startswith(".")]
        files = ((_read_yaml(path).get("dataset_kwargs") or {}).get("data_files")) or []
        for group in files.values() if isinstance(files, dict) else [files]:
            for file in [group] if isinstance(group, str) else group:
                if Path(file).is_file():  # relative to the current dir, as datasets resolves it
                    digests.append(_digest(Path(file)))
    return digests + [d for member in members for d in _local_files(manager, member, seen)]


def settings_hash(manager, tasks: Sequence[str], limit: int | None, num_fewshot: int | None, dtype: str) -> str:
    """8 hex digits of sha256 over what changes the scores: the task names, limit, num_fewshot, the weights' dtype,
    the lm-eval version and the content of the bundled and local tasks' files (not the batch size or device)."""
    import lm_eval

    seen: set[str] = set()
    asked = {
        "tasks": list(tasks),
        "limit": limit,
        "num_fewshot": num_fewshot,
        "dtype": dtype,
        "lm_eval": getattr(lm_eval, "__version__", None),
        "files": {task: sorted(_local_files(manager, task, seen)) for task in tasks},
    }
    return hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()[:8]


@contextlib.contextmanager
def _data_errors():
    """A task whose data does not load is the user's to fix: datasets raises ConnectionError for a hub set out of
    reach and FileNotFoundError (DatasetNotFoundError too) for a missing file or set."""
    try:
        yield
    except (ConnectionError, FileNotFoundError) as e:
        raise UserError(
            f"lm-eval could not load a task's data: {e} (lm-eval's own tasks read the hub; a task's relative "
            "data_files resolve against the current dir)"
        ) from e


@contextlib.contextmanager
def _global_rng_kept():
    """lm-eval seeds Python's, numpy's and torch's global generators (simple_evaluate, for reproducible scores) and
    draws from them: put the caller's states back after it, so that evaluating inside a run (cbe.loop's
    continual.lm_eval_tasks) leaves the run's own draws as they would be without it."""
    import random

    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def check_task_data(manager, tasks: Sequence[str]) -> None:
    """Build the tasks once, which loads their data (a hub set downloaded to datasets' cache, local files read), so
    that a task that cannot load fails before a model is exported; evaluating builds them again from the cache."""
    load = getattr(manager, "load", None) or manager.load_task_or_group  # lm-eval 0.4.12 and later, and before
    with _data_errors(), _global_rng_kept():  # building a task draws from Python's generator
        load([_task_spec(manager, task) for task in tasks])


def evaluate_model_dir(
    model_dir: str | Path,
    tasks: Sequence[str],
    limit: int | None = None,
    include_path: Sequence[str | Path] | None = None,
    batch_size: int | str = 8,
    device: str | None = None,
    *,
    num_fewshot: int | None = None,
    dtype: str = "fp32",
    manager=None,
) -> dict[str, Any]:
    """lm-eval's results for an HF model dir, as JSON data: per task `results[task]["acc,none"]`,
    `"acc_stderr,none"`, ... as lm-eval reports them, and `samples` (task -> one record per question). `manager`: a
    task_manager() already built for these tasks, to skip indexing again; `device`: cuda where there is one."""
    import lm_eval
    import torch
    from lm_eval.utils import handle_non_serializable

    manager = manager or task_manager(tasks, include_path)
    with _data_errors(), _global_rng_kept():
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model_dir), "dtype": DTYPES[dtype]},
            tasks=[_task_spec(manager, task) for task in tasks],
            task_manager=manager,
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size=batch_size,
            device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
            log_samples=True,
        )
    # numpy numbers, dtypes and sets in lm-eval's dict become JSON as lm-eval's own output writes them.
    return json.loads(json.dumps(results, default=handle_non_serializable))


def evaluate_checkpoint(
    checkpoint: str,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    num_fewshot: int | None = None,
    include_path: Sequence[str | Path] = (),
    batch_size: int | str = 8,
    device: str | None = None,
    dtype: str = "fp32",
    overrides: Sequence[str] = (),
) -> Path:
    """Export `checkpoint` (as cbe export does, LoRA merged), score it on `tasks`, and return the dir it wrote:
    <run>/eval/<checkpoint>/lm-eval-<hash>/ holding results.json and samples_<task>.jsonl."""
    from cbe.checkpoints import evaluations_dir
    from cbe.export import check_dtype, checkpoint_config, export_checkpoint
    from cbe.run import atomic_dir, write_atomic, write_jsonl_atomic

    check_dtype(dtype)  # before the tasks load and the model exports
    if not tasks:
        raise UserError("--tasks: name at least one lm-eval task, e.g. cbe_general_mc")
    cfg = checkpoint_config(checkpoint, overrides)  # refuses a missing checkpoint, a wrong backend, ... in one line
    manager = task_manager(tasks, include_path)  # refuses an unknown task before the model is exported
    check_task_data(manager, tasks)
    out = evaluations_dir(cfg) / f"lm-eval-{settings_hash(manager, tasks, limit, num_fewshot, dtype)}"
    out.parent.mkdir(parents=True, exist_ok=True)
    # The export sits beside the results, not in /tmp: a large model's weights need the outputs' disk.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.model-") as tmp:
        model = export_checkpoint(checkpoint, Path(tmp) / "model", merge_lora=True, dtype=dtype, overrides=overrides)
        settings = {"num_fewshot": num_fewshot, "dtype": dtype, "manager": manager}
        results = evaluate_model_dir(model, tasks, limit, include_path, batch_size, device, **settings)
    samples = results.pop("samples", {})
    results["cbe"] = {
        "checkpoint": str(Path(checkpoint).resolve()) if checkpoint != "base" else "base",
        "overrides": list(overrides),
        "export": {"merge_lora": True, "dtype": dtype},  # what model_args' pretrained (a removed temp dir) held
        "tasks": list(tasks),
        "include_path": [str(Path(p).resolve()) for p in include_path],
        "limit": limit,
        "num_fewshot": num_fewshot,
    }
    with atomic_dir(out) as tmp:  # a rerun with the same settings replaces the dir whole
        write_atomic(tmp / RESULTS, json.dumps(results, indent=1, ensure_ascii=False) + "\n")
        for task, records in samples.items():
            write_jsonl_atomic(tmp / SAMPLES.format(task=task), records)
    return out


def score_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """lm-eval's scores as rows, one per task (or group) and metric: lm_eval_task, metric (with its filter where that is
    not `none`), value, stderr (None where lm-eval has none) and n, the questions scored (None for a group)."""
    rows = []
    for task, metrics in results["results"].items():
        n = (results.get("n-samples", {}).get(task) or {}).get("effective")
        for key, value in metrics.items():
            metric, _, kind = key.partition(",")  # lm-eval's keys: "<metric>,<filter>"
            if kind and "_stderr" not in metric and isinstance(value, (int, float)):
                stderr = metrics.get(f"{metric}_stderr,{kind}")
                stderr = stderr if isinstance(stderr, (int, float)) else None  # lm-eval writes "N/A"
                name = metric if kind == "none" else key
                rows.append({"lm_eval_task": task, "metric": name, "value": value, "stderr": stderr, "n": n})
    return rows


def format_scores(results: dict[str, Any]) -> str:
    """A short table of the scores: task (or group), metric, value, stderr."""
    rows = [("task", "metric", "value", "stderr")]
    for r in score_rows(results):
        stderr = "-" if r["stderr"] is None else f"{r['stderr']:.4f}"
        rows.append((r["lm_eval_task"], r["metric"], f"{r['value']:.4f}", stderr))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
