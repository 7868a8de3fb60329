"""Where a relative path of the config points: the working directory first, then the project (the checkout holding
conf/ and cbe/), so the files that ship with cbe (the sample tracks, conf/prompts/, the tiny model's tokenizer) are
found from any directory while a user's own files keep their usual meaning. cbe.config.validate applies it to inputs."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def resolve_path(path: str) -> str:
    """`path` as typed when it is absolute or names something in the working directory, else the project's path
    of it (absolute) when the project has it, else as typed (a hub id, or a missing file named as the user wrote it)."""
    if Path(path).is_absolute() or Path(path).exists() or not (PROJECT_ROOT / path).exists():
        return path
    return str(PROJECT_ROOT / path)


def same_path(a: str, b: str) -> bool:
    """Whether two config values are equal or name the same file by this rule: `data/sample/train.jsonl` typed in
    the project and the absolute path it resolves to from another directory are one file."""
    if a == b:
        return True
    a, b = resolve_path(a), resolve_path(b)
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
