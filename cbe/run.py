"""The run directory: its layout, atomic writes, the `latest` checkpoint link and the rank-0 guard.

outputs/<project_name>/<run_name>/
    config.yaml                 resolved config, no secrets
    .hydra/                     Hydra's own record of the composition
    logs/train.log              everything the run printed
    logs/tensorboard/           scalars
    checkpoints/checkpoint-<step>/ (HF) or ckpt_<step>/ (KD), checkpoints/latest -> the newest
    metrics/eval_results.jsonl  one line per evaluation
    metrics/stage_matrix.jsonl, metrics/continual_summary.json   a run with stages
    eval_details/<set>_step_<NNNNNN>.jsonl
    plots/                      a staged run's own figures (cbe plot)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

import yaml

from cbe.errors import UserError
from cbe.paths import same_path
from cbe.ranks import is_main_process
from cbe.specs import SPECS, backend_of_checkpoint

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def open_atomic(path: str | Path, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """A file to stream into that replaces `path` only if the block finishes (an error leaves `path` as it was)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temp file sits next to `path`: os.replace is atomic only within one file system.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write a whole file so that readers see either the old or the new content, never a half file."""
    with open_atomic(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def write_jsonl_atomic(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Write records as JSON lines, atomically."""
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file the harness wrote itself (user data goes through cbe.data.jsonl)."""
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def step_of(checkpoint: Path) -> int:
    """The optimizer step of a checkpoint dir; 0 for a dir named otherwise (an adapter saved by hand)."""
    match = re.search(r"[-_](\d+)$", checkpoint.resolve().name)
    return int(match.group(1)) if match else 0


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """A temporary dir to fill that becomes `path` only if the block finishes (replacing an older `path`)."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)  # a checkpoint of a step re-run after a kill
    os.replace(tmp, path)


# What a resumed run must share with the run it continues (num_train_steps may grow: runs get extended).
TRAJECTORY_KEYS = (
    "data",
    "model",
    "adapter",
    "optimizer",
    "backend.name",
    "continual",
    "training.effective_batch_size",
    "training.seed",
)


def _select(config: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        config = (config or {}).get(part)
    return config


def _same(old: Any, new: Any) -> bool:
    """Equal values, a path counting as equal to another that names the same file (cbe.paths): a run started in
    the project saved `data/sample/train.jsonl`, resumed elsewhere it resolves to that file's absolute path."""
    if isinstance(old, dict) and isinstance(new, dict):
        return old.keys() == new.keys() and all(_same(old[k], new[k]) for k in old)
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(map(_same, old, new))
    if isinstance(old, str) and isinstance(new, str):
        return same_path(old, new)
    return old == new


class _Tee:
    """A text stream that writes to the terminal and to the run's log file."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text):
        self.log.write(text)
        self.log.flush()
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()
        self.log.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


class RunDir:
    """One run's output folder, the one place that knows its layout. Only rank 0 writes; every rank can read."""

    EVAL_RESULTS = Path("metrics", "eval_results.jsonl")  # what makes a folder a run of cbe
    OVERRIDES = Path(".hydra", "overrides.yaml")  # Hydra's record of the command line: what makes a sweep's job

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.config = self.root / "config.yaml"
        self.overrides, self.hydra_config = self.root / self.OVERRIDES, self.root / ".hydra" / "hydra.yaml"
        self.logs = self.root / "logs"
        self.tensorboard = self.logs / "tensorboard"
        self.checkpoints = self.root / "checkpoints"
        self.eval_results = self.root / self.EVAL_RESULTS
        self.stage_matrix = self.eval_results.with_name("stage_matrix.jsonl")  # a run with stages (cbe.continual)
        self.summary = self.eval_results.with_name("continual_summary.json")
        self.eval_details = self.root / "eval_details"
        self.evaluations = self.root / "eval"  # each mode=eval of its checkpoints: eval/<checkpoint>/<what>/
        self.plots = self.root / "plots"

    def __fspath__(self) -> str:
        return str(self.root)

    @classmethod
    def find(cls, folder: str | Path, marker: Path = EVAL_RESULTS, pattern: str = "**") -> list[Path]:
        """Sorted dirs under `folder` holding `marker` (a layout path), at any depth or (pattern "*") one level down."""
        return sorted({p.parents[len(marker.parts) - 1] for p in Path(folder).glob(f"{pattern}/{marker}")})

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunDir | None:
        """The run that holds a checkpoint dir (<run>/checkpoints/<name>, `latest` resolved), else None."""
        folder = Path(checkpoint).resolve().parent
        return run if (run := cls(folder.parent)).checkpoints == folder and run.overrides.is_file() else None

    @classmethod
    def of_details(cls, details: str | Path) -> RunDir | None:
        """The run (of training or of mode=eval) whose eval_details/ holds a details file, else None."""
        folder = Path(details).resolve().parent
        return run if (run := cls(folder.parent)).eval_details == folder and run.config.is_file() else None

    def create(self, cfg) -> "RunDir":
        """Make the folders and save the resolved config."""
        from omegaconf import OmegaConf

        if is_main_process():
            for folder in (self.logs, self.eval_results.parent, self.eval_details):
                folder.mkdir(parents=True, exist_ok=True)
            write_atomic(self.config, OmegaConf.to_yaml(cfg, resolve=True))
        return self

    def capture_output(self) -> "RunDir":
        """Copy everything this process prints to logs/train.log (appending, so a resumed run keeps its history)."""
        if is_main_process():
            log = open(self.logs / "train.log", "a", buffering=1)
            # In a multirun the previous job's tee is still in place: replace it, do not stack on it.
            out, err = (s.stream if isinstance(s, _Tee) else s for s in (sys.stdout, sys.stderr))
            if isinstance(sys.stdout, _Tee):
                sys.stdout.log.close()
            sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)
        return self

    def refuse_a_different_run(self, cfg) -> None:
        """Refuse to resume an earlier start (its config.yaml) with another trajectory: two experiments mixed."""
        from omegaconf import OmegaConf

        if not self.config.exists():
            return
        saved, config = yaml.safe_load(self.config.read_text()), yaml.safe_load(OmegaConf.to_yaml(cfg, resolve=True))
        for key in TRAJECTORY_KEYS:
            old, new = _select(saved, key), _select(config, key)
            if not _same(old, new):
                raise UserError(
                    f"{self.root} holds a run with {key}={old!r}, not {new!r}; re-run with the same settings to "
                    f"resume it, or pick another logging.run_name"
                )

    def completed_steps(self, num_train_steps: int) -> int | None:
        """The steps a finished run trained (its last checkpoint, or a 0-step run's step-0 evaluation), else None."""
        latest = self.latest_checkpoint()
        if latest is not None:
            step = step_of(latest)
            return step if step >= num_train_steps else None
        done = num_train_steps == 0 and any(m["step"] == 0 for m in read_jsonl(self.eval_results))
        return 0 if done else None

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint_dir(self, step: int, backend: str) -> Path:
        return self.checkpoints / SPECS[backend].checkpoint_name.format(step=step)

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint a re-run resumes from, or None for a fresh run."""
        link = self.checkpoints / "latest"
        return link.resolve() if link.exists() else None

    def mark_latest(self, checkpoint: Path) -> None:
        """Point `latest` at a finished checkpoint; the link is swapped atomically."""
        tmp = self.checkpoints / ".latest.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(checkpoint.name)
        os.replace(tmp, self.checkpoints / "latest")

    def saved_checkpoints(self) -> list[Path]:
        """The checkpoint dirs of the run, oldest first (not `latest`, not a temporary dir)."""
        if not self.checkpoints.is_dir():
            return []
        saved = [p for p in self.checkpoints.iterdir() if not p.is_symlink() and backend_of_checkpoint(p)]
        return sorted(saved, key=step_of)

    def drop_checkpoints_after(self, step: int) -> None:
        """On resume, delete checkpoints newer than `latest` (a killed run's): their steps are trained again."""
        if is_main_process():
            for path in self.saved_checkpoints():
                if step_of(path) > step:
                    shutil.rmtree(path)

    def prune_checkpoints(self, keep: int) -> None:
        """Delete all but the newest `keep` checkpoints (never the one `latest` points at)."""
        if is_main_process():
            saved = self.saved_checkpoints()
            for old in saved[: max(0, len(saved) - keep)]:
                if old != self.latest_checkpoint():
                    shutil.rmtree(old)

    # -- metrics -------------------------------------------------------------------------------
    def append_eval_result(self, metrics: dict[str, Any]) -> None:
        """Add one evaluation's metrics line (the file is rewritten atomically, so a kill never tears a line)."""
        write_jsonl_atomic(self.eval_results, read_jsonl(self.eval_results) + [metrics])

    def drop_metrics_after(self, step: int) -> None:
        """On resume, forget evaluations and matrix rows newer than the checkpoint: recomputed, never duplicated."""
        if is_main_process():
            for path in (self.eval_results, self.stage_matrix):
                if path.exists():
                    write_jsonl_atomic(path, [m for m in read_jsonl(path) if m["step"] <= step])

    def details_path(self, qa_set: str, step: int) -> Path:
        """The eval_details file of a QA set's evaluation at `step`."""
        return self.eval_details / f"{qa_set}_step_{step:06d}.jsonl"

    @staticmethod
    def details_set(details: Path) -> str | None:
        """The QA set a details file's name says (details_path's), None for a file named otherwise."""
        match = re.fullmatch(r"(.+)_step_\d+", details.stem)
        return match[1] if match else None
