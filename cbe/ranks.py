"""Which process of a job this is: the rendezvous of a run's processes (coordinator address and port, world size,
rank, local rank), read in one place from whichever launcher started them. Both backends ask `rendezvous()`.

- torchrun: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT (as it sets them).
- SLURM (one rank per task of a job step, srun's, over every node of the job, e.g. hydra-submitit-launcher's
  nodes x tasks_per_node): SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, SLURM_NODEID and
  SLURM_STEP_TASKS_PER_NODE; the coordinator is the step's first node (SLURM_STEP_NODELIST) on a port drawn from
  SLURM_JOB_ID, so every task computes the same one and two jobs on one node do not collide. Only a step's tasks
  have SLURM_STEP_* variables: a batch script that runs `python main.py` itself is one process, whatever
  SLURM_NTASKS says (srun --preserve-env keeps the job's SLURM_NTASKS in a step of one task, too).
- Explicit, for several JAX processes started by hand: JAX_COORDINATOR_ADDRESS (host:port, JAX's own variable),
  JAX_NUM_PROCESSES, JAX_PROCESS_ID and optionally JAX_LOCAL_PROCESS_ID / JAX_LOCAL_PROCESS_COUNT.
- Anything else: one process.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

PORT_BASE, PORT_RANGE = 20000, 20000  # SLURM jobs' coordinator ports: PORT_BASE + job id mod PORT_RANGE


@dataclass(frozen=True)
class Rendezvous:
    address: str  # where rank 0 listens
    port: int
    world_size: int
    rank: int
    local_rank: int  # among this node's processes: which of its GPUs this process takes
    local_world_size: int

    @property
    def coordinator(self) -> str:
        return f"{self.address}:{self.port}"

    def torch_variables(self) -> dict[str, str]:
        """The variables torch.distributed's env:// init (and cbe's rank-0 guard) read, as torchrun sets them."""
        values = {
            "MASTER_ADDR": self.address,
            "MASTER_PORT": self.port,
            "WORLD_SIZE": self.world_size,
            "RANK": self.rank,
            "LOCAL_RANK": self.local_rank,
            "LOCAL_WORLD_SIZE": self.local_world_size,
        }
        return {k: str(v) for k, v in values.items()}


ALONE = Rendezvous("127.0.0.1", 0, 1, 0, 0, 1)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[07-08,12],cpu3" -> "gpu07" (zero padding kept)."""
    match = re.match(r"([^,\[]+)(?:\[([^\],-]+))?", nodelist.strip())
    if not match:
        raise ValueError(f"not a SLURM node list: {nodelist!r}")
    return match.group(1) + (match.group(2) or "")


def tasks_on_node(tasks_per_node: str, node: int) -> int:
    """The tasks on the `node`-th node of a SLURM tasks-per-node list: "2(x3),1" is 2, 2, 2, 1."""
    counts = []
    for count, repeat in re.findall(r"(\d+)(?:\(x(\d+)\))?", tasks_per_node):
        counts += [int(count)] * int(repeat or 1)
    return counts[node]


def slurm_rendezvous(env: Mapping[str, str]) -> Rendezvous:
    world = int(env["SLURM_STEP_NUM_TASKS"])
    nodes = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or str(world)
    return Rendezvous(
        address=first_host(nodes),
        port=PORT_BASE + int(env["SLURM_JOB_ID"]) % PORT_RANGE,
        world_size=world,
        rank=int(env["SLURM_PROCID"]),
        local_rank=int(env.get("SLURM_LOCALID", "0")),
        local_world_size=tasks_on_node(per_node, int(env.get("SLURM_NODEID", "0"))),
    )


def in_slurm_step_of_several_tasks(env: Mapping[str, str]) -> bool:
    return int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1


def rendezvous(env: Mapping[str, str] | None = None) -> Rendezvous:
    """This process's place in its job, from the launcher's variables (the module's docstring lists them)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, or SLURM's already adopted by `adopt_slurm_ranks`
        world = int(env["WORLD_SIZE"])
        return Rendezvous(
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", "0")),
            world,
            int(env["RANK"]),
            int(env.get("LOCAL_RANK", "0")),
            int(env.get("LOCAL_WORLD_SIZE", str(world))),
        )
    if in_slurm_step_of_several_tasks(env):
        return slurm_rendezvous(env)
    if "JAX_NUM_PROCESSES" in env:
        address, port = env["JAX_COORDINATOR_ADDRESS"].rsplit(":", 1)
        world = int(env["JAX_NUM_PROCESSES"])
        return Rendezvous(
            address,
            int(port),
            world,
            int(env["JAX_PROCESS_ID"]),
            int(env.get("JAX_LOCAL_PROCESS_ID", "0")),
            int(env.get("JAX_LOCAL_PROCESS_COUNT", "1")),
        )
    return ALONE


def adopt_slurm_ranks() -> None:
    """In a SLURM job step of several tasks, set torch.distributed's variables as torchrun would (main.py calls
    this first): from here on every part of cbe reads one kind of variable."""
    if "RANK" not in os.environ and in_slurm_step_of_several_tasks(os.environ):
        os.environ.update(slurm_rendezvous(os.environ).torch_variables())


def world_size() -> int:
    """Number of processes in this job."""
    return rendezvous().world_size


def is_main_process() -> bool:
    """True on the process that writes: rank 0 under torchrun, SLURM, JAX's variables, or alone."""
    return rendezvous().rank == 0
