"""Shared fixtures: the repo root, a shared token/model cache, and running main.py as a user does."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Tokenized corpora and converted models, shared by the whole session (CBE_CACHE_DIR reuses one)."""
    return Path(os.environ.get("CBE_CACHE_DIR") or tmp_path_factory.mktemp("cache"))


def main_command(*overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "main.py"), *overrides]


@pytest.fixture
def run_main(tmp_path, cache_dir):
    """Run `python main.py overrides...` from the repo root with outputs under tmp_path."""
    def run(*overrides: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        env = {**os.environ, "CBE_CACHE_DIR": str(cache_dir), "TOKENIZERS_PARALLELISM": "false"}
        flags = [o for o in overrides if o.startswith("-")]  # Hydra wants -m and friends before the overrides
        overrides = [f"output_root={tmp_path / 'outputs'}", *(o for o in overrides if not o.startswith("-"))]
        proc = subprocess.run(main_command(*flags, *overrides), cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"main.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return proc
    return run
