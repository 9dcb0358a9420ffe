#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for tests and for trying scripts/slurm/adadecode.sbatch:
# its own munge key and munged, slurmctld and slurmd, every file under one directory (the
# default below, or $ADADECODE_SLURM_DIR), ports away from a system Slurm's.
#
#   scripts/slurm/local_cluster.sh start     # waits until `sinfo` shows the node idle (or fails, saying why)
#   scripts/slurm/local_cluster.sh status    # the daemons and the node; status 0 when the cluster is up
#   scripts/slurm/local_cluster.sh stop      # cancels its jobs, stops the daemons it started (by pid)
#
#   export SLURM_CONF=/tmp/adadecode-slurm/slurm.conf    # then sbatch, srun, sinfo, scancel ... use it
#
# Needs Debian's slurm-wlm and munge (apt-get install -y --no-install-recommends slurm-wlm munge).
# Jobs run as the user who starts it (root in CI). tests/test_slurm.py runs on this cluster and
# is skipped while it is down.
set -euo pipefail

DIR=${ADADECODE_SLURM_DIR:-/tmp/adadecode-slurm}
CTLD_PORT=${ADADECODE_SLURMCTLD_PORT:-6917}
SLURMD_PORT=${ADADECODE_SLURMD_PORT:-6918}
START_TIMEOUT_S=${ADADECODE_SLURM_START_TIMEOUT_S:-60}
CONF=$DIR/slurm.conf
DAEMONS=(munged slurmctld slurmd)

say() { echo "local_cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

alive() {  # alive NAME: the daemon NAME this script started runs (its pid file names a live process
    local pid  # of that name whose command line names this cluster's directory)
    pid=$(cat "$DIR/$1.pid" 2>/dev/null) || return 1
    [[ -n $pid && -d /proc/$pid ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]] &&
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$DIR/"
}

node_state() {  # the node's state as sinfo reports it ("idle", "down*", ...), or nothing
    SLURM_CONF=$CONF timeout 10 sinfo --noheader --nodes "$NODE" --format %T 2>/dev/null | awk 'NR == 1'
}

stop_daemon() {  # stop_daemon NAME: SIGTERM, up to 10 s, then SIGKILL; only the pid this script started
    local name=$1 pid
    alive "$name" || { rm -f "$DIR/$name.pid"; return 0; }
    pid=$(cat "$DIR/$name.pid")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        [[ -d /proc/$pid ]] || break
        sleep 0.1
    done
    if [[ -d /proc/$pid ]]; then
        say "$name (pid $pid) did not exit within 10 s of SIGTERM: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$DIR/$name.pid"
}

NODE=$(hostname -s)

start() {
    for exe in munged slurmctld slurmd sinfo scancel squeue; do
        command -v "$exe" >/dev/null || die "$exe not found: apt-get install -y --no-install-recommends slurm-wlm munge"
    done
    if alive slurmctld && alive slurmd && alive munged && [[ $(node_state) == idle ]]; then
        say "already up (state in $DIR)"
        return 0
    fi
    for name in "${DAEMONS[@]}"; do  # a half-started cluster from before: start afresh
        stop_daemon "$name"
    done
    local user cpus hw
    user=$(id -un)
    # What slurmd finds on this machine (CPUs, sockets, cores, threads); RealMemory left out, so
    # that memory other processes take does not drain the node.
    # (awk, not head: under pipefail a writer that head leaves behind dies of SIGPIPE.)
    hw=$(slurmd -C | awk 'NR == 1 {for (i = 1; i <= NF; i++)
        if ($i ~ /^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=/) printf "%s ", $i}')
    cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
    [[ -n $cpus ]] || die "\`slurmd -C\` reported no CPU count"

    mkdir -p "$DIR"
    chmod 0755 "$DIR"
    mkdir -p "$DIR/state" "$DIR/spool/slurmd-$NODE" "$DIR/munge" "$DIR/log"
    chmod 0700 "$DIR/munge"
    if [[ ! -s $DIR/munge/munge.key ]]; then  # mungekey since munge 0.5.14; random bytes before it
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$DIR/munge/munge.key" --bits=1024
        else
            head -c 1024 /dev/urandom >"$DIR/munge/munge.key"
        fi
    fi
    chmod 0600 "$DIR/munge/munge.key"

    cat >"$CONF" <<EOF
# Written by scripts/slurm/local_cluster.sh: a one-node cluster, node $NODE with $cpus CPUs.
ClusterName=adadecode-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$DIR/slurmctld.pidfile
SlurmdPidFile=$DIR/slurmd.pidfile
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups (containers rarely delegate them): processes tracked by parentage, tasks bound to
# their cores with sched_setaffinity (srun --cpu-bind).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
LaunchParameters=use_interactive_step
# No slurmdbd: finished jobs are written to a text file instead (state and exit code).
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.log
ReturnToService=2
# Finished jobs stay in \`scontrol show job\` for 5 minutes; KillWait: SIGTERM .. SIGKILL on cancel.
MinJobAge=300
KillWait=30
SlurmdTimeout=60
InactiveLimit=0
NodeName=$NODE NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

    munged --foreground --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$DIR/munge/munged.pidfile" \
        --seed-file="$DIR/munge/munged.seed" >>"$DIR/log/munged.out" 2>&1 &
    echo $! >"$DIR/munged.pid"
    for _ in $(seq 50); do
        [[ -S $DIR/munge/munge.socket ]] && break
        alive munged || die "munged exited at start: $(tail -n 5 "$DIR/log/munged.out")"
        sleep 0.1
    done
    [[ -S $DIR/munge/munge.socket ]] || die "munged did not open $DIR/munge/munge.socket within 5 s"

    SLURM_CONF=$CONF slurmctld -D -i -f "$CONF" >>"$DIR/log/slurmctld.out" 2>&1 &
    echo $! >"$DIR/slurmctld.pid"
    SLURM_CONF=$CONF slurmd -D -f "$CONF" >>"$DIR/log/slurmd.out" 2>&1 &
    echo $! >"$DIR/slurmd.pid"

    local deadline=$((SECONDS + START_TIMEOUT_S)) state=""
    while ((SECONDS < deadline)); do
        for name in "${DAEMONS[@]}"; do
            alive "$name" || die "$name exited at start; the end of its log:
$(tail -n 15 "$DIR/log/$name.log" 2>/dev/null || tail -n 15 "$DIR/log/$name.out")"
        done
        state=$(node_state)
        if [[ $state == idle ]]; then
            say "up: node $NODE ($cpus CPUs) idle in partition local; state in $DIR"
            say "use it with: export SLURM_CONF=$CONF"
            return 0
        fi
        sleep 0.5
    done
    die "node $NODE is not idle after ${START_TIMEOUT_S} s (sinfo says: '${state:-nothing}'); logs in $DIR/log/
$(tail -n 10 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" 2>/dev/null)"
}

stop() {
    if alive slurmctld; then  # this cluster's jobs end first, so that no job step outlives slurmd
        SLURM_CONF=$CONF timeout 10 scancel --full --signal=KILL --partition=local 2>/dev/null || true
        SLURM_CONF=$CONF timeout 10 scancel --partition=local 2>/dev/null || true
        for _ in $(seq 50); do
            [[ -z $(SLURM_CONF=$CONF timeout 5 squeue --noheader --partition=local 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
    for name in slurmd slurmctld munged; do
        stop_daemon "$name"
    done
    say "stopped (logs kept in $DIR/log)"
}

status() {
    local up=0
    for name in "${DAEMONS[@]}"; do
        if alive "$name"; then
            say "$name: running (pid $(cat "$DIR/$name.pid"))"
        else
            say "$name: not running"
            up=1
        fi
    done
    if ((up == 0)); then
        local state
        state=$(node_state)
        say "node $NODE: ${state:-unknown}"
        [[ $state == idle || $state == mixed || $state == allocated ]] || up=1
        SLURM_CONF=$CONF squeue 2>/dev/null || true
    fi
    return $up
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status   (state in \$ADADECODE_SLURM_DIR, default /tmp/adadecode-slurm)" >&2; exit 2 ;;
esac
