"""The KD backend as several JAX processes (cbe.backends.kd.processes), launched directly with JAX's variables: two
processes of two CPU devices each train and evaluate as one process of four devices does. No torch: this runs in the
JAX environment too."""

import os
import socket
import subprocess

import pytest

from tests.conftest import ROOT, main_command, run_main_under
from tests.results import assert_same_metrics, eval_results, raw_predictions

pytestmark = [pytest.mark.kd, pytest.mark.slow]

# 2 steps (the second updates from Adam's moments), evaluated at 0 and 2 and saved at 2; 8 rows a step, 2 a device,
# so one micro-batch over the 4 devices either way; every array sharded (FSDP over both processes' devices).
RUN = [
    "backend=kd",
    "training.num_train_steps=2",
    "training.eval_every=2",
    "training.save_every=2",
    "training.per_device_batch_size=2",
    "backend.trainer.fsdp_min_size_mb=0",
    "eval.max_questions=4",
    "logging=none",
]
TIMEOUT = 600  # a quiet run of each takes about a minute here; the machine may be shared


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(devices: int, cache_dir) -> dict[str, str]:
    """A run on `devices` forced CPU devices, with no launcher's variables of its own (cbe.ranks reads them first)."""
    launcher = ("RANK", "WORLD_SIZE", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith("SLURM_")}
    return env | {
        "CBE_CACHE_DIR": str(cache_dir),
        "TOKENIZERS_PARALLELISM": "false",
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }


def start_process(rank: int, port: int, output_root, cache_dir) -> subprocess.Popen:
    """One of two processes of a run, as a launcher would start it on this host."""
    env = cpu_env(2, cache_dir) | {
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": str(rank),
    }
    command = main_command(f"output_root={output_root}", *RUN)
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_processes_train_and_evaluate_as_one(tmp_path, cache_dir):
    port = free_port()
    # The pair starts first; the reference (one process, four devices) runs beside it (this machine has few cores).
    pair = [start_process(rank, port, tmp_path / "two", cache_dir) for rank in (0, 1)]
    try:
        run_main_under(tmp_path / "one", cache_dir, *RUN, timeout=TIMEOUT, env=cpu_env(4, cache_dir))
        logs = [p.communicate(timeout=TIMEOUT)[0] for p in pair]
    finally:
        for p in pair:
            p.kill()
    for rank, (p, log) in enumerate(zip(pair, logs)):
        assert p.returncode == 0, f"process {rank} failed ({p.returncode}):\n{log[-5000:]}"
        # jax.distributed joined them: FSDP spans both processes' devices.
        assert "arrays sharded over 4 device(s) (FSDP), accumulation 1" in log, log[-3000:]

    one, two = (tmp_path / name / "cbe" / "sample" / "tiny-full-kd" for name in ("one", "two"))
    # Process 0 alone wrote the run dir's metrics and printed them: each evaluation once.
    assert [r["step"] for r in eval_results(two)] == [0, 2]
    assert "eval | step 2" in logs[0] and "eval | step" not in logs[1]
    for a, b in zip(eval_results(one), eval_results(two)):
        assert_same_metrics(a, b)  # eval losses within rel 1e-5, every QA metric equal
    for qa_set in ("valqa", "testqa"):
        assert raw_predictions(two, qa_set, 2) == raw_predictions(one, qa_set, 2)
    # orbax wrote the checkpoint from both processes, and it is complete.
    assert (two / "checkpoints" / "latest").resolve() == two / "checkpoints" / "ckpt_2"
    assert (two / "checkpoints" / "ckpt_2" / "_CHECKPOINT_METADATA").is_file()
