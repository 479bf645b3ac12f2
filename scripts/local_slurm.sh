#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, from Debian's slurm-wlm and munge (scripts/install.sh --dev installs
# them): munged, slurmctld and slurmd as root, talking over 127.0.0.1, every file under one folder.
#
#   eval "$(bash scripts/local_slurm.sh up)"      start it; exports SLURM_CONF, so sbatch/squeue/scontrol use it
#   bash scripts/local_slurm.sh down              stop it and remove its folder
#
# The folder is $LOCAL_SLURM_DIR (default /tmp/semanticist-slurm); the ports $LOCAL_SLURM_PORT and the next one
# (default 16817, away from a system Slurm's 6817). The node is this machine as `slurmd -C` sees it (its cores and
# memory), in one partition `local`. Requeued jobs start again after 10 s (a real cluster's default is 120 s).
set -euo pipefail
dir=${LOCAL_SLURM_DIR:-/tmp/semanticist-slurm}
port=${LOCAL_SLURM_PORT:-16817}

say() { echo "local_slurm: $*" >&2; }

stop_pid_file() {  # stop the daemon whose pid is in $1, waiting for it to go (then SIGKILL)
  local file=$1 pid
  [[ -s $file ]] || return 0
  pid=$(cat "$file")
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}

down() {
  [[ -d $dir ]] || { say "nothing to stop in $dir"; return 0; }
  if [[ -f $dir/slurm.conf ]]; then  # jobs first, while slurmd still runs their steps
    export SLURM_CONF=$dir/slurm.conf
    timeout 10 scancel --quiet --user=root 2>/dev/null || true
    for _ in $(seq 100); do
      [[ -z $(timeout 5 squeue -h -o %i 2>/dev/null) ]] && break
      sleep 0.2
    done
  fi
  stop_pid_file "$dir/slurmd.pid"
  stop_pid_file "$dir/slurmctld.pid"
  stop_pid_file "$dir/munged.pid"
  rm -rf "$dir"
  say "stopped; removed $dir"
}

up() {
  for tool in munged slurmctld slurmd sbatch; do
    command -v "$tool" >/dev/null || { say "$tool not found: install Debian's slurm-wlm and munge (bash scripts/install.sh --dev)"; exit 1; }
  done
  [[ $(id -u) -eq 0 ]] || { say "run as root (slurmd starts jobs as their users)"; exit 1; }
  if [[ -f $dir/slurmctld.pid ]] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
    say "already up in $dir"
    echo "export SLURM_CONF=$dir/slurm.conf"
    return 0
  fi
  rm -rf "$dir"
  mkdir -p -m 700 "$dir"
  mkdir -p "$dir/munge" "$dir/ctld" "$dir/spool" "$dir/log"
  chmod 700 "$dir/munge"
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$dir/munge/munge.key"
  munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/socket" --pid-file="$dir/munged.pid" \
    --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed"

  local node host
  node=$(slurmd -C | head -n 1)  # NodeName=<host> CPUs=... RealMemory=...: what this machine has
  host=$(hostname -s)
  cat > "$dir/slurm.conf" <<EOF
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/socket,cred_expire=10
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=600
KillWait=30
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF=$dir/slurm.conf
  slurmctld -i
  slurmd
  for _ in $(seq 100); do
    if [[ $(sinfo -h -o %t 2>/dev/null) == idle ]]; then
      say "up: node $host ($(sed 's/.*CPUs=\([0-9]*\).*RealMemory=\([0-9]*\).*/\1 CPUs, \2 MB/' <<< "$node")), state in $dir"
      echo "export SLURM_CONF=$dir/slurm.conf"
      return 0
    fi
    sleep 0.2
  done
  say "the node did not come up within 20 s; logs in $dir/log:"
  tail -n 20 "$dir"/log/*.log >&2
  exit 1
}

case ${1:-} in
  up) up ;;
  down) down ;;
  *) echo "usage: bash scripts/local_slurm.sh up|down" >&2; exit 2 ;;
esac
