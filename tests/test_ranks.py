"""cbe.ranks: which process of a job this is, from the variables its launcher sets (SLURM's, torchrun's, JAX's).

The SLURM environments below are written from SLURM's documented variables and formats (srun(1), sbatch(1)), as
a task of an `srun` step sees them; tests/slurm runs the real thing.
"""

import os

import pytest

from cbe.ranks import ALONE, adopt_slurm_ranks, first_host, rendezvous, slurm_rendezvous

# Task 5 of an 8-task step over two nodes with 4 tasks each (sbatch --nodes=2 --ntasks-per-node=4, then srun): the
# second task on the second node.
TWO_NODES = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_STEP_NODELIST": "gpu[07-08]",
    "SLURM_NNODES": "2",
    "SLURM_NTASKS": "8",
    "SLURM_NTASKS_PER_NODE": "4",
    "SLURM_TASKS_PER_NODE": "4(x2)",
    "SLURM_STEP_ID": "0",
    "SLURM_STEPID": "0",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_NUM_TASKS": "8",
    "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
    "SLURM_NODEID": "1",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURMD_NODENAME": "gpu08",
}

# The batch script of that job (sbatch runs it on the first node, outside any step): no SLURM_STEP_* variables,
# while SLURM_NTASKS says 8 and SLURM_PROCID 0.
BATCH_SCRIPT = {k: v for k, v in TWO_NODES.items() if not k.startswith("SLURM_STEP")} | {
    "SLURM_NODEID": "0",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURMD_NODENAME": "gpu07",
}

TORCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def task(procid: int, localid: int, nodeid: int, **changes: str) -> dict[str, str]:
    return (
        TWO_NODES | {"SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid), "SLURM_NODEID": str(nodeid)} | changes
    )


def test_a_task_of_a_two_node_slurm_step_finds_its_place():
    r = rendezvous(TWO_NODES)
    assert (r.address, r.world_size, r.rank, r.local_rank, r.local_world_size) == ("gpu07", 8, 5, 1, 4)
    assert r.coordinator == f"gpu07:{r.port}"
    assert 1024 < r.port < 65536


def test_every_task_of_a_job_meets_at_one_port_and_another_job_at_another():
    ports = {rendezvous(task(rank, rank % 4, rank // 4)).port for rank in range(8)}
    assert len(ports) == 1
    assert rendezvous(task(0, 0, 0, SLURM_JOB_ID="4243")).port not in ports
    # Any job id SLURM hands out gives a port a process may listen on.
    assert all(1024 < rendezvous(TWO_NODES | {"SLURM_JOB_ID": str(j)}).port < 65536 for j in (1, 65535, 987654321))


def test_every_task_of_a_job_agrees_on_the_coordinator_and_the_world():
    places = [rendezvous(task(rank, rank % 4, rank // 4)) for rank in range(8)]
    assert {(p.address, p.port, p.world_size, p.local_world_size) for p in places} == {("gpu07", places[0].port, 8, 4)}
    assert [(p.rank, p.local_rank) for p in places] == [(r, r % 4) for r in range(8)]


def test_the_job_node_list_serves_where_the_step_one_is_missing():
    env = {k: v for k, v in TWO_NODES.items() if k != "SLURM_STEP_NODELIST"}
    assert rendezvous(env).address == "gpu07"


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("gpu07", "gpu07"),
        ("gpu[07-08]", "gpu07"),
        ("node[1-3]", "node1"),
        ("tux[2,5-7]", "tux2"),
        ("n[009-010,012]", "n009"),  # zero padding is part of the name
        ("gpu[07-08,12],cpu3", "gpu07"),
        ("cpu3,gpu[07-08]", "cpu3"),
        ("a1,b2", "a1"),
        ("login-node", "login-node"),
        ("rack-a[1-2]", "rack-a1"),
        ("127.0.0.[1-2]", "127.0.0.1"),  # tests/slurm's two nodes
    ],
)
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert first_host(nodelist) == first


def test_torchrun_variables():
    env = {
        "MASTER_ADDR": "10.0.0.3",
        "MASTER_PORT": "29500",
        "WORLD_SIZE": "16",
        "RANK": "9",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "8",
    }
    r = rendezvous(env)
    assert (r.coordinator, r.world_size, r.rank, r.local_rank, r.local_world_size) == ("10.0.0.3:29500", 16, 9, 1, 8)
    assert r.torch_variables() == env


def test_torchrun_inside_a_slurm_step_wins():
    """`srun --ntasks-per-node=1 torchrun --nproc_per_node=4 ...`: torchrun's processes carry the step's SLURM
    variables too, and torchrun's own say which process this is."""
    env = TWO_NODES | {"MASTER_ADDR": "gpu07", "MASTER_PORT": "29500", "WORLD_SIZE": "8", "RANK": "6"}
    env |= {"LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4"}
    r = rendezvous(env)
    assert (r.port, r.rank, r.local_rank) == (29500, 6, 2)


def test_explicit_jax_variables():
    env = {
        "JAX_COORDINATOR_ADDRESS": "10.0.0.3:1234",
        "JAX_NUM_PROCESSES": "4",
        "JAX_PROCESS_ID": "3",
        "JAX_LOCAL_PROCESS_ID": "1",
        "JAX_LOCAL_PROCESS_COUNT": "2",
    }
    r = rendezvous(env)
    assert (r.address, r.port, r.world_size, r.rank, r.local_rank, r.local_world_size) == ("10.0.0.3", 1234, 4, 3, 1, 2)
    # Without the local ones: one process per host.
    r = rendezvous({k: v for k, v in env.items() if "LOCAL" not in k})
    assert (r.rank, r.local_rank, r.local_world_size) == (3, 0, 1)


@pytest.mark.parametrize(
    "env",
    [
        {},
        BATCH_SCRIPT,  # `python main.py` straight from a batch script of 8 tasks: one process, not rank 0 of 8
        {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu07", "SLURM_NTASKS": "1"},  # sbatch of one task
        task(0, 0, 0, SLURM_STEP_NUM_TASKS="1", SLURM_NTASKS="1", SLURM_STEP_TASKS_PER_NODE="1"),  # srun -n1
    ],
    ids=["nothing", "batch-script", "one-task-job", "one-task-step"],
)
def test_alone(env):
    assert rendezvous(env) == ALONE
    assert (ALONE.world_size, ALONE.rank, ALONE.local_rank, ALONE.local_world_size) == (1, 0, 0, 1)


def test_a_one_task_step_that_keeps_the_jobs_variables_is_alone():
    """`srun --preserve-env -n1 python main.py` in a job of 8 tasks: srun keeps the job's SLURM_NTASKS (8; seen on
    tests/slurm's cluster) while the step has one task (SLURM_STEP_NUM_TASKS=1)."""
    env = task(0, 0, 0, SLURM_STEP_NUM_TASKS="1", SLURM_STEP_TASKS_PER_NODE="1", SLURM_STEP_NODELIST="gpu07")
    assert rendezvous(env) == ALONE


def test_local_world_size_is_that_of_this_tasks_node():
    """SLURM_STEP_TASKS_PER_NODE=2(x3),1 (srun -n7 over 4 nodes): the fourth node's one task is alone there."""
    env = TWO_NODES | {"SLURM_NTASKS": "7", "SLURM_STEP_NUM_TASKS": "7", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1"}
    env |= {"SLURM_STEP_NODELIST": "gpu[07-10]", "SLURM_JOB_NODELIST": "gpu[07-10]"}
    assert rendezvous(env | {"SLURM_NODEID": "0", "SLURM_PROCID": "1", "SLURM_LOCALID": "1"}).local_world_size == 2
    assert rendezvous(env | {"SLURM_NODEID": "3", "SLURM_PROCID": "6", "SLURM_LOCALID": "0"}).local_world_size == 1


@pytest.fixture
def environ(monkeypatch):
    """os.environ without any launcher's variables, put back as it was after the test, including what
    adopt_slurm_ranks sets there (monkeypatch restores only the names it has touched: touch them all first)."""
    for name in [*TORCH_VARIABLES, *TWO_NODES, *(k for k in os.environ if k.startswith(("SLURM_", "JAX_")))]:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return monkeypatch


def test_adopt_slurm_ranks_in_a_step_of_several_tasks_sets_torchs_variables(environ):
    for name, value in TWO_NODES.items():
        environ.setenv(name, value)
    adopt_slurm_ranks()
    port = os.environ["MASTER_PORT"]
    assert {name: os.environ[name] for name in TORCH_VARIABLES} == {
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": port,
        "WORLD_SIZE": "8",
        "RANK": "5",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
    }
    assert rendezvous() == slurm_rendezvous(TWO_NODES)  # read back through torch's variables: the same place


@pytest.mark.parametrize(
    "env",
    [BATCH_SCRIPT, task(0, 0, 0, SLURM_STEP_NUM_TASKS="1", SLURM_NTASKS="1", SLURM_STEP_TASKS_PER_NODE="1"), {}],
    ids=["batch-script", "one-task-step", "no-slurm"],
)
def test_adopt_slurm_ranks_leaves_one_process_alone(environ, env):
    for name, value in env.items():
        environ.setenv(name, value)
    adopt_slurm_ranks()
    assert {name: os.environ[name] for name in TORCH_VARIABLES if name in os.environ} == {}
    assert rendezvous() == ALONE


def test_adopt_slurm_ranks_leaves_torchruns_variables_alone(environ):
    torchrun = {"MASTER_ADDR": "gpu07", "MASTER_PORT": "29500", "WORLD_SIZE": "8", "RANK": "6", "LOCAL_RANK": "2"}
    for name, value in (TWO_NODES | torchrun).items():
        environ.setenv(name, value)
    adopt_slurm_ranks()
    assert {name: os.environ[name] for name in torchrun} == torchrun
