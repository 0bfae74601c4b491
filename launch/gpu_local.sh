#!/usr/bin/env bash
# Run zkd-train on this machine's NVIDIA GPU(s), with the CUDA build of JAX.
#
#   launch/gpu_local.sh --config CONFIG --workdir DIR [options] [-- zkd-train flags]
#
# One process drives every visible GPU: the trainer's mesh spans them and the global batch is split
# across them (it must be divisible by the number of GPUs). The same configs as on TPU.
#
# Options:
#   --config CONFIG      e.g. configs/cifar100.py:kd_ls,resnet32x4,resnet8x4 (path inside this checkout)
#   --workdir DIR        checkpoints, metrics, summary (local path or gs://...); a workdir holding a
#                        checkpoint resumes from it
#   --data-dir DIR       TFDS data directory (exported as TFDS_DATA_DIR, passed as --config.data_dir)
#   --gpus LIST          GPUs to use, e.g. 0 or 0,1,2,3 (sets CUDA_VISIBLE_DEVICES; default: all)
#   --cuda 12|13         CUDA build of JAX: jax[cuda12] (driver >= 525) or jax[cuda13] (driver >= 580);
#                        default 12
#   --venv DIR           virtual environment to create/use (default: .venv-cuda in this checkout)
#   --python PYTHON      interpreter that creates the venv, >= 3.11 (default: python3, or python3.13,
#                        python3.12, python3.11 when python3 is older, as on Ubuntu 22.04)
#   --no-install         use the venv as it is (skip pip)
#   --max-restarts N     rerun zkd-train at most N times after it was preempted (default: 50)
#   --dry-run            print the commands instead of running them
#   -h, --help           this text
#
# Everything after "--" is appended to the zkd-train command line (e.g. -- --config.seed=1).
#
# Preemption: zkd-train ends with exit status 75 after SIGTERM, once it has saved a checkpoint at
# the next step. When zkd-train alone got the signal, this script reruns the same command (it
# resumes from the workdir), up to --max-restarts times. When this script gets SIGTERM (a GPU
# scheduler stopping the job), it passes the signal on to zkd-train, waits for its checkpoint and
# exits with 75 itself, so that the scheduler requeues the job (e.g. Slurm's --requeue).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SOURCE_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"
# shellcheck source=launch/lib.sh
. "$SCRIPT_DIR/lib.sh"

CONFIG=""
WORKDIR=""
DATA_DIR=""
GPUS="${CUDA_VISIBLE_DEVICES:-}"
CUDA=12
VENV="$SOURCE_DIR/.venv-cuda"
PYTHON=""
INSTALL=1
DRY_RUN=0
MAX_RESTARTS=50
EXTRA=()

die() { echo "gpu_local.sh: $*" >&2; exit 2; }
info() { echo "[gpu_local] $*" >&2; }

# Run (or, with --dry-run, print) one command.
x() {
  if [ "$DRY_RUN" = 1 ]; then
    local line="" a
    for a in "$@"; do line="$line${line:+ }$(q "$a")"; done
    echo "$line"
    return 0
  fi
  "$@"
}

while [ $# -gt 0 ]; do
  case "$1" in
    --config) CONFIG="${2:?--config needs a value}"; shift ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir) WORKDIR="${2:?--workdir needs a value}"; shift ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --data-dir) DATA_DIR="${2:?--data-dir needs a value}"; shift ;;
    --data-dir=*) DATA_DIR="${1#*=}" ;;
    --gpus) GPUS="${2:?--gpus needs a value}"; shift ;;
    --gpus=*) GPUS="${1#*=}" ;;
    --cuda) CUDA="${2:?--cuda needs a value}"; shift ;;
    --cuda=*) CUDA="${1#*=}" ;;
    --venv) VENV="${2:?--venv needs a value}"; shift ;;
    --venv=*) VENV="${1#*=}" ;;
    --python) PYTHON="${2:?--python needs a value}"; shift ;;
    --python=*) PYTHON="${1#*=}" ;;
    --no-install) INSTALL=0 ;;
    --max-restarts) MAX_RESTARTS="${2:?--max-restarts needs a value}"; shift ;;
    --max-restarts=*) MAX_RESTARTS="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1'; see --help." ;;
  esac
  shift
done

[ -n "$CONFIG" ] || die "give the experiment with --config (e.g. --config=configs/cifar100.py:kd_ls,resnet32x4,resnet8x4)."
[ -n "$WORKDIR" ] || die "give the output directory with --workdir=DIR."
case "$CUDA" in 12 | 13) ;; *) die "--cuda takes 12 or 13 (the CUDA major version of the JAX build)." ;; esac
case "$GPUS" in *[!0-9,]*) die "--gpus takes a comma-separated list of GPU indices, e.g. 0,1." ;; esac
case "$MAX_RESTARTS" in '' | *[!0-9]*) die "--max-restarts takes a number, e.g. 50." ;; esac

py_version() {
  local v
  v="$("$1" --version 2>&1 | sed -n 's/^Python //p' | head -n 1 || true)"
  echo "${v:-missing}"
}
if [ "$INSTALL" = 1 ]; then
  if [ -x "$VENV/bin/python" ]; then
    python_ok "$VENV/bin/python" || die "the venv $VENV has Python $(py_version "$VENV/bin/python") (zkd_jax needs >= 3.11); delete it or give another --venv."
  elif [ -n "$PYTHON" ]; then
    python_ok "$PYTHON" || die "--python=$PYTHON is Python $(py_version "$PYTHON") or missing; zkd_jax needs >= 3.11."
  else
    PYTHON="$(pick_python)"
    [ -n "$PYTHON" ] || die "python3 is $(py_version python3) and no python3.13/3.12/3.11 was found; zkd_jax needs >= 3.11: install one (e.g. apt install python3.12-venv) or give --python=PATH."
  fi
  [ -x "$VENV/bin/python" ] || x "$PYTHON" -m venv "$VENV"
  x "$VENV/bin/python" -m pip install -q --upgrade pip
  # The CUDA wheels of jaxlib; TensorFlow (input pipeline only) stays the CPU build.
  x "$VENV/bin/python" -m pip install -q "jax[cuda$CUDA]>=0.10,<0.12" -e "${SOURCE_DIR}[data]"
fi

ENV_VARS=()
[ -z "$GPUS" ] || ENV_VARS+=("CUDA_VISIBLE_DEVICES=$GPUS")
# Leave GPU memory to JAX (TensorFlow is the CPU build) and let XLA take what it needs.
ENV_VARS+=("XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}")
ARGS=("--config=$CONFIG" "--workdir=$WORKDIR")
if [ -n "$DATA_DIR" ]; then
  ENV_VARS+=("TFDS_DATA_DIR=$DATA_DIR")
  ARGS+=("--config.data_dir=$DATA_DIR")
fi

info "zkd-train on GPU(s) ${GPUS:-all} with jax[cuda$CUDA], workdir $WORKDIR"
cd "$SOURCE_DIR"
if [ "$DRY_RUN" = 1 ]; then
  x env "${ENV_VARS[@]}" "$VENV/bin/zkd-train" "${ARGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
  exit 0
fi

# The recovery loop: exit status 75 (preempted, checkpoint saved) means "run it again".
STOPPING=0
CHILD=""
forward_term() {
  STOPPING=1
  if [ -n "$CHILD" ]; then kill -TERM "$CHILD" 2>/dev/null || true; fi
}
trap forward_term TERM
restarts=0
while :; do
  env "${ENV_VARS[@]}" "$VENV/bin/zkd-train" "${ARGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"} &
  CHILD=$!
  rc=0
  wait "$CHILD" || rc=$?
  while kill -0 "$CHILD" 2>/dev/null; do  # the wait was cut short by SIGTERM: wait for the end
    rc=0
    wait "$CHILD" || rc=$?
  done
  CHILD=""
  if [ "$rc" != "$PREEMPTED_STATUS" ] || [ "$STOPPING" = 1 ]; then exit "$rc"; fi
  if [ "$restarts" -ge "$MAX_RESTARTS" ]; then
    echo "gpu_local.sh: zkd-train was preempted again after --max-restarts=$MAX_RESTARTS restarts; rerun to resume from $WORKDIR." >&2
    exit 75
  fi
  restarts=$((restarts + 1))
  info "zkd-train was preempted (exit status 75, checkpoint saved); resuming from $WORKDIR (restart $restarts of $MAX_RESTARTS)"
done
