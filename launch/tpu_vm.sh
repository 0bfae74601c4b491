#!/usr/bin/env bash
# Launch zkd-train on a Cloud TPU VM (one host such as v4-8, or a pod slice such as v4-32).
#
#   launch/tpu_vm.sh [run|create|install|train|logs|delete|status] [options] [-- zkd-train flags]
#
#   run (default)  create the VM if needed, install zkd_jax on every worker, start zkd-train on all
#                  workers at once, stream worker 0's log; with --spot, recreate a preempted VM and
#                  resume from the checkpoints in the workdir; with --delete, delete the VM at the end
#   create         create the VM                      install   copy this checkout to every worker
#   train          start zkd-train on every worker    logs      stream worker 0's log until it ends
#   delete         delete the VM                      status    print the VM's state
#
# Options:
#   --name NAME               TPU VM name (default: zkd-tpu)
#   --zone ZONE               e.g. us-central2-b (required; or $ZKD_TPU_ZONE)
#   --project PROJECT         gcloud project (default: gcloud's configured project)
#   --accelerator-type TYPE   v4-8 (one host), v4-32 (pod of 4 hosts), v5litepod-16, v6e-8, ... (default: v4-8)
#   --version VERSION         TPU runtime version (default: tpu-ubuntu2204-base)
#   --spot                    spot capacity; a preempted VM is recreated and the run resumes
#   --config CONFIG           e.g. configs/cifar100.py:kd_ls,resnet32x4,resnet8x4 (path inside this checkout)
#   --workdir gs://BUCKET/DIR checkpoints, metrics and summary (must be on GCS: workers are ephemeral)
#   --data-dir gs://BUCKET/tensorflow_datasets   TFDS data directory (exported as TFDS_DATA_DIR and
#                             passed as --config.data_dir)
#   --python VERSION          Python for the workers' virtual environment (default: 3.12)
#   --max-restarts N          give up after N recreations / reconnections (default: 50)
#   --delete                  delete the VM when the run has finished (run only)
#   --dry-run                 print every gcloud command instead of running it (nothing is created)
#   -h, --help                this text
#
# Everything after "--" is appended to the zkd-train command line (e.g. -- --config.seed=1).
# Works with bash 3.2 (macOS) and later. With --dry-run the VM is modelled, not queried: it starts
# missing (ZKD_DRY_RUN_STATE=READY: already up) and is preempted ZKD_DRY_RUN_PREEMPTIONS times
# (default 0) while training, which shows the commands of the spot recovery loop.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SOURCE_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"
# shellcheck source=launch/lib.sh
. "$SCRIPT_DIR/lib.sh"

ACTION=run
NAME=zkd-tpu
ZONE="${ZKD_TPU_ZONE:-}"
PROJECT=""
ACCELERATOR_TYPE=v4-8
VERSION=tpu-ubuntu2204-base
SPOT=0
CONFIG=""
WORKDIR=""
DATA_DIR=""
PYTHON_VERSION=3.12
MAX_RESTARTS=50
DELETE_AT_END=0
DRY_RUN=0
EXTRA=()

# Remote layout, relative to the worker's $HOME.
REMOTE_TARBALL=zkd_jax-src.tar.gz
REMOTE_SRC='$HOME/zkd_jax'
REMOTE_VENV='$HOME/zkd_venv'
REMOTE_LOG='$HOME/zkd_train.log'
REMOTE_RC='$HOME/zkd_train.rc'
REMOTE_PID='$HOME/zkd_train.pid'

die() { echo "tpu_vm.sh: $*" >&2; exit 2; }
info() { echo "[tpu_vm] $*" >&2; }

# Print a whole command line, quoted, on the dry-run output (fd 3 = the script's stdout).
show() {
  local line="" a
  for a in "$@"; do line="$line${line:+ }$(q "$a")"; done
  echo "$line" >&3
}

while [ $# -gt 0 ]; do
  case "$1" in
    run | create | install | train | logs | delete | status) ACTION="$1" ;;
    --name) NAME="${2:?--name needs a value}"; shift ;;
    --name=*) NAME="${1#*=}" ;;
    --zone) ZONE="${2:?--zone needs a value}"; shift ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project) PROJECT="${2:?--project needs a value}"; shift ;;
    --project=*) PROJECT="${1#*=}" ;;
    --accelerator-type) ACCELERATOR_TYPE="${2:?--accelerator-type needs a value}"; shift ;;
    --accelerator-type=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --version) VERSION="${2:?--version needs a value}"; shift ;;
    --version=*) VERSION="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --config) CONFIG="${2:?--config needs a value}"; shift ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir) WORKDIR="${2:?--workdir needs a value}"; shift ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --data-dir) DATA_DIR="${2:?--data-dir needs a value}"; shift ;;
    --data-dir=*) DATA_DIR="${1#*=}" ;;
    --python) PYTHON_VERSION="${2:?--python needs a value}"; shift ;;
    --python=*) PYTHON_VERSION="${1#*=}" ;;
    --max-restarts) MAX_RESTARTS="${2:?--max-restarts needs a value}"; shift ;;
    --max-restarts=*) MAX_RESTARTS="${1#*=}" ;;
    --delete) DELETE_AT_END=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1'; see --help." ;;
  esac
  shift
done

[ -n "$ZONE" ] || die "give the TPU zone with --zone (e.g. --zone=us-central2-b)."
case "$MAX_RESTARTS" in '' | *[!0-9]*) die "--max-restarts takes a whole number." ;; esac
if [ "$ACTION" = run ] || [ "$ACTION" = train ]; then
  [ -n "$CONFIG" ] || die "give the experiment with --config (e.g. --config=configs/cifar100.py:kd_ls,resnet32x4,resnet8x4)."
  case "$WORKDIR" in
    gs://?*) ;;
    *) die "give --workdir=gs://BUCKET/DIR: the workers' disks vanish on preemption or deletion." ;;
  esac
  case "$DATA_DIR" in
    '' | gs://?*) ;;
    *) die "give --data-dir=gs://BUCKET/DIR: every worker must read the same TFDS data directory." ;;
  esac
fi

# Number of hosts of a TPU slice; 0 when the type is unknown (then treated as a pod).
tpu_hosts() {
  local gen="${1%-*}" n="${1##*-}"
  case "$n" in '' | *[!0-9]*) echo 0; return ;; esac
  case "$gen" in
    v2 | v3 | v4 | v5p) if [ "$n" -le 8 ]; then echo 1; else echo $((n / 8)); fi ;;
    v5litepod | v5e | v6e) if [ "$n" -le 8 ]; then echo 1; else echo $((n / 4)); fi ;;
    *) echo 0 ;;
  esac
}
HOSTS="$(tpu_hosts "$ACCELERATOR_TYPE")"

if [ "$DRY_RUN" = 0 ] && ! command -v gcloud >/dev/null 2>&1; then
  die "gcloud not found; install the Google Cloud CLI (https://cloud.google.com/sdk) and run 'gcloud auth login'."
fi

exec 3>&1
TPU=(compute tpus tpu-vm)
COMMON=("--zone=$ZONE")
[ -z "$PROJECT" ] || COMMON+=("--project=$PROJECT")

# Run (or, with --dry-run, print) one gcloud command.
gc() {
  if [ "$DRY_RUN" = 1 ]; then show gcloud "$@"; return 0; fi
  gcloud "$@"
}

# --- dry-run model of the VM: missing, READY after create, PREEMPTED ZKD_DRY_RUN_PREEMPTIONS times.
SIM_STATE="${ZKD_DRY_RUN_STATE:-MISSING}"
SIM_PREEMPTIONS="${ZKD_DRY_RUN_PREEMPTIONS:-0}"

# Sets STATE to the VM's state (READY, CREATING, PREEMPTED, TERMINATED, ...) or MISSING.
vm_state() {
  if [ "$DRY_RUN" = 1 ]; then
    show gcloud "${TPU[@]}" describe "$NAME" "${COMMON[@]}" '--format=value(state)'
    STATE="$SIM_STATE"
    return 0
  fi
  local err msg
  err="$(mktemp)"
  if STATE="$(gcloud "${TPU[@]}" describe "$NAME" "${COMMON[@]}" '--format=value(state)' 2>"$err")"; then
    [ -n "$STATE" ] || STATE=UNKNOWN
  else
    msg="$(tail -n 1 "$err")"
    case "$(cat "$err")" in
      *NOT_FOUND* | *"not found"*) STATE=MISSING ;;
      *) rm -f "$err"; die "cannot query $NAME ($msg); check 'gcloud auth list' and the project/zone." ;;
    esac
  fi
  rm -f "$err"
}

create_vm() {
  local flags=("--accelerator-type=$ACCELERATOR_TYPE" "--version=$VERSION")
  [ "$SPOT" = 0 ] || flags+=(--spot)
  info "creating $NAME ($ACCELERATOR_TYPE, $( [ "$HOSTS" = 1 ] && echo 'one host' || echo 'pod'), zone $ZONE$( [ "$SPOT" = 1 ] && echo ', spot'))"
  gc "${TPU[@]}" create "$NAME" "${COMMON[@]}" "${flags[@]}"
  SIM_STATE=READY
}

delete_vm() {
  info "deleting $NAME"
  gc "${TPU[@]}" delete "$NAME" "${COMMON[@]}" --quiet
  SIM_STATE=MISSING
}

# Make sure a READY VM exists: reuse it, wait for it, or (re)create it.
ensure_vm() {
  local waited=0
  while :; do
    vm_state
    case "$STATE" in
      READY) return 0 ;;
      MISSING) create_vm; return 0 ;;
      CREATING | STARTING | RESTARTING | REPAIRING)
        [ "$waited" -lt 60 ] || die "$NAME stays in state $STATE; inspect it with: gcloud ${TPU[*]} describe $NAME --zone=$ZONE"
        info "$NAME is $STATE; waiting"; sleep 30; waited=$((waited + 1)) ;;
      *) info "$NAME is $STATE"; delete_vm; create_vm; return 0 ;;
    esac
  done
}

# Copy this checkout to every worker and install it with the TPU build of JAX.
install_workers() {
  local tarball="${TMPDIR:-/tmp}/zkd_jax-src-$$.tar.gz"
  local tar_cmd=(tar -czf "$tarball" --exclude=.git --exclude=.venv --exclude='.venv*' --exclude='*.egg-info'
    --exclude=__pycache__ --exclude=.pytest_cache --exclude=workdir -C "$SOURCE_DIR" .)
  if [ "$DRY_RUN" = 1 ]; then show "${tar_cmd[@]}"; else "${tar_cmd[@]}"; fi
  gc "${TPU[@]}" scp "$tarball" "$NAME:$REMOTE_TARBALL" "${COMMON[@]}" --worker=all
  [ "$DRY_RUN" = 1 ] || rm -f "$tarball"
  local remote="set -e; rm -rf $REMOTE_SRC; mkdir -p $REMOTE_SRC; tar -xzf \$HOME/$REMOTE_TARBALL -C $REMOTE_SRC"
  remote="$remote; export PATH=\$HOME/.local/bin:\$PATH"
  remote="$remote; command -v uv >/dev/null 2>&1 || curl -LsSf https://astral.sh/uv/install.sh | sh"
  remote="$remote; uv venv --allow-existing --python $PYTHON_VERSION $REMOTE_VENV"
  # google-cloud-storage: tensorboardX writes its event files to gs:// with it.
  remote="$remote; uv pip install --python $REMOTE_VENV/bin/python 'jax[tpu]>=0.10,<0.12' \"$REMOTE_SRC[data]\" google-cloud-storage"
  info "installing zkd_jax on every worker of $NAME"
  gc "${TPU[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all "--command=$remote"
}

# Start zkd-train in the background on every worker (all at once); its exit status goes to a file.
start_training() {
  local train="$REMOTE_VENV/bin/zkd-train $(q "--config=$CONFIG") $(q "--workdir=$WORKDIR")" a env=""
  if [ -n "$DATA_DIR" ]; then
    train="$train $(q "--config.data_dir=$DATA_DIR")"
    env="export TFDS_DATA_DIR=$(q "$DATA_DIR"); "
  fi
  for a in ${EXTRA[@]+"${EXTRA[@]}"}; do train="$train $(q "$a")"; done
  # A pod needs the multi-host runtime; the trainer reads ZKD_DISTRIBUTED (zkd_jax/distributed.py).
  [ "$HOSTS" = 1 ] || env="${env}export ZKD_DISTRIBUTED=1; "
  local job="cd $REMOTE_SRC && ${env}$train; echo \$? > $REMOTE_RC"
  local remote="if [ -f $REMOTE_PID ]; then kill \$(cat $REMOTE_PID) 2>/dev/null || true; fi; rm -f $REMOTE_RC"
  remote="$remote; nohup bash -c $(q "$job") > $REMOTE_LOG 2>&1 < /dev/null & echo \$! > $REMOTE_PID"
  info "starting zkd-train on every worker of $NAME"
  gc "${TPU[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all "--command=$remote"
}

# Stream worker 0's log until training ends; returns the training's exit status (255: ssh lost).
stream_log() {
  local remote="tail -n +1 -F $REMOTE_LOG & t=\$!; while [ ! -s $REMOTE_RC ]; do sleep 5; done"
  remote="$remote; sleep 2; kill \$t; exit \$(cat $REMOTE_RC)"
  if [ "$DRY_RUN" = 1 ]; then
    show gcloud "${TPU[@]}" ssh "$NAME" "${COMMON[@]}" --worker=0 "--command=$remote"
    if [ "$SIM_PREEMPTIONS" -gt 0 ]; then
      SIM_PREEMPTIONS=$((SIM_PREEMPTIONS - 1)); SIM_STATE=PREEMPTED; return 255
    fi
    return 0
  fi
  gcloud "${TPU[@]}" ssh "$NAME" "${COMMON[@]}" --worker=0 "--command=$remote"
}

# Sets TRAIN_RC to worker 0's recorded exit status, or "running".
training_status() {
  local remote="cat $REMOTE_RC 2>/dev/null || echo running"
  if [ "$DRY_RUN" = 1 ]; then
    show gcloud "${TPU[@]}" ssh "$NAME" "${COMMON[@]}" --worker=0 "--command=$remote"
    TRAIN_RC=running; return 0
  fi
  TRAIN_RC="$(gcloud "${TPU[@]}" ssh "$NAME" "${COMMON[@]}" --worker=0 "--command=$remote" 2>/dev/null | tail -n 1 || true)"
  [ -n "$TRAIN_RC" ] || TRAIN_RC=running
}

run_all() {
  local restarts=0 rc
  ensure_vm
  install_workers
  start_training
  while :; do
    rc=0; stream_log || rc=$?
    if [ "$rc" = 0 ]; then info "training finished"; break; fi
    vm_state
    if [ "$STATE" = READY ]; then
      training_status
      if [ "$TRAIN_RC" != running ]; then
        die "zkd-train failed on worker 0 (exit status $TRAIN_RC); the VM is kept: launch/tpu_vm.sh logs --name=$NAME --zone=$ZONE"
      fi
      info "lost the log stream; reconnecting"
    elif [ "$SPOT" = 1 ]; then
      info "$NAME was preempted (state $STATE); recreating it and resuming from $WORKDIR"
      delete_vm
      create_vm
      install_workers
      start_training
    else
      die "$NAME is $STATE; rerun the same command to recreate it and resume from $WORKDIR."
    fi
    restarts=$((restarts + 1))
    [ "$restarts" -le "$MAX_RESTARTS" ] || die "gave up after $MAX_RESTARTS restarts; rerun to resume from $WORKDIR."
    [ "$DRY_RUN" = 1 ] || sleep "${ZKD_TPU_RETRY_SLEEP:-10}"
  done
  [ "$DELETE_AT_END" = 0 ] || delete_vm
}

case "$ACTION" in
  run) run_all ;;
  create) create_vm ;;
  install) install_workers ;;
  train) start_training ;;
  logs) stream_log ;;
  delete) delete_vm ;;
  status) vm_state; echo "$STATE" ;;
esac
