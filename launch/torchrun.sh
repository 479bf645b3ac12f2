#!/usr/bin/env bash
# Train with torchrun: run this same command on every node (NODE_RANK differs), or once for one node.
#
#   launch/torchrun.sh CONFIG OUT [key=value ...]
#
# Environment: NPROC_PER_NODE (default "gpu": one rank per GPU), NUM_NODES (default 1), MASTER_ADDR (the
# rendezvous host; default 127.0.0.1), MASTER_PORT (default 29500), RUN_ID (rendezvous id; default "semanticist").
# The run always starts with --resume, so the same command continues a stopped run from its newest checkpoint.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: launch/torchrun.sh CONFIG OUT [key=value ...]" >&2
  exit 2
fi
config=$1 out=$2
shift 2
# The ranks end when this launcher does, even on SIGKILL (semanticist_fast/common/launcher.py).
export SEMANTICIST_LAUNCHER_PID="$$@$HOSTNAME"
exec torchrun --nnodes "${NUM_NODES:-1}" --nproc-per-node "${NPROC_PER_NODE:-gpu}" \
  --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" --rdzv-id "${RUN_ID:-semanticist}" \
  -m semanticist_fast train "$config" --out "$out" --resume train.engine=deepspeed "$@"
