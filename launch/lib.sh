# Helpers shared by the launch scripts (sourced, not run). Needs bash 3.2 or later.

# zkd-train's exit status after a preemption notice (SIGTERM): it saved a checkpoint at the next
# step; rerunning the same command resumes. The launchers' recovery loops rerun it.
PREEMPTED_STATUS=75

# Print one argument as the shell would read it back (single quotes only where needed).
q() {
  case "$1" in
    '' | *[!A-Za-z0-9_./:=@%+,-]*)
      printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")" ;;
    *) printf '%s' "$1" ;;
  esac
}

# The script's header comment, as its --help text.
usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

# --- Cloud TPU accelerator types ("v4-32", "v5litepod-16", "v6e-8", ...). The number after the dash
# counts TensorCores on v2, v3, v4 and v5p (two per chip; v4 and v5p show one JAX device per chip,
# v2 and v3 one per core) and chips on v5e (v5litepod) and v6e (one JAX device per chip). A host of
# a pod slice holds 8 cores (v2-v5p) or 4 chips (v5e, v6e); types up to 8 are one host.
# Each helper prints its answer, or nothing for an unknown type.

tpu_generation() {
  local gen="${1%-*}" n="${1##*-}"
  case "$n" in '' | *[!0-9]*) return 0 ;; esac
  [ "$n" -gt 0 ] || return 0
  case "$gen" in v2 | v3 | v4 | v5p | v6e) echo "$gen" ;; v5litepod | v5e) echo v5e ;; esac
}

# The runtime image of a generation (Cloud TPU "TPU software versions").
tpu_runtime() {
  case "$(tpu_generation "$1")" in
    v6e) echo v2-alpha-tpuv6e ;;
    v5p) echo v2-alpha-tpuv5 ;;
    v5e) echo v2-alpha-tpuv5-lite ;;
    v2 | v3 | v4) echo tpu-ubuntu2204-base ;;
  esac
}

tpu_hosts() {
  local n="${1##*-}"
  case "$(tpu_generation "$1")" in
    v2 | v3 | v4 | v5p) if [ "$n" -le 8 ]; then echo 1; else echo $((n / 8)); fi ;;
    v5e | v6e) if [ "$n" -le 8 ]; then echo 1; else echo $((n / 4)); fi ;;
  esac
}

# Number of JAX devices of the whole slice.
tpu_devices() {
  local n="${1##*-}"
  case "$(tpu_generation "$1")" in
    v2 | v3 | v5e | v6e) echo "$n" ;;
    v4 | v5p) if [ "$n" -ge 2 ]; then echo $((n / 2)); else echo 1; fi ;;
  esac
}

# Text that the devices' device_kind contains ("TPU v4", "TPU v5 lite", "TPU v6 lite", ...).
tpu_device_kind() {
  case "$(tpu_generation "$1")" in
    v2) echo v2 ;; v3) echo v3 ;; v4) echo v4 ;; v5p | v5e) echo v5 ;; v6e) echo v6 ;;
  esac
}

# The zkd-compile topology of a TPU accelerator type (v5litepod-4 -> v5e:2x2, v5p-16 -> v5p:2x2x2,
# v4-8 -> v4:2x2x1, v6e-8 -> v6e:2x4), or nothing where zkd-compile has no topology for it (v2, v3,
# one chip, or a slice larger than the table).
tpu_topology() {
  local chips
  chips="$(tpu_devices "$1")"
  case "$(tpu_generation "$1")" in
    v4 | v5p)
      case "$chips" in
        4) echo "$(tpu_generation "$1"):2x2x1" ;; 8) echo "$(tpu_generation "$1"):2x2x2" ;;
        16) echo "$(tpu_generation "$1"):2x2x4" ;; 32) echo "$(tpu_generation "$1"):2x4x4" ;;
        64) echo "$(tpu_generation "$1"):4x4x4" ;;
      esac ;;
    v5e | v6e)
      case "$chips" in
        4) echo "$(tpu_generation "$1"):2x2" ;; 8) echo "$(tpu_generation "$1"):2x4" ;;
        16) echo "$(tpu_generation "$1"):4x4" ;; 32) echo "$(tpu_generation "$1"):4x8" ;;
        64) echo "$(tpu_generation "$1"):8x8" ;; 128) echo "$(tpu_generation "$1"):8x16" ;;
        256) echo "$(tpu_generation "$1"):16x16" ;;
      esac ;;
  esac
}

# --- Python: whether an interpreter is 3.11 or newer; the first such of python3, python3.13,
# python3.12, python3.11 (printed), or nothing.
python_ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1; }
pick_python() {
  local p
  for p in python3 python3.13 python3.12 python3.11; do
    if command -v "$p" >/dev/null 2>&1 && python_ok "$p"; then echo "$p"; return 0; fi
  done
}

# --- Shell text for the TPU workers' job control. The job runs in its own session (setsid); its
# process group id and the boot id are in the pid file, so a pid file left from before a reboot
# names nothing. Defines zkd_pgid (the live job's group id, or nothing) and zkd_alive G (a process
# that is not a zombie is in group G). $1 = pid file (as the remote shell spells it).
remote_job_fns() {
  printf '%s' "zkd_pgid() { local g b; { read -r g b < $1; } 2>/dev/null || return 0; "
  printf '%s' '[ "$b" = "$(cat /proc/sys/kernel/random/boot_id 2>/dev/null)" ] && echo "$g"; }; '
  printf '%s' 'zkd_alive() { [ -n "$1" ] && ps -eo pgid=,stat= | awk -v g="$1" '
  printf '%s' "'\$1 == g && \$2 !~ /^Z/ { f = 1 } END { exit !f }'; }"
}

# Stop the job's whole process group (the trainer, not only its wrapper): SIGTERM, SIGKILL after
# $3 seconds, and wait until it is gone; then remove the pid file $1 and the exit file $2.
remote_stop() {
  printf '%s' 'g=$(zkd_pgid); if [ -n "$g" ]; then kill -TERM -- -$g 2>/dev/null; i=0; '
  printf '%s' "while zkd_alive \$g && [ \$i -lt $(($3 * 5)) ]; do sleep 0.2; i=\$((i + 1)); done; "
  printf '%s' 'if zkd_alive $g; then kill -KILL -- -$g 2>/dev/null; i=0; '
  printf '%s' 'while zkd_alive $g && [ $i -lt 300 ]; do sleep 0.2; i=$((i + 1)); done; fi; '
  printf '%s' 'if zkd_alive $g; then echo "process group $g survives SIGKILL" >&2; exit 1; fi; fi; '
  printf '%s' "rm -f $1 $2"
}
