#!/usr/bin/env bash
# Launch zkd-train on a Cloud TPU VM (one host such as v4-8, or a pod slice such as v4-32).
#
#   launch/tpu_vm.sh [run|create|install|train|stop|logs|delete|status] [options] [-- zkd-train flags]
#
#   run (default)  create the VM if needed, install zkd_jax on every worker, start zkd-train on all
#                  workers at once, stream worker 0's log; a trainer that dies without an exit status
#                  or ends with 75 (preempted: SIGTERM, a checkpoint saved at the next step) is
#                  restarted; with --spot a preempted VM is recreated and the run resumes from the
#                  checkpoints in the workdir; with --delete the VM is deleted at the end
#   create         create the VM                      install   copy zkd_jax to every worker
#   train          (re)start zkd-train on every worker (the previous job is stopped first)
#   stop           stop the job on every worker       logs      stream worker 0's log until it ends
#   delete         delete the VM (and its queued resource)      status    print the VM's state
#
# Options:
#   --name NAME               TPU VM name (default: zkd-tpu); with --spot the queued resource is NAME-qr
#   --zone ZONE               e.g. us-central2-b (required; or $ZKD_TPU_ZONE)
#   --project PROJECT         gcloud project (default: gcloud's configured project)
#   --accelerator-type TYPE   v4-8 (one host), v4-32 (pod of 4 hosts), v5p-8, v5litepod-16, v6e-8, ...
#                             (default: v4-8)
#   --version VERSION         TPU runtime (default from the generation: v6e v2-alpha-tpuv6e, v5p
#                             v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite, v4 and older tpu-ubuntu2204-base)
#   --spot                    spot capacity through a queued resource; a preempted VM is recreated
#                             and the run resumes
#   --config CONFIG           e.g. configs/cifar100.py:kd_ls,resnet32x4,resnet8x4 (path inside this checkout)
#   --workdir gs://BUCKET/DIR checkpoints, metrics and summary (must be on GCS: workers are ephemeral)
#   --data-dir gs://BUCKET/tensorflow_datasets   TFDS data directory (exported as TFDS_DATA_DIR and
#                             passed as --config.data_dir)
#   --python VERSION          Python for the workers' virtual environment (default: 3.12)
#   --max-restarts N          give up after N recreations / restarts / reconnections (default: 50)
#   --create-retries N        attempts to create the VM when capacity is short (default: 20, spaced
#                             by $ZKD_TPU_RETRY_SLEEP seconds, default 60)
#   --delete                  delete the VM when the run has finished (run only)
#   --no-preflight            skip the preflight: before asking for capacity, run compiles the config
#                             for the accelerator type on this machine, without a TPU (zkd-compile, the
#                             "tpu" extra: pip install -e '.[tpu]'; $ZKD_COMPILE names another command),
#                             and stops when it does not fit the chips' memory or fails to compile
#   --dry-run                 print every gcloud command instead of running it (nothing is created)
#   -h, --help                this text
#
# Everything after "--" is appended to the zkd-train command line (e.g. -- --config.seed=1).
# Every worker checks first that JAX sees the TPU devices of the accelerator type (JAX_PLATFORMS=tpu:
# no fallback to the CPU) and refuses to train otherwise. Works with bash 3.2 (macOS) and later.
# With --dry-run the VM is modelled, not queried: it starts missing (ZKD_DRY_RUN_STATE=READY: already
# up) and is preempted ZKD_DRY_RUN_PREEMPTIONS times (default 0) while training, which shows the
# commands of the recovery loop.
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
VERSION=""
SPOT=0
CONFIG=""
WORKDIR=""
DATA_DIR=""
PYTHON_VERSION=3.12
MAX_RESTARTS=50
CREATE_RETRIES=20
DELETE_AT_END=0
DRY_RUN=0
PREFLIGHT=1
EXTRA=()
# Seconds: between create attempts, between state polls / reconnections, between the remote log
# loop's liveness checks, and before a job that ignores SIGTERM is killed.
RETRY_SLEEP="${ZKD_TPU_RETRY_SLEEP:-60}"
POLL="${ZKD_TPU_POLL:-30}"
LOG_POLL="${ZKD_TPU_LOG_POLL:-5}"
STOP_WAIT="${ZKD_TPU_STOP_WAIT:-60}"

# What the workers get: the package, the configs, the launch scripts and what pip needs to install.
SHIPPED=(zkd_jax configs launch pyproject.toml README.md)
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
    run | create | install | train | stop | logs | delete | status) ACTION="$1" ;;
    --) shift; EXTRA=("$@"); break ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;  # --opt=value: as --opt value
    --name) NAME="${2:?--name needs a value}"; shift ;;
    --zone) ZONE="${2:?--zone needs a value}"; shift ;;
    --project) PROJECT="${2:?--project needs a value}"; shift ;;
    --accelerator-type) ACCELERATOR_TYPE="${2:?--accelerator-type needs a value}"; shift ;;
    --version) VERSION="${2:?--version needs a value}"; shift ;;
    --spot) SPOT=1 ;;
    --config) CONFIG="${2:?--config needs a value}"; shift ;;
    --workdir) WORKDIR="${2:?--workdir needs a value}"; shift ;;
    --data-dir) DATA_DIR="${2:?--data-dir needs a value}"; shift ;;
    --python) PYTHON_VERSION="${2:?--python needs a value}"; shift ;;
    --max-restarts) MAX_RESTARTS="${2:?--max-restarts needs a value}"; shift ;;
    --create-retries) CREATE_RETRIES="${2:?--create-retries needs a value}"; shift ;;
    --delete) DELETE_AT_END=1 ;;
    --no-preflight) PREFLIGHT=0 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1'; see --help." ;;
  esac
  shift
done

[ -n "$ZONE" ] || die "give the TPU zone with --zone (e.g. --zone=us-central2-b)."
case "$MAX_RESTARTS" in '' | *[!0-9]*) die "--max-restarts takes a whole number." ;; esac
case "$CREATE_RETRIES" in '' | 0 | *[!0-9]*) die "--create-retries takes a positive whole number." ;; esac
[ -n "$(tpu_generation "$ACCELERATOR_TYPE")" ] ||
  die "unknown accelerator type '$ACCELERATOR_TYPE'; use v2-N, v3-N, v4-N, v5p-N, v5litepod-N or v6e-N."
[ -n "$VERSION" ] || VERSION="$(tpu_runtime "$ACCELERATOR_TYPE")"
HOSTS="$(tpu_hosts "$ACCELERATOR_TYPE")"
DEVICES="$(tpu_devices "$ACCELERATOR_TYPE")"
PER_HOST=$((DEVICES / HOSTS))
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

if [ "$DRY_RUN" = 0 ] && ! command -v gcloud >/dev/null 2>&1; then
  die "gcloud not found; install the Google Cloud CLI (https://cloud.google.com/sdk) and run 'gcloud auth login'."
fi

exec 3>&1
TPU=(compute tpus tpu-vm)
QRS=(compute tpus queued-resources)
QR="$NAME-qr"
COMMON=("--zone=$ZONE")
[ -z "$PROJECT" ] || COMMON+=("--project=$PROJECT")
# Keep-alive: a vanished VM ends the ssh session within ~2 minutes instead of hanging it.
SSH=(ssh "$NAME" "${COMMON[@]}" --ssh-flag=-oServerAliveInterval=30 --ssh-flag=-oServerAliveCountMax=4
  --ssh-flag=-oConnectTimeout=30)

# Run (or, with --dry-run, print) one gcloud command.
gc() {
  if [ "$DRY_RUN" = 1 ]; then show gcloud "$@"; return 0; fi
  gcloud "$@"
}
pause() { [ "$DRY_RUN" = 1 ] || sleep "$1"; }

# --- dry-run model: the VM (and its queued resource) missing, READY/ACTIVE after create,
# PREEMPTED (SUSPENDED) ZKD_DRY_RUN_PREEMPTIONS times while training.
SIM_STATE="${ZKD_DRY_RUN_STATE:-MISSING}"
SIM_QR=MISSING
[ "$SIM_STATE" = MISSING ] || SIM_QR=ACTIVE
SIM_PREEMPTIONS="${ZKD_DRY_RUN_PREEMPTIONS:-0}"

# Sets STATE to the state of resource $2 of gcloud group $1 (field $3), or MISSING; $4: dry-run value.
query_state() {
  local group="$1" name="$2" field="$3" sim="$4" err msg
  if [ "$DRY_RUN" = 1 ]; then
    show gcloud compute tpus "$group" describe "$name" "${COMMON[@]}" "--format=value($field)"
    STATE="$sim"; return 0
  fi
  err="$(mktemp)"
  if STATE="$(gcloud compute tpus "$group" describe "$name" "${COMMON[@]}" "--format=value($field)" 2>"$err")"; then
    [ -n "$STATE" ] || STATE=UNKNOWN
  else
    msg="$(tail -n 1 "$err")"
    case "$(cat "$err")" in
      *NOT_FOUND* | *"not found"*) STATE=MISSING ;;
      *) rm -f "$err"; die "cannot query $name ($msg); check 'gcloud auth list' and the project/zone." ;;
    esac
  fi
  rm -f "$err"
}
vm_state() { query_state tpu-vm "$NAME" state "$SIM_STATE"; }
qr_state() { query_state queued-resources "$QR" state.state "$SIM_QR"; QR_STATE="$STATE"; }

# One attempt to create the VM (on demand) or to queue its request (spot); fails with gcloud's
# last error line in CREATE_ERROR.
create_once() {
  local cmd err
  if [ "$SPOT" = 1 ]; then
    cmd=("${QRS[@]}" create "$QR" "${COMMON[@]}" "--node-id=$NAME" "--accelerator-type=$ACCELERATOR_TYPE"
      "--runtime-version=$VERSION" --spot)
  else
    cmd=("${TPU[@]}" create "$NAME" "${COMMON[@]}" "--accelerator-type=$ACCELERATOR_TYPE" "--version=$VERSION")
  fi
  info "creating $NAME ($ACCELERATOR_TYPE, $VERSION, $HOSTS host(s), zone $ZONE$( [ "$SPOT" = 1 ] && echo ", spot, queued resource $QR"))"
  if [ "$DRY_RUN" = 1 ]; then
    show gcloud "${cmd[@]}"; SIM_STATE=READY; SIM_QR=ACTIVE; return 0
  fi
  err="$(mktemp)"
  if gcloud "${cmd[@]}" 2>"$err"; then rm -f "$err"; return 0; fi
  CREATE_ERROR="$(grep -v '^[[:space:]]*$' "$err" | tail -n 1 || true)"
  rm -f "$err"
  return 1
}

delete_vm() {
  if [ "$SPOT" = 1 ]; then
    info "deleting $NAME and its queued resource $QR"
    gc "${QRS[@]}" delete "$QR" "${COMMON[@]}" --force --quiet
  else
    info "deleting $NAME"
    gc "${TPU[@]}" delete "$NAME" "${COMMON[@]}" --quiet
  fi
  SIM_STATE=MISSING; SIM_QR=MISSING
}

# Make sure a READY VM exists: reuse it, wait for it, or (re)create it; sets CREATED=1 when it made
# a new one. $1 = keep: a preempted/terminated/missing on-demand VM ends the script instead.
ensure_vm() {
  local mode="${1:-recreate}" attempts=0 waits=0 start="$SECONDS"
  CREATED=0
  while :; do
    if [ "$SPOT" = 1 ]; then
      qr_state
      case "$QR_STATE" in
        ACTIVE) vm_state ;;
        MISSING)
          attempts=$((attempts + 1))
          if create_once; then CREATED=1; continue; fi
          [ "$attempts" -lt "$CREATE_RETRIES" ] || die "could not queue $QR after $attempts attempts ($CREATE_ERROR); rerun later or try another zone."
          info "create failed ($CREATE_ERROR); attempt $attempts of $CREATE_RETRIES, next in ${RETRY_SLEEP}s"
          pause "$RETRY_SLEEP"; continue ;;
        ACCEPTED | CREATING | WAITING_FOR_RESOURCES | PROVISIONING | SUSPENDING | DELETING)
          info "queued resource $QR is $QR_STATE ($((SECONDS - start))s so far); checking again in ${POLL}s"
          pause "$POLL"; continue ;;
        FAILED | SUSPENDED)  # SUSPENDED: preempted, expected; FAILED counts as a failed attempt
          [ "$QR_STATE" = SUSPENDED ] || attempts=$((attempts + 1))
          [ "$attempts" -lt "$CREATE_RETRIES" ] || die "queued resource $QR is $QR_STATE after $attempts attempts; rerun later or try another zone."
          info "queued resource $QR is $QR_STATE; deleting and queueing it again in ${RETRY_SLEEP}s"
          delete_vm; pause "$RETRY_SLEEP"; continue ;;
        *) die "queued resource $QR is $QR_STATE; inspect it with: gcloud ${QRS[*]} describe $QR --zone=$ZONE" ;;
      esac
    else
      vm_state
    fi
    case "$STATE" in
      READY) return 0 ;;
      CREATING | STARTING | RESTARTING | REPAIRING | REIMAGING | STOPPING)
        waits=$((waits + 1))  # at most 120 polls (an hour at the default 30 s)
        [ "$waits" -le 120 ] || die "$NAME stays $STATE; inspect it with: gcloud ${TPU[*]} describe $NAME --zone=$ZONE"
        info "$NAME is $STATE; waiting (check $waits)"; pause "$POLL" ;;
      STOPPED) info "starting the stopped VM $NAME"; gc "${TPU[@]}" start "$NAME" "${COMMON[@]}"; SIM_STATE=READY ;;
      MISSING | PREEMPTED | TERMINATED | DELETING)
        if [ "$SPOT" = 1 ]; then
          info "$NAME is $STATE; recreating it"; delete_vm
        elif [ "$mode" = keep ]; then
          die "$NAME is $STATE; rerun the same command to recreate it and resume from ${WORKDIR:-the workdir}."
        elif [ "$STATE" = DELETING ]; then
          info "$NAME is being deleted; waiting"; pause "$POLL"
        elif [ "$STATE" != MISSING ]; then
          info "$NAME is $STATE"; delete_vm
        else
          attempts=$((attempts + 1))
          if create_once; then CREATED=1; return 0; fi
          [ "$attempts" -lt "$CREATE_RETRIES" ] || die "could not create $NAME after $attempts attempts ($CREATE_ERROR); rerun later or try another zone."
          info "create failed ($CREATE_ERROR); attempt $attempts of $CREATE_RETRIES, next in ${RETRY_SLEEP}s"
          pause "$RETRY_SLEEP"
        fi ;;
      *) die "$NAME is $STATE; inspect it with: gcloud ${TPU[*]} describe $NAME --zone=$ZONE" ;;
    esac
  done
}

# Copy the package, configs and launch scripts to every worker and install them with jax[tpu].
install_workers() {
  local tarball="${TMPDIR:-/tmp}/zkd_jax-src-$$.tar.gz"
  local tar_cmd=(tar -czf "$tarball" --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info'
    -C "$SOURCE_DIR" "${SHIPPED[@]}")
  if [ "$DRY_RUN" = 1 ]; then show "${tar_cmd[@]}"; else "${tar_cmd[@]}"; fi
  gc "${TPU[@]}" scp "$tarball" "$NAME:$REMOTE_TARBALL" "${COMMON[@]}" --worker=all \
    --scp-flag=-oServerAliveInterval=30 --scp-flag=-oServerAliveCountMax=4
  [ "$DRY_RUN" = 1 ] || rm -f "$tarball"
  local remote="set -e; rm -rf $REMOTE_SRC; mkdir -p $REMOTE_SRC; tar -xzf \$HOME/$REMOTE_TARBALL -C $REMOTE_SRC"
  remote="$remote; export PATH=\$HOME/.local/bin:\$PATH"
  remote="$remote; command -v uv >/dev/null 2>&1 || curl -LsSf https://astral.sh/uv/install.sh | sh"
  remote="$remote; uv venv --allow-existing --python $PYTHON_VERSION $REMOTE_VENV"
  # google-cloud-storage: tensorboardX writes its event files to gs:// with it.
  remote="$remote; uv pip install --python $REMOTE_VENV/bin/python 'jax[tpu]>=0.10,<0.12' \"${REMOTE_SRC}[data]\" google-cloud-storage"
  info "installing zkd_jax on every worker of $NAME"
  gc "${TPU[@]}" "${SSH[@]}" --worker=all "--command=$remote"
}

# Remote job control (launch/lib.sh): zkd_pgid, zkd_alive, and the stop of the previous job.
REMOTE_FNS="$(remote_job_fns "$REMOTE_PID")"
REMOTE_STOP="$(remote_stop "$REMOTE_PID" "$REMOTE_RC" "$STOP_WAIT")"

stop_training() {
  info "stopping the job on every worker of $NAME"
  gc "${TPU[@]}" "${SSH[@]}" --worker=all "--command=$REMOTE_FNS; $REMOTE_STOP"
}

# Start zkd-train on every worker (all at once) after stopping the previous job; every worker first
# checks its devices; the exit status goes to REMOTE_RC.
start_training() {
  local train a
  train="$REMOTE_VENV/bin/zkd-train $(q "--config=$CONFIG") $(q "--workdir=$WORKDIR")"
  local exports="JAX_PLATFORMS=tpu"
  if [ -n "$DATA_DIR" ]; then
    train="$train $(q "--config.data_dir=$DATA_DIR")"
    exports="$exports TFDS_DATA_DIR=$(q "$DATA_DIR")"
  fi
  for a in ${EXTRA[@]+"${EXTRA[@]}"}; do train="$train $(q "$a")"; done
  # A pod needs the multi-host runtime; the trainer reads ZKD_DISTRIBUTED (zkd_jax/distributed.py).
  [ "$HOSTS" = 1 ] || exports="$exports ZKD_DISTRIBUTED=1"
  local check="$REMOTE_VENV/bin/python -m zkd_jax.cli.check_devices --platform=tpu --count=$DEVICES"
  check="$check --per-host=$PER_HOST --kind=$(tpu_device_kind "$ACCELERATOR_TYPE")"
  local job="echo \"\$\$ \$(cat /proc/sys/kernel/random/boot_id 2>/dev/null)\" > $REMOTE_PID"
  job="$job; cd $REMOTE_SRC && export $exports && $check && $train; echo \$? > $REMOTE_RC"
  local remote="$REMOTE_FNS; $REMOTE_STOP; if [ -f $REMOTE_LOG ]; then mv -f $REMOTE_LOG $REMOTE_LOG.1; fi"
  remote="$remote; setsid nohup bash -c $(q "$job") > $REMOTE_LOG 2>&1 < /dev/null &"
  remote="$remote i=0; while [ ! -s $REMOTE_PID ] && [ \$i -lt 100 ]; do sleep 0.1; i=\$((i + 1)); done"
  info "starting zkd-train on every worker of $NAME"
  gc "${TPU[@]}" "${SSH[@]}" --worker=all "--command=$remote"
}

# Stream worker 0's log until its job ends: the job's exit status; 254 when the job is gone without
# one (killed, out of memory, VM restarted); 255 when ssh is lost.
stream_log() {
  local flush=1  # let tail print the last lines
  case "$LOG_POLL" in 0.*) flush="$LOG_POLL" ;; esac
  local remote="$REMOTE_FNS; tail -n +1 -F $REMOTE_LOG & t=\$!"
  remote="$remote; while [ ! -s $REMOTE_RC ] && zkd_alive \"\$(zkd_pgid)\"; do sleep $LOG_POLL; done"
  remote="$remote; sleep $flush; kill \$t 2>/dev/null; if [ -s $REMOTE_RC ]; then exit \"\$(cat $REMOTE_RC)\"; fi"
  remote="$remote; echo '[tpu_vm] zkd-train stopped without an exit status' >&2; exit 254"
  if [ "$DRY_RUN" = 1 ]; then
    show gcloud "${TPU[@]}" "${SSH[@]}" --worker=0 "--command=$remote"
    if [ "$SIM_PREEMPTIONS" -gt 0 ]; then
      SIM_PREEMPTIONS=$((SIM_PREEMPTIONS - 1)); SIM_STATE=PREEMPTED; SIM_QR=SUSPENDED; return 255
    fi
    return 0
  fi
  gcloud "${TPU[@]}" "${SSH[@]}" --worker=0 "--command=$remote"
}

# Sets TRAIN_RC to worker 0's recorded exit status, "running", "gone" (no exit status, no process)
# or "unknown" (worker 0 unreachable).
training_status() {
  local remote="$REMOTE_FNS; if [ -s $REMOTE_RC ]; then cat $REMOTE_RC"
  remote="$remote; elif zkd_alive \"\$(zkd_pgid)\"; then echo running; else echo gone; fi"
  if [ "$DRY_RUN" = 1 ]; then
    show gcloud "${TPU[@]}" "${SSH[@]}" --worker=0 "--command=$remote"
    TRAIN_RC=running; return 0
  fi
  TRAIN_RC="$(gcloud "${TPU[@]}" "${SSH[@]}" --worker=0 "--command=$remote" 2>/dev/null | tail -n 1 || true)"
  [ -n "$TRAIN_RC" ] || TRAIN_RC=unknown
}

# One more recovery (reconnection, restart or recreation), or the end when --max-restarts are used up.
RESTARTS=0
budget() {
  RESTARTS=$((RESTARTS + 1))
  [ "$RESTARTS" -le "$MAX_RESTARTS" ] || die "gave up after $MAX_RESTARTS restarts; rerun to resume from $WORKDIR."
}

# The preflight (before any capacity is asked for): zkd-compile, here and without a TPU, compiles
# the run's programs for the slice's topology with the run's config overrides; a config that does
# not fit the chips' HBM (or does not compile) ends the script with zkd-compile's one line.
preflight() {
  local topology a cmd rc=0
  [ "$PREFLIGHT" = 1 ] || { info "preflight skipped (--no-preflight)"; return 0; }
  topology="$(tpu_topology "$ACCELERATOR_TYPE")"
  if [ -z "$topology" ]; then
    info "no zkd-compile topology for $ACCELERATOR_TYPE; preflight skipped"; return 0
  fi
  read -r -a cmd <<< "${ZKD_COMPILE:-zkd-compile}"
  cmd+=("--config=$CONFIG" "--topology=$topology")
  for a in ${EXTRA[@]+"${EXTRA[@]}"}; do
    case "$a" in --config.*) cmd+=("$a") ;; esac
  done
  info "preflight: compiling $CONFIG for $topology ($ACCELERATOR_TYPE) without a TPU"
  if [ "$DRY_RUN" = 1 ]; then show "${cmd[@]}"; return 0; fi
  command -v "${cmd[0]}" >/dev/null 2>&1 ||
    die "${cmd[0]} not found for the preflight; pip install -e '$SOURCE_DIR[tpu]' here, or pass --no-preflight."
  (cd "$SOURCE_DIR" && "${cmd[@]}") >&2 || rc=$?
  [ "$rc" = 0 ] || die "preflight: zkd-compile refused the config for $topology (exit status $rc, its message above); nothing was created. Fix the config or pass --no-preflight."
}

run_all() {
  local rc
  preflight
  ensure_vm
  install_workers
  start_training
  while :; do
    rc=0; stream_log || rc=$?
    if [ "$rc" = 0 ]; then info "training finished"; break; fi
    vm_state
    if [ "$STATE" = READY ]; then
      training_status
      case "$TRAIN_RC" in
        0) info "training finished (exit status 0, read after the log stream broke)"; break ;;
        "$PREEMPTED_STATUS")
          budget
          info "zkd-train was preempted on worker 0 (exit status 75: it saved a checkpoint); restarting it, resuming from $WORKDIR"
          start_training ;;
        running | unknown)
          budget; info "lost the log stream (worker 0: $TRAIN_RC); reconnecting in ${POLL}s"; pause "$POLL" ;;
        gone)
          budget
          info "zkd-train stopped on worker 0 without an exit status (killed, out of memory or a VM restart); restarting it, resuming from $WORKDIR"
          install_workers; start_training ;;
        *) die "zkd-train failed on worker 0 (exit status $TRAIN_RC); the VM is kept: launch/tpu_vm.sh logs --name=$NAME --zone=$ZONE" ;;
      esac
    else
      budget
      if [ "$SPOT" = 1 ]; then
        info "$NAME is $STATE (preempted?); recreating it if needed and resuming from $WORKDIR"
        ensure_vm
      else
        ensure_vm keep
      fi
      # A VM that only restarted comes back without the job: the next stream sees it gone.
      if [ "$CREATED" = 1 ]; then install_workers; start_training; fi
    fi
  done
  [ "$DELETE_AT_END" = 0 ] || delete_vm
}

case "$ACTION" in
  run) run_all ;;
  create) ensure_vm ;;
  install) install_workers ;;
  train) start_training ;;
  stop) stop_training ;;
  logs) stream_log ;;
  delete) delete_vm ;;
  status)
    if [ "$SPOT" = 1 ]; then qr_state; echo "queued resource $QR: $QR_STATE"; fi
    vm_state; echo "$STATE" ;;
esac
