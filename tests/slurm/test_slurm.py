"""Sweeps through hydra/launcher=submitit_slurm on a real two-node SLURM cluster (`make test-slurm`).

tests/slurm/cluster.sh starts the cluster and sets SLURM_CONF; `make test` deselects these tests.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.results import eval_results

pytestmark = pytest.mark.slurm

# The test cluster has CPUs and no GPUs; one thread per job keeps two jobs from fighting over two cores.
LAUNCHER = [
    "hydra/launcher=submitit_slurm",
    "hydra.launcher.partition=debug",
    "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=null",
    "hydra.launcher.setup=['export OMP_NUM_THREADS=1']",
]


def eval_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics" / "eval_results.jsonl").read_text().splitlines()]


SWEEPS: list[subprocess.Popen] = []


@pytest.fixture(autouse=True, scope="module")
def stop_sweeps_left_running():
    """A failed test leaves its submitting command waiting on the cluster; stop it with the tests."""
    yield
    for proc in SWEEPS:
        proc.kill()


def start_sweep(tmp_path: Path, cache_dir: Path, *overrides: str) -> subprocess.Popen:
    """`python main.py -m` on the cluster in the background; its output goes to tmp_path/sweep.out."""
    assert "SLURM_CONF" in os.environ, "run these tests through `make test-slurm` (tests/slurm/cluster.sh)"
    env = {**os.environ, "CBE_CACHE_DIR": str(cache_dir)}
    with open(tmp_path / "sweep.out", "w") as out:
        SWEEPS.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "main.py"),
                    "-m",
                    f"output_root={tmp_path / 'outputs'}",
                    *LAUNCHER,
                    "logging=none",
                    "eval.max_questions=8",
                    *overrides,
                ],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        )
    return SWEEPS[-1]


def finish(proc: subprocess.Popen, tmp_path: Path, timeout: float) -> str:
    proc.wait(timeout=timeout)
    output = (tmp_path / "sweep.out").read_text()
    assert proc.returncode == 0, output[-5000:]
    return output


STEPS = ["training.num_train_steps=4", "training.eval_every=2", "training.save_every=4"]


@pytest.fixture(scope="module")
def grid(tmp_path_factory, cache_dir) -> tuple[Path, str]:
    """The 2 x 2 lr x batch sweep through SLURM: its folder and what the submitting command printed."""
    tmp_path = tmp_path_factory.mktemp("grid")
    proc = start_sweep(
        tmp_path,
        cache_dir,
        "logging.run_name=grid",
        "optimizer.lr=1e-3,3e-3",
        "training.effective_batch_size=8,16",
        *STEPS,
    )
    return tmp_path / "outputs" / "cbe" / "grid", finish(proc, tmp_path, timeout=900)


def test_lr_by_batch_sweep_runs_as_a_slurm_array(grid):
    sweep, output = grid
    jobs = sorted(p.name for p in sweep.iterdir() if not p.name.startswith((".", "sweep_summary", "multirun")))
    assert jobs == sorted(
        f"eval.max_questions=8,optimizer.lr={lr},training.effective_batch_size={bs},"
        "training.eval_every=2,training.num_train_steps=4,training.save_every=4"
        for lr in ("0.001", "0.003")
        for bs in (8, 16)
    )
    for job in jobs:
        assert eval_steps(sweep / job) == [0, 2, 4]
        assert (sweep / job / "checkpoints" / "latest").resolve().name == "checkpoint-4"
    # One array: every job's SLURM log sits under .submitit/<array id>_<index>.
    arrays = {re.sub(r"_\d+$", "", p.name) for p in (sweep / ".submitit").iterdir() if re.search(r"_\d+$", p.name)}
    assert len(arrays) == 1
    summary = [json.loads(line) for line in (sweep / "sweep_summary.jsonl").read_text().splitlines()]
    assert [s["job"] for s in summary] == jobs and all(s["last_step"] == 4 for s in summary)
    assert "sweep summary:" in output and "optimizer.lr=0.003 training.effective_batch_size=16" in output


def test_a_job_of_two_nodes_trains_as_two_ranks_of_one_run(grid, tmp_path, cache_dir):
    """nodes=2, one task each: the two SLURM tasks become torch.distributed ranks (gloo here) of one run, meeting over
    the network at the first node (cluster.sh's two nodes are two slurmd daemons on this machine, named by their
    addresses 127.0.0.1 and 127.0.0.2); rank 0 alone writes, and the result equals the grid's one-process job with
    the same effective batch (lr 1e-3, batch 8). (Two tasks on one node: the KD job below.)"""
    # A task prolog (srun reads SLURM_TASK_PROLOG) prints each task's node into the task's own log.
    prolog = tmp_path / "prolog.sh"
    prolog.write_text('#!/bin/sh\necho "print ran on node $SLURMD_NODENAME"\n')
    prolog.chmod(0o755)
    proc = start_sweep(
        tmp_path,
        cache_dir,
        "logging.run_name=ranks",
        "hydra.launcher.nodes=2",
        "hydra.launcher.tasks_per_node=1",
        f"hydra.launcher.setup=['export OMP_NUM_THREADS=1','export SLURM_TASK_PROLOG={prolog}']",
        "optimizer.lr=1e-3",
        "training.effective_batch_size=8",
        "training.per_device_batch_size=4",
        *STEPS,
    )
    finish(proc, tmp_path, timeout=600)
    [ranks] = [p for p in (tmp_path / "outputs" / "cbe" / "ranks").iterdir() if (p / "metrics").exists()]
    logs = sorted((ranks.parent / ".submitit").glob("*/*_log.out"))
    nodes = [re.search(r"^ran on node (\S+)$", log.read_text(), re.M).group(1) for log in logs]
    assert sorted(nodes) == ["127.0.0.1", "127.0.0.2"]  # two tasks ran, one on each node
    assert eval_steps(ranks) == [0, 2, 4]  # one writer: no line twice
    assert (ranks / "logs" / "train.log").read_text().count("eval | step 4") == 1
    for a, b in zip(eval_results(ranks), eval_results(one_process_job(grid)), strict=True):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-5)
        assert a["valqa_exact_match"] == b["valqa_exact_match"]


def one_process_job(grid) -> Path:
    """The grid's job with lr 1e-3 and batch 8: one process."""
    return grid[0] / (
        "eval.max_questions=8,optimizer.lr=0.001,training.effective_batch_size=8,training.eval_every=2,"
        "training.num_train_steps=4,training.save_every=4"
    )


def test_a_kd_job_of_two_tasks_trains_as_two_jax_processes_of_one_run(grid, tmp_path, cache_dir):
    """backend=kd, tasks_per_node=2: the two tasks join one run through jax.distributed (the rendezvous from SLURM's
    variables, gloo between the CPUs), FSDP spans both processes' devices, process 0 alone writes, and the run
    equals the grid's one-process HF job (the backends agree to rel 1e-4 on the tiny model in fp32:
    tests/backends/kd/test_kd_trainer.py; one KD process against two: tests/backends/kd/test_kd_processes.py)."""
    proc = start_sweep(
        tmp_path,
        cache_dir,
        "logging.run_name=kd",
        "hydra.launcher.tasks_per_node=2",
        "backend=kd",
        "backend.trainer.fsdp_min_size_mb=0",  # shard every array of the tiny model
        "optimizer.lr=1e-3",
        "training.effective_batch_size=8",
        "training.per_device_batch_size=4",
        *STEPS,
    )
    finish(proc, tmp_path, timeout=900)
    [two] = [p for p in (tmp_path / "outputs" / "cbe" / "kd").iterdir() if (p / "metrics").exists()]
    assert len(list((two.parent / ".submitit").glob("*/*_log.out"))) == 2  # two tasks ran
    log = (two / "logs" / "train.log").read_text()
    assert "arrays sharded over 2 device(s) (FSDP), accumulation 1" in log and log.count("eval | step 4") == 1
    assert eval_steps(two) == [0, 2, 4]
    for a, b in zip(eval_results(two), eval_results(one_process_job(grid)), strict=True):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-4)
    assert eval_results(two)[-1]["eval_loss"] < eval_results(two)[0]["eval_loss"] - 0.5  # and it trained
    assert (two / "checkpoints" / "latest").resolve().name == "ckpt_4"


def submitit_logs(sweep: Path) -> str:
    return "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_log.out"))


def job_state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def wait_for(condition, what: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the sweep ended while waiting for {what}"
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.5)


def test_a_job_killed_by_its_time_limit_is_requeued_and_resumes(tmp_path, cache_dir):
    """Lowering a running job's time limit makes SLURM signal it; submitit requeues it and the run (a continual one:
    3 stages of 70 steps) resumes from `latest`, not from step 0, and ends with every evaluation and every row of
    its accuracy matrix exactly once."""
    proc = start_sweep(
        tmp_path,
        cache_dir,
        "logging.run_name=requeue",
        "optimizer.lr=3e-3",
        "hydra.launcher.timeout_min=10",
        "hydra.launcher.max_num_timeout=3",
        "task=sample_stages",
        "continual.steps_per_stage=70",
        # Slower steps than the demo's 4: still running when SLURM signals (slurmctld checks limits every 30 s; the
        # 200 steps after the first checkpoint take over a minute). On one thread, LAUNCHER's, as the other jobs:
        # two threads (cpus_per_task=2) beside another busy process took 4 times the CPU (436 s against 103 s).
        "training.effective_batch_size=8",
        "training.per_device_batch_size=8",
        "training.eval_every=50",
        "training.save_every=10",
    )
    sweep = tmp_path / "outputs" / "cbe" / "requeue"
    wait_for(lambda: list(sweep.glob("*/checkpoints/latest")), "first checkpoint", proc)
    run = next(sweep.glob("*/checkpoints/latest")).parents[1]
    job_id = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout.split()[0]
    # A 1-minute limit: slurmctld finds it exhausted at its next check (every 30 s) and signals the job.
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=1"], check=True)
    wait_for(lambda: "Requeued job" in submitit_logs(sweep), "requeue", proc, timeout=120)
    # SLURM holds a requeued job back for minutes (Reason=BeginTime); once it is pending, start it now, with
    # time to finish.
    wait_for(lambda: job_state(job_id) == "PENDING", "pending requeued job", proc, timeout=60)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now", "TimeLimit=20"], check=True)
    finish(proc, tmp_path, timeout=600)

    log = (run / "logs" / "train.log").read_text()
    resumed_from = int(re.search(r"resuming from \S*checkpoint-(\d+)", log).group(1))
    assert 10 <= resumed_from < 210
    # Every evaluation once, none lost, none repeated: the cadence's and each stage's end (70, 140, 210).
    assert eval_steps(run) == [0, 50, 70, 100, 140, 150, 200, 210]
    matrix = [json.loads(line) for line in (run / "metrics" / "stage_matrix.jsonl").read_text().splitlines()]
    assert sorted({(r["after_stage"], r["step"]) for r in matrix}) == [(0, 0), (1, 70), (2, 140), (3, 210)]
    assert len(matrix) == 4 * 3 * 2 * 4  # after-stages x stages x sets x metrics, each once
    assert (run / "checkpoints" / "latest").resolve().name == "checkpoint-210"
