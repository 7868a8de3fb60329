"""Shared fixtures: the repo root, a shared token/model cache, and running main.py as a user does; and which tests
the JAX environment collects."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The tests marked kd test the KD backend on its own; make test-jax-env runs them in the JAX environment, which has
# no torch (make test leaves them to it). They live in these modules, which import no torch; the other modules do,
# so there they are not collected.
KD_MODULES = {
    "tests/backends/kd/test_kd_backend.py",
    "tests/backends/kd/test_kd_processes.py",
    "tests/backends/kd/test_generate.py",
    "tests/backends/kd/test_gguf_without_torch.py",
    "tests/backends/kd/test_lora_init.py",
    "tests/test_loop.py",
    "tests/test_continual_runs.py",
}
WITHOUT_TORCH = importlib.util.find_spec("torch") is None


def pytest_ignore_collect(collection_path: Path, config) -> bool | None:
    if WITHOUT_TORCH and collection_path.is_file() and collection_path.name.startswith("test_"):
        return str(collection_path.relative_to(ROOT)) not in KD_MODULES
    return None


def pytest_collection_modifyitems(config, items) -> None:
    """A kd test outside KD_MODULES would silently not run in the JAX environment: refuse it."""
    stray = {str(item.path.relative_to(ROOT)) for item in items if item.get_closest_marker("kd")} - KD_MODULES
    if stray:
        raise pytest.UsageError(f"tests marked kd outside conftest.KD_MODULES: {', '.join(sorted(stray))}")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Tokenized corpora and converted models, shared by the whole session (CBE_CACHE_DIR reuses one)."""
    return Path(os.environ.get("CBE_CACHE_DIR") or tmp_path_factory.mktemp("cache"))


def loop_in_process(run_dir: Path, *overrides: str, on_start=None):
    """The run main.py wires for these overrides (its loggers included), wired in this process around a run dir at
    `run_dir`; `on_start(backend)` runs once the backend has built its model, before the first evaluation, so a test
    can reach the model. In-process runs skip a new process's imports (most of a tiny run's time)."""
    from hydra.utils import instantiate

    from cbe.config import validate
    from cbe.logging import Loggers
    from cbe.loop import Loop, build
    from cbe.run import RunDir
    from tests.test_config import compose_config

    cfg = validate(compose_config(*overrides))
    run = RunDir(run_dir).create(cfg)
    loggers = Loggers(run, [instantiate(spec, run=run) for spec in cfg.logging.loggers.values()])
    loop = Loop(cfg, run, *build(cfg, run), loggers)
    if on_start:
        start = loop.backend.start
        loop.backend.start = lambda checkpoint: (start(checkpoint), on_start(loop.backend))
    return loop


def main_command(*overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "main.py"), *overrides]


def run_main_under(
    output_root: Path,
    cache_dir: Path,
    *overrides: str,
    check: bool = True,
    timeout: float = 600,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run `python main.py overrides...` from the repo root with outputs under output_root (`env` adds variables)."""
    env = {**os.environ, "CBE_CACHE_DIR": str(cache_dir), "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    flags = [o for o in overrides if o.startswith("-")]  # Hydra wants -m and friends before the overrides
    overrides = [f"output_root={output_root}", *(o for o in overrides if not o.startswith("-"))]
    proc = subprocess.run(
        main_command(*flags, *overrides), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"main.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture
def run_main(tmp_path, cache_dir):
    """Run `python main.py overrides...` from the repo root with outputs under tmp_path."""

    def run(
        *overrides: str, check: bool = True, timeout: float = 600, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        return run_main_under(tmp_path / "outputs", cache_dir, *overrides, check=check, timeout=timeout, env=env)

    return run


# Secrets a run's environment may hold; none may reach its run dir (config, logs, W&B files).
FAKE_SECRETS = {"WANDB_API_KEY": "0123456789abcdef-fake-wandb-key-42", "HF_TOKEN": "hf_fakeTokenForTests0123456789"}


@pytest.fixture(scope="session")
def tiny_wandb_run(tmp_path_factory, cache_dir) -> Path:
    """One real tiny training run (4 steps, evaluated every 2) logged to TensorBoard and W&B (offline), with
    secrets in its environment. Shared by the plot, W&B and logger tests: the only real run they need."""
    output_root = tmp_path_factory.mktemp("wandb_run")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", **FAKE_SECRETS}
    run_main_under(
        output_root,
        cache_dir,
        "logging=tensorboard_wandb",
        "logging.project_name=cbe-test",
        "logging.run_name=sample/tiny",
        "training.num_train_steps=4",
        "training.eval_every=2",
        "eval.max_questions=4",
        "logging.log_every_n_steps=1",
        env=env,
        timeout=300,
    )
    return output_root / "cbe-test" / "sample" / "tiny"


HUB_TOKEN = "hf_standin_write_token"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The stand-in, that wants HUB_TOKEN for writes; huggingface_hub in this process pointed at it with HF_TOKEN."""
    from huggingface_hub import constants

    from tests.hub_standin import HubStandIn

    with HubStandIn({}, token=HUB_TOKEN) as hub:
        # huggingface_hub reads HF_ENDPOINT (and the rest) once, at import: point this process's copy at the stand-in.
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))  # no `hf auth login` token
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        # LFS, huggingface_hub's protocol without hf_xet; the Xet test turns Xet back on.
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setenv("HF_XET_CACHE", str(tmp_path / "xet"))  # hf_xet's chunk and shard caches
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
        yield hub
