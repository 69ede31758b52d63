#!/usr/bin/env bash
# Launch a training script with torchrun on every GPU of this node, or across several nodes.
#
#   bash run.sh sft_qwen2.py --demo                        # one node, all visible GPUs (1 process on CPU)
#   NPROC_PER_NODE=2 bash run.sh sft_qwen2.py --demo       # 2 processes (gloo on CPU)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 bash run.sh train_scorer.py ...   # on each node
#   srun bash run.sh train_scorer.py CONFIG.yaml           # in a Slurm job, one task per node (configs/slurm/)
#
# Environment: NPROC_PER_NODE (default: number of visible GPUs, 1 if none), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500; a free port is picked on a single node), OMP_NUM_THREADS,
# STOP_TIMEOUT (600: seconds the processes get to finish their step and save after a SIGTERM or SIGINT).
# In a Slurm job (SLURM_JOB_ID set), those of the first five left unset come from Slurm: NNODES from SLURM_NNODES
# (or SLURM_JOB_NUM_NODES), NODE_RANK from SLURM_NODEID, MASTER_ADDR = the step's first node (`scontrol show
# hostnames`), MASTER_PORT = 15000 + SLURM_JOB_ID % 15000 on several nodes, NPROC_PER_NODE from SLURM_GPUS_ON_NODE.
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

# Inside Slurm (`srun bash run.sh ...` on every node), what the user left unset comes from the job.
if [ -n "${SLURM_JOB_ID:-}" ]; then
  # torchrun starts every GPU's process itself: a second run.sh on a node would start a second set, same node rank.
  # Only an srun step (SLURM_STEP_ID) runs one run.sh per task; a batch script running run.sh itself is one copy.
  if [ -n "${SLURM_STEP_ID:-}" ] && { [ "${SLURM_NTASKS_PER_NODE:-1}" -gt 1 ] ||
       [ "${SLURM_NTASKS:-1}" -gt "${SLURM_NNODES:-${SLURM_NTASKS:-1}}" ]; } 2>/dev/null; then
    echo "error: Slurm started ${SLURM_NTASKS:-several} tasks on ${SLURM_NNODES:-?} node(s); run.sh wants one" \
         "task per node (srun --ntasks-per-node=1), because torchrun itself starts the processes of every GPU" >&2
    exit 2
  fi
  # Outside an srun step (the batch script itself, an salloc shell) this is one copy on one node: a job of several
  # nodes would wait forever for the others' launchers.
  if [ -z "${SLURM_STEP_ID:-}" ] && [ -z "${NNODES:-}" ] && [ "${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}" != 1 ]; then
    echo "error: Slurm job $SLURM_JOB_ID has ${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-}} nodes but run.sh was started" \
         "once, outside srun: start it on every node (srun --ntasks-per-node=1 bash run.sh ...), or set NNODES=1" \
         "to train on this node only" >&2
    exit 2
  fi
  user_set=
  for name in NNODES NODE_RANK MASTER_ADDR MASTER_PORT NPROC_PER_NODE; do
    if [ -n "${!name:-}" ]; then user_set+=" $name"; fi
  done
  NNODES=${NNODES:-${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}}
  # This node's index in the step (with one task per node, SLURM_PROCID is the same number).
  NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-${SLURM_PROCID:-0}}}
  if [ -z "${NPROC_PER_NODE:-}" ] && [ "${SLURM_GPUS_ON_NODE:-0}" -gt 0 ] 2>/dev/null; then
    NPROC_PER_NODE=$SLURM_GPUS_ON_NODE
  fi
  if [ -z "${MASTER_ADDR:-}" ]; then
    # Node rank 0 is the first node of the step's list (SLURM_NODEID counts the step's nodes, which may be only some
    # of the job's), so every node finds the same master without talking to the others.
    nodelist=${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:-}}
    if ! command -v scontrol >/dev/null 2>&1; then
      echo "error: Slurm job $SLURM_JOB_ID: scontrol not found, needed to find the first node of '$nodelist'; set" \
           "MASTER_ADDR to that node's address" >&2
      exit 2
    fi
    hosts=$(scontrol show hostnames "$nodelist" 2>/dev/null)
    code=$?
    if [ "$code" != 0 ] || [ -z "$hosts" ]; then
      if [ "$code" = 0 ]; then outcome="printed no host"; else outcome="failed (exit $code)"; fi
      echo "error: Slurm job $SLURM_JOB_ID: 'scontrol show hostnames $nodelist' $outcome; set MASTER_ADDR to the" \
           "first node's address" >&2
      exit 2
    fi
    MASTER_ADDR=${hosts%%$'\n'*}
  fi
  if [ -z "${MASTER_PORT:-}" ] && [ "$NNODES" != 1 ]; then
    # Every node computes the same port alone. From the job id, not a fixed 29500, so two jobs whose first node is
    # the same machine do not collide; below 32768 (Linux's first ephemeral port), so no outgoing connection on the
    # master holds it already. One node keeps the free port picked below.
    MASTER_PORT=$(( 15000 + SLURM_JOB_ID % 15000 ))
  fi
fi

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
if [ -n "${SLURM_JOB_ID:-}" ]; then
  plural() { if [ "$1" = 1 ]; then echo "$1 $2"; else echo "$1 $3"; fi; }
  if [ -n "$user_set" ]; then user_set=" (set by you:$user_set)"; fi
  echo "run.sh: Slurm job $SLURM_JOB_ID: $(plural "$NNODES" node nodes), node rank $NODE_RANK, master" \
       "$MASTER_ADDR:$MASTER_PORT, $(plural "$NPROC_PER_NODE" process processes) per node$user_set" >&2
fi

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
