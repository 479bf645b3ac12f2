#!/usr/bin/env bash
# Train with the deepspeed launcher, on one node or many (passwordless ssh between the nodes of HOSTFILE).
#
#   launch/deepspeed.sh CONFIG OUT [key=value ...]
#
# Environment: NUM_GPUS (per node; default all), NUM_NODES (default: every host of HOSTFILE), HOSTFILE (see
# launch/hostfile.example; default: this node only), MASTER_ADDR / MASTER_PORT (default: the first host, 29500).
# The run always starts with --resume, so the same command continues a stopped run from its newest checkpoint.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: launch/deepspeed.sh CONFIG OUT [key=value ...]" >&2
  exit 2
fi
config=$1 out=$2
shift 2
args=(--no_local_rank)
[[ -n "${HOSTFILE:-}" ]] && args+=(--hostfile "$HOSTFILE")
[[ -n "${NUM_NODES:-}" ]] && args+=(--num_nodes "$NUM_NODES")
[[ -n "${NUM_GPUS:-}" ]] && args+=(--num_gpus "$NUM_GPUS")
[[ -n "${MASTER_ADDR:-}" ]] && args+=(--master_addr "$MASTER_ADDR")
[[ -n "${MASTER_PORT:-}" ]] && args+=(--master_port "$MASTER_PORT")
# The ranks end when this launcher does, even on SIGKILL (semanticist_fast/common/launcher.py).
export SEMANTICIST_LAUNCHER_PID="$$@$HOSTNAME"
exec deepspeed "${args[@]}" --module semanticist_fast train "$config" --out "$out" --resume \
  train.engine=deepspeed "$@"
