#!/usr/bin/env bash
# A real two-node SLURM cluster on this machine, for `make test-slurm`:
#   tests/slurm/cluster.sh COMMAND...   installs Debian's slurmctld, slurmd and munge if missing, starts
#                                       munged, slurmctld and one slurmd per node (no systemd) with their config
#                                       and state in a temp dir, runs COMMAND with SLURM_CONF set, then stops
#                                       them and every process of the cluster's jobs.
# The two nodes are two slurmd daemons on this machine (slurmd -N NAME; Debian builds SLURM with
# --enable-multiple-slurmd), each on its own port and each with all of this machine's CPUs; partition debug holds
# both. They are named by loopback addresses, 127.0.0.1 and 127.0.0.2: a job's ranks meet at its first node's
# name (cbe.ranks), which must resolve, as node names do on a real cluster.
set -euo pipefail

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    echo "installing slurmctld, slurmd and munge (Debian packages)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt_get() { if [ "$(id -u)" = 0 ]; then apt-get "$@"; else sudo apt-get "$@"; fi; }
    apt_get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null ||
        { apt_get update -q >/dev/null && apt_get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null; }
fi

dir=$(mktemp -d /tmp/cbe-slurm.XXXXXX)
# Exported before any daemon starts, so that every process of this cluster (the daemons, the job steps'
# slurmstepd, srun and all the jobs start) carries it in the environment it was started with: stop() finds
# them by it, and leaves other clusters' processes alone.
export SLURM_CONF="$dir/slurm.conf"
host=$(hostname -s)
pids=()

# The pids of this cluster's processes, read from /proc/PID/environ (which keeps the start-time environment,
# so this script itself, whose SLURM_CONF came later, is not among them).
cluster_processes() { grep -lsxzF "SLURM_CONF=$dir/slurm.conf" /proc/[0-9]*/environ | cut -d/ -f3 || true; }
steps_running() {
    local pid
    for pid in $(cluster_processes); do grep -qsx slurmstepd "/proc/$pid/comm" && return 0; done
    return 1
}

# Stopping the daemons alone leaves running job steps behind (slurmstepd outlives slurmd by design): cancel
# every job first and give the steps a few seconds to end (KillWait is 5 s), then stop the daemons, then kill
# whatever of the cluster is still alive.
stop() {
    [ -s "$dir/slurmctld.pid" ] && timeout 10 scancel --user="$(id -un)" 2>/dev/null || true
    # From here on this script's helpers (grep, cut) must not look like part of the cluster.
    unset SLURM_CONF
    for _ in $(seq 50); do steps_running || break; sleep 0.2; done
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    cluster_processes | xargs -r kill -9 2>/dev/null || true
    rm -rf "$dir"
}
trap stop EXIT

mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
# munged refuses a key or state folder that others can read
chmod 700 "$dir/munge"
dd if=/dev/urandom of="$dir/munge/munge.key" bs=1 count=1024 status=none
chmod 400 "$dir/munge/munge.key"
munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"
for _ in $(seq 50); do [ -S "$dir/munge/munge.socket" ] && break; sleep 0.1; done
pids+=("$(cat "$dir/munge/munged.pid")")

memory_mb=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 3 / 4))
# Every CPU of this machine: nproc alone counts OMP_NUM_THREADS (e.g. 1) where the caller sets it.
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
# Three ports nothing listens on yet (slurmctld's and each node's slurmd's, from SLURM's own 6817 and 6818 when
# free), so that this cluster can run beside another one: the cleanup test starts one inside `make test-slurm`'s.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port=6817
while listening "$port" || listening $((port + 1)) || listening $((port + 2)); do port=$((port + 3)); done
nodes=(127.0.0.1 127.0.0.2)
cat >"$dir/slurm.conf" <<EOF
ClusterName=cbe-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=$(id -un)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=5
MinJobAge=600
InactiveLimit=0
NodeName=127.0.0.1 NodeAddr=127.0.0.1 Port=$((port + 1)) CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
NodeName=127.0.0.2 NodeAddr=127.0.0.2 Port=$((port + 2)) CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=127.0.0.[1-2] Default=YES MaxTime=INFINITE State=UP
EOF

slurmctld -i -f "$SLURM_CONF"
for _ in $(seq 50); do [ -s "$dir/slurmctld.pid" ] && break; sleep 0.1; done
pids+=("$(cat "$dir/slurmctld.pid")")
for node in "${nodes[@]}"; do
    mkdir -p "$dir/spool/$node"
    slurmd -f "$SLURM_CONF" -N "$node"
    for _ in $(seq 50); do [ -s "$dir/slurmd-$node.pid" ] && break; sleep 0.1; done
    pids+=("$(cat "$dir/slurmd-$node.pid")")
done

all_idle() { [ "$(sinfo -h -N -o %t 2>/dev/null | grep -cx idle)" = "${#nodes[@]}" ]; }
for _ in $(seq 100); do all_idle && break; sleep 0.2; done
if ! all_idle; then
    echo "SLURM did not come up; its logs:" >&2
    tail -n 20 "$dir"/*.log >&2
    exit 1
fi
echo "SLURM cluster up: $(sinfo -h -o '%P %D nodes %c CPUs %t')" >&2

"$@"
