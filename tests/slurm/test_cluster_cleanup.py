"""tests/slurm/cluster.sh stops its cluster's jobs with it: no job step outlives the script (`make test-slurm`).

The test starts a second cluster.sh beside the one the SLURM tests run on, and checks that the first is left alone.
"""

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slurm

# Run on the second cluster: a job whose step would sleep ten minutes; once the step runs, say which cluster this
# is and wait for the test to close stdin, leaving the step running when the command ends.
SUBMIT_A_LONG_STEP = """
sbatch --quiet --output=/dev/null --wrap 'srun sleep 600'
for _ in $(seq 150); do squeue -h -s -o %i | grep -q '\\.0$' && break; sleep 0.2; done
echo "$SLURM_CONF"
read -r _ || true
"""


def processes_of(conf: str) -> dict[int, str]:
    """pid -> name of every live process that mentions conf's folder in its environment or command line."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(Path(conf).parent).encode() in (proc / "environ").read_bytes() + (proc / "cmdline").read_bytes():
                found[int(proc.name)] = (proc / "comm").read_text().strip()
        except OSError:  # it ended meanwhile
            pass
    return found


def step_running(conf: str) -> dict[int, str]:
    """processes_of(conf) once the job step's `sleep` runs: squeue lists a step before slurmstepd has started its
    task, and on a loaded machine that can take a while (waits up to 5 minutes for that state)."""
    deadline = time.monotonic() + 300
    while "sleep" not in (running := processes_of(conf)).values() and time.monotonic() < deadline:
        time.sleep(0.2)
    return running


def test_a_job_step_still_running_ends_with_its_cluster():
    assert "SLURM_CONF" in os.environ, "run these tests through `make test-slurm` (tests/slurm/cluster.sh)"
    with subprocess.Popen(
        [str(ROOT / "tests" / "slurm" / "cluster.sh"), "bash", "-c", SUBMIT_A_LONG_STEP],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as cluster:
        conf = cluster.stdout.readline().strip()
        running = step_running(conf) if conf else {}
        cluster.stdin.close()  # the command ends, and cluster.sh with it
        cluster.wait(timeout=60)
    assert cluster.returncode == 0 and conf.endswith("slurm.conf")
    assert {"munged", "slurmctld", "slurmd", "slurmstepd", "srun", "sleep"} <= set(running.values()), running
    assert processes_of(conf) == {}
    # The cluster these tests run on is still up.
    assert {"munged", "slurmctld", "slurmd"} <= set(processes_of(os.environ["SLURM_CONF"]).values())
