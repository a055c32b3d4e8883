#!/usr/bin/env bash
# A real single-node SLURM cluster on this host, for the launcher's tests and local sweeps.
#
#   scripts/slurm_cluster.sh install   # apt: slurmctld, slurmd, munge, slurm-client if missing
#   scripts/slurm_cluster.sh start     # slurm.conf, munge key, the daemons; waits for idle
#   scripts/slurm_cluster.sh status    # daemons, their pids, sinfo; exit 0 only when all run
#   scripts/slurm_cluster.sh stop      # cancel this cluster's jobs, stop the daemons by their pids
#   scripts/slurm_cluster.sh env       # prints `export SLURM_CONF=...` for sbatch, squeue, submitit
#
# Everything (conf, munge key and socket, state, spool, logs, pid files) lives under
# $MOE_GATO_SLURM_DIR (default /tmp/moe-gato-slurm); start writes nothing to /etc. Clients
# find the cluster through SLURM_CONF=$MOE_GATO_SLURM_DIR/etc/slurm.conf.
# Made for a root container without systemd or cgroups: the daemons and jobs run as root,
# processes are tracked through /proc (proctrack/linuxproc), tasks are not bound (task/none).
set -euo pipefail

DIR=${MOE_GATO_SLURM_DIR:-/tmp/moe-gato-slurm}
PARTITION=${MOE_GATO_SLURM_PARTITION:-debug}
PORT=${MOE_GATO_SLURM_PORT:-6817}  # slurmctld; slurmd listens on PORT+1
CONF=$DIR/etc/slurm.conf
SOCKET=$DIR/munge/munge.socket
NODE=$(hostname -s)
export SLURM_CONF=$CONF
# daemon name -> its pid file (munged writes its own, the SLURM daemons as slurm.conf says)
declare -A PIDFILE=([munged]=$DIR/run/munged.pid [slurmctld]=$DIR/run/slurmctld.pid
                    [slurmd]=$DIR/run/slurmd.pid)

die() { echo "slurm_cluster: $*" >&2; exit 1; }

# the pid in a daemon's pid file when that process is alive and is that daemon, else nothing
live_pid() {
    local name=$1 pid
    [[ -s ${PIDFILE[$name]} ]] || return 0
    pid=$(<"${PIDFILE[$name]}")
    [[ $pid =~ ^[0-9]+$ ]] || return 0
    if kill -0 "$pid" 2>/dev/null && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]]; then
        echo "$pid"
    fi
}

cmd_install() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v munged >/dev/null || missing+=(munge)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    ((${#missing[@]})) || return 0
    [[ $(id -u) == 0 ]] || die "installing ${missing[*]} needs root (apt-get)"
    echo "slurm_cluster: installing ${missing[*]} with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    local log
    log=$(mktemp)
    if ! apt-get update -qq >"$log" 2>&1; then
        tail -n 20 "$log" >&2; rm -f "$log"
        die "apt-get update failed: is Debian's package mirror reachable?"
    fi
    # (the packages' postinst cannot start services here, without an init: that is expected)
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$log" 2>&1; then
        tail -n 20 "$log" >&2; rm -f "$log"
        die "apt-get install ${missing[*]} failed"
    fi
    rm -f "$log"
    for bin in slurmctld slurmd munged sbatch; do
        command -v "$bin" >/dev/null || die "$bin is still missing after apt-get install"
    done
}

write_conf() {
    local cpus mem_mb
    # (nproc would count OMP_NUM_THREADS as the CPUs)
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
    # a little under the real memory: slurmd drains a node that has less than slurm.conf says
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.95)}' /proc/meminfo)
    cat >"$CONF" <<EOF
# Written by scripts/slurm_cluster.sh: a single-node cluster on $NODE.
ClusterName=moegato
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=${PIDFILE[slurmctld]}
SlurmdPidFile=${PIDFILE[slurmd]}
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# no systemd, no cgroups in a container
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# a node that was down comes back by itself; slurmd trusts this file over what it detects
ReturnToService=2
SlurmdParameters=config_overrides
# finished jobs stay visible to squeue/scontrol this long (there is no accounting database)
MinJobAge=600
KillWait=5
InactiveLimit=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n1 || true; }

cmd_start() {
    local running=() name
    for name in munged slurmctld slurmd; do
        [[ -n $(live_pid "$name") ]] && running+=("$name")
    done
    if ((${#running[@]} == 3)); then
        echo "slurm_cluster: already running under $DIR (node $NODE: $(node_state))"
        return 0
    fi
    if ((${#running[@]})); then
        echo "slurm_cluster: restarting (only ${running[*]} ran)" >&2
        cmd_stop
    fi
    for bin in slurmctld slurmd munged sinfo; do
        command -v "$bin" >/dev/null || die "$bin not found: run '$0 install' first"
    done
    (umask 077; mkdir -p "$DIR"/{etc,munge,state,spool,log,run})
    write_conf
    local key=$DIR/munge/munge.key
    if [[ ! -s $key ]]; then
        (umask 077; head -c 1024 /dev/urandom >"$key")
    fi
    chmod 600 "$key"
    munged --force --key-file="$key" --socket="$SOCKET" --pid-file="${PIDFILE[munged]}" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" \
        || die "munged did not start (see $DIR/log/munged.log)"
    slurmctld -f "$CONF" || die "slurmctld did not start (see $DIR/log/slurmctld.log)"
    slurmd -f "$CONF" || die "slurmd did not start (see $DIR/log/slurmd.log)"
    local state="" i
    for ((i = 0; i < 120; i++)); do  # 60 s
        state=$(node_state)
        [[ $state == idle ]] && break
        sleep 0.5
    done
    [[ $state == idle ]] || die "node $NODE is '${state:-unknown}', not idle, after 60 s" \
        "(logs under $DIR/log)"
    echo "slurm_cluster: running under $DIR, partition $PARTITION, node $NODE;" \
        "clients need: export SLURM_CONF=$CONF"
}

cmd_stop() {
    # this cluster's jobs first, so that no job process outlives its slurmd
    if [[ -n $(live_pid slurmctld) ]]; then
        local jobs
        jobs=$(squeue -h -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for ((i = 0; i < 20; i++)); do
                [[ -z $(squeue -h -o %i 2>/dev/null || true) ]] && break
                sleep 0.5
            done
        fi
    fi
    local name pid
    for name in slurmd slurmctld munged; do
        pid=$(live_pid "$name")
        [[ -n $pid ]] || continue
        kill -TERM "$pid"
        for ((i = 0; i < 40; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.25
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
        rm -f "${PIDFILE[$name]}"
        echo "slurm_cluster: stopped $name ($pid)"
    done
}

cmd_status() {
    local name pid ok=0
    for name in munged slurmctld slurmd; do
        pid=$(live_pid "$name")
        if [[ -n $pid ]]; then echo "$name: running ($pid)"; else echo "$name: stopped"; ok=1; fi
    done
    ((ok)) || sinfo -N -n "$NODE" 2>&1 || ok=1
    return $ok
}

case ${1:-} in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 install|start|stop|status|env" >&2; exit 2 ;;
esac
