#!/usr/bin/env bash
# Launch a training script with torchrun on every GPU of this node, or across several nodes.
#
#   bash run.sh sft_qwen2.py --demo                        # one node, all visible GPUs (1 process on CPU)
#   NPROC_PER_NODE=2 bash run.sh sft_qwen2.py --demo       # 2 processes (gloo on CPU)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 bash run.sh train_scorer.py ...   # on each node
#
# Environment: NPROC_PER_NODE (default: number of visible GPUs, 1 if none), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500; a free port is picked on a single node), OMP_NUM_THREADS,
# STOP_TIMEOUT (600: seconds the processes get to finish their step and save after a SIGTERM or SIGINT).
# Exits with the training script's own exit code (2 for bad arguments or data).
set -uo pipefail

if [ $# -lt 1 ]; then
  echo "usage: bash run.sh SCRIPT.py [ARGS...]" >&2
  exit 2
fi
script=$1
shift
if [ ! -f "$script" ]; then
  echo "error: $script: no such script" >&2
  exit 2
fi

python=${PYTHON:-python}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$("$python" -c 'import torch; print(max(torch.cuda.device_count(), 1))' 2>/dev/null || echo 1)
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
if [ -z "${MASTER_PORT:-}" ]; then
  if [ "$NNODES" = 1 ]; then  # any free port, so two single-node runs on one machine don't collide
    MASTER_PORT=$("$python" -c 'import socket; s=socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
  else
    MASTER_PORT=29500
  fi
fi
# torchrun would set 1 thread per process and warn; give each process its share of the cores instead.
if [ -z "${OMP_NUM_THREADS:-}" ]; then
  cores=$(nproc 2>/dev/null || echo 1)
  OMP_NUM_THREADS=$(( cores / NPROC_PER_NODE > 0 ? cores / NPROC_PER_NODE : 1 ))
fi
export OMP_NUM_THREADS

# torchrun reports any failed process as exit 1 with a long traceback of its own; this wrapper exits with the
# first failed process's own code instead (2 for bad input), so callers and CI see what the script meant.
# A SIGTERM or SIGINT to torchrun is passed on to every process, which stops after its step with a checkpoint
# (reliability.py); torchrun waits up to STOP_TIMEOUT seconds for them (its own default, 30 s, is less than a 7B
# sharded checkpoint takes to write on a shared filesystem), then kills them. This wrapper then exits 143 or 130.
launcher='
import sys
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main
try:
    main(sys.argv[1:])
except ChildFailedError as e:
    sys.exit(e.get_first_failure()[1].exitcode or 1)
except SignalException as e:
    sys.exit(128 + e.sigval)
'
args=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE"
      --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --shutdown_timeout "${STOP_TIMEOUT:-600}"
      "$script" "$@")
printf '+ OMP_NUM_THREADS=%s torchrun' "$OMP_NUM_THREADS" >&2
printf ' %q' "${args[@]}" >&2
echo >&2
exec "$python" -c "$launcher" "${args[@]}"
