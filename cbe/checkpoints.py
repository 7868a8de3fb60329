"""What `mode=eval checkpoint=DIR` needs to know before anything loads: the run that wrote DIR (whose settings
the evaluation inherits), which backend and adapter wrote it, and where the evaluation's results go.

A checkpoint inside a run dir (<run>/checkpoints/<name>, or `latest`) is evaluated with that run's own
overrides, replayed before the command line's, so the same task, model, adapter, backend, data and prompt
compose as in training; its results land in <run>/eval/<name>/<what was evaluated>/. `base` and a checkpoint
outside a run dir compose from the command line alone, and land in
<output_root>/<project>/<task>/<model>-<adapter>-<backend>/eval/<label>/<what was evaluated>/.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from cbe.errors import UserError
from cbe.paths import resolve_path
from cbe.run import RunDir
from cbe.specs import SPECS, backend_of_checkpoint

# The run's overrides that an evaluation does not replay: where it writes, what it evaluates, how it is launched.
NOT_INHERITED = ("mode", "checkpoint", "output_root", "logging", "hydra", "experiment")


def run_of(checkpoint: str) -> RunDir | None:
    """The run that holds a checkpoint dir (<run>/checkpoints/<name>), or None for base or a loose dir."""
    return None if checkpoint == "base" else RunDir.of_checkpoint(checkpoint)


def _override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def inherit_run_overrides(argv: list[str]) -> list[str]:
    """The command line with, for `mode=eval checkpoint=DIR` inside a run dir, that run's overrides put first
    (Hydra lets the later value of a key win, so the command line still decides)."""
    overrides = {_override_key(a): a.split("=", 1)[1] for a in argv if "=" in a and not a.startswith("-")}
    if overrides.get("mode") != "eval" or "checkpoint" not in overrides:
        return argv
    run = run_of(overrides["checkpoint"].strip("'\""))
    if run is None:
        return argv
    saved = yaml.safe_load(run.overrides.read_text()) or []
    inherited = [o for o in saved if _override_key(o).split(".")[0] not in NOT_INHERITED]
    flags = [a for a in argv if a.startswith("-")]  # Hydra wants -m and friends before the overrides
    return [*flags, *inherited, *(a for a in argv if not a.startswith("-"))]


def written_by(checkpoint: Path) -> tuple[str, str | None]:
    """(backend, adapter) that wrote a checkpoint dir; the adapter is None where neither the run nor the dir says."""
    run = run_of(str(checkpoint))
    saved = yaml.safe_load(run.config.read_text()) if run and run.config.is_file() else {}
    backend = backend_of_checkpoint(checkpoint) or "hf"  # a loose dir: an HF model or adapter saved by hand
    return backend, (saved.get("adapter") or {}).get("name") or SPECS[backend].adapter_of(checkpoint)


def check_checkpoint(cfg: Any) -> None:
    """mode=eval: the checkpoint exists and was written by the backend and adapter the evaluation loads it with."""
    if cfg.checkpoint == "base":
        return
    path = Path(cfg.checkpoint)
    if not path.is_dir():
        raise UserError(
            f"checkpoint={cfg.checkpoint}: no such checkpoint dir; pass a checkpoints/checkpoint-<step> "
            "dir, a LoRA adapter dir, or checkpoint=base"
        )
    backend, adapter = written_by(path)
    if (backend, adapter or cfg.adapter.name) != (cfg.backend.name, cfg.adapter.name):
        raise UserError(
            f"checkpoint={cfg.checkpoint} was written by backend={backend} adapter={adapter}; evaluate "
            f"it with backend={backend} adapter={adapter} (not backend={cfg.backend.name} "
            f"adapter={cfg.adapter.name})"
        )


def evaluation_name(cfg: Any) -> str:
    """What an evaluation asks: its QA sets and a short hash of everything that changes its answers (the QA
    files, prompt, prefix text, parser, lengths, sampling settings), so evaluations of one checkpoint that differ
    live side by side and re-running one replaces its own result."""
    from cbe.eval.evaluator import few_shot_prefix, qa_paths, unescape

    e, paths = cfg.eval, qa_paths(cfg.data, cfg.eval.qa_data, cfg.continual.retention_qa_path)
    # A missing prefix file is named by its path here, so that validate() can say so in one line.
    found = resolve_path(e.prompt_prefix_file) if e.prompt_prefix_file else None
    prefix_file = found if found and Path(found).is_file() else None
    asked = {
        "qa": paths,
        "template": unescape(e.prompt_template),
        "prefix": few_shot_prefix(prefix_file) if prefix_file else (e.prompt_prefix_file or ""),
        "parser": e.parser,
        "max_new_tokens": e.max_new_tokens,
        "max_questions": e.max_questions,
    }
    if e.get("temperature", 0) > 0:  # sampled answers; greedy ones keep the names they always had
        asked["sampling"] = [e.temperature, e.top_k, e.top_p, e.seed]
    digest = hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()[:8]
    return f"{'+'.join(paths)}-{digest}"


def model_label(name: str) -> str:
    """`model.name` as a relative path that never leaves output_root: a hub id as it is (google/gemma-3-1b-pt), a
    local dir without its root and `..` (/models/mine -> models/mine, as a training run's dir names it)."""
    parts = [part for part in Path(name).parts if part not in (Path(name).anchor, ".", "..")]
    return "/".join(parts) or "model"


def evaluations_dir(cfg: Any) -> Path:
    """Where the evaluations of a composed `mode=eval` config's checkpoint go, each in a dir of its own (mode=eval's,
    cbe lm-eval's): <run>/eval/<checkpoint name>, or for base and loose dirs a run dir named by the setup."""
    label = "base" if cfg.checkpoint == "base" else Path(cfg.checkpoint).resolve().name
    run = run_of(cfg.checkpoint)
    if run is None:  # base or a checkpoint outside a run dir
        setup = f"{model_label(cfg.model.name)}-{cfg.adapter.name}-{cfg.backend.name}"
        run = RunDir(Path(cfg.output_root, cfg.logging.project_name, cfg.task.name, setup))
    return run.evaluations / label


def eval_run_dir(cfg: Any) -> str:
    """The run dir of a composed `mode=eval` config."""
    return str(evaluations_dir(cfg) / evaluation_name(cfg))
