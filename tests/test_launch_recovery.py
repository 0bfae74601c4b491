"""launch/tpu_vm.sh's real code path against a fake ``gcloud`` that runs the workers' commands.

The fake models one TPU VM (``node``), its queued resource (``qr``) and the VM's disk (a temporary
``home``): ``ssh --command=...`` runs the command there in a real shell, ``scp`` copies into it, a
preemption or a deletion kills the job and wipes the disk. A fake ``uv`` makes the workers' venv
from a template whose ``zkd-train`` follows a plan, one line per start: ``ok`` (exit 0 after a
moment), ``fail`` (exit 3), ``preempted`` (exit 75: SIGTERM, a checkpoint saved), ``killed`` (the
whole job killed, no exit file) or ``sleep``.
No network, no cloud: what this proves is the launcher's control flow and its remote shell code.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "launch" / "tpu_vm.sh"
CONFIG = "configs/cifar100.py:kd_ls,resnet32x4,resnet8x4"

FAKE_GCLOUD = r'''#!/usr/bin/env bash
F="$FAKE_DIR"; echo "$*" >> "$F/log"
get() { cat "$F/$1" 2>/dev/null; }
take() { local n; n="$(get "$1")"; [ "${n:-0}" -gt 0 ] || return 1; echo $((n - 1)) > "$F/$1"; }
vm_down() {
  local g; g="$(cut -d' ' -f1 "$F/home/zkd_train.pid" 2>/dev/null)"
  [ -z "$g" ] || kill -KILL -- "-$g" 2>/dev/null
  rm -rf "$F/home"; mkdir -p "$F/home"
}
no_capacity() { echo "ERROR: (gcloud.compute.tpus.$3.create) There is no more capacity in the zone" >&2; exit 1; }
cmd=""; for a in "$@"; do case "$a" in --command=*) cmd="${a#--command=}" ;; esac; done
case "$3 $4" in
  "tpu-vm describe")
    s="$(get node)"
    case "$s" in
      MISSING) echo "ERROR: (gcloud) NOT_FOUND: node $5" >&2; exit 1 ;;
      NOAUTH) echo "ERROR: (gcloud) You do not currently have an active account" >&2; exit 1 ;;
      REPAIRING | RESTARTING | CREATING) echo READY > "$F/node" ;;
    esac
    echo "$s" ;;
  "tpu-vm create") if take no_capacity; then no_capacity "$@"; fi; echo READY > "$F/node" ;;
  "tpu-vm delete") vm_down; echo MISSING > "$F/node" ;;
  "queued-resources describe")
    s="$(get qr)"
    case "$s" in
      MISSING) echo "ERROR: (gcloud) NOT_FOUND: queued resource $5" >&2; exit 1 ;;
      WAITING_FOR_RESOURCES) echo ACTIVE > "$F/qr"; echo READY > "$F/node" ;;
    esac
    echo "$s" ;;
  "queued-resources create") if take no_capacity; then no_capacity "$@"; fi; echo WAITING_FOR_RESOURCES > "$F/qr" ;;
  "queued-resources delete") vm_down; echo MISSING > "$F/qr"; echo MISSING > "$F/node" ;;
  "tpu-vm scp") cp "$5" "$F/home/${6#*:}" ;;
  "tpu-vm ssh")
    case "$cmd" in
      *"tail -n +1 -F"*)
        if take preemptions; then
          vm_down; echo PREEMPTED > "$F/node"; [ "$(get qr)" = MISSING ] || echo SUSPENDED > "$F/qr"
          cp "$F/no_capacity_after_preemption" "$F/no_capacity"; exit 255
        fi
        if take drops; then  # the stream breaks; the trainer goes on and finishes
          i=0; while [ ! -s "$F/home/zkd_train.rc" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
          exit 255
        fi ;;
    esac
    HOME="$F/home" exec bash -c "$cmd" ;;
esac
exit 0
'''

FAKE_UV = r'''#!/usr/bin/env bash
if [ "$1" = venv ]; then d="${@: -1}"; mkdir -p "$d/bin"; cp "$FAKE_DIR/venv/"* "$d/bin/"; fi
exit 0
'''

FAKE_TRAINER = r'''#!/usr/bin/env bash
n=$(( $(cat "$FAKE_DIR/starts") + 1 )); echo "$n" > "$FAKE_DIR/starts"
echo "zkd-train start $n: $*" | tee -a "$FAKE_DIR/trainer_args"
case "$(sed -n "${n}p" "$FAKE_DIR/plan")" in
  killed) kill -KILL -- "-$(ps -o pgid= -p $$ | tr -d ' ')" ;;
  fail) exit 3 ;;
  preempted) echo "zkd-train: preempted: checkpoint saved at step 7; rerun the same command to resume" >&2; exit 75 ;;
  sleep) exec sleep 30 ;;
  *) sleep 0.2; echo "zkd-train done"; exit 0 ;;
esac
'''


@pytest.fixture
def fake(tmp_path):
    """Writes the fake gcloud/uv/venv into tmp_path; yields a function that sets the scenario."""
    bin_dir, venv = tmp_path / "bin", tmp_path / "venv"
    bin_dir.mkdir()
    venv.mkdir()
    (tmp_path / "home").mkdir()
    for path, text in ((bin_dir / "gcloud", FAKE_GCLOUD), (bin_dir / "uv", FAKE_UV),
                       (venv / "zkd-train", FAKE_TRAINER), (venv / "python", "#!/bin/sh\nexit 0\n")):
        path.write_text(text)
        path.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path),
           "TMPDIR": str(tmp_path), "ZKD_TPU_RETRY_SLEEP": "0", "ZKD_TPU_POLL": "0",
           "ZKD_TPU_LOG_POLL": "0.1", "ZKD_TPU_STOP_WAIT": "2"}

    def scenario(*, node="MISSING", qr="MISSING", plan=("ok",), preemptions=0, drops=0,
                 no_capacity=0, no_capacity_after_preemption=0) -> dict[str, str]:
        for name, value in (("node", node), ("qr", qr), ("preemptions", preemptions),
                            ("drops", drops), ("no_capacity", no_capacity),
                            ("no_capacity_after_preemption", no_capacity_after_preemption),
                            ("starts", 0)):
            (tmp_path / name).write_text(f"{value}\n")
        (tmp_path / "plan").write_text("".join(f"{line}\n" for line in plan))
        (tmp_path / "log").write_text("")
        return env

    yield scenario
    pid_file = tmp_path / "home" / "zkd_train.pid"  # leave no job behind
    if pid_file.exists() and pid_file.read_text().split():
        try:
            os.killpg(int(pid_file.read_text().split()[0]), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _launch(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ZKD_")}
    full_env.update(env)
    # --no-preflight: recovery is this file's subject; test_launch.py covers the preflight.
    return subprocess.run(["bash", str(TPU), "--zone=z", f"--config={CONFIG}", "--workdir=gs://b/w",
                           "--no-preflight", *args], capture_output=True, text=True, env=full_env,
                          timeout=60, check=False)


def _calls(tmp_path: Path) -> list[str]:
    """The gcloud calls, as ``group:verb`` (``tpu-vm:ssh``, ``queued-resources:create``, ...)."""
    return [":".join(line.split()[2:4]) for line in (tmp_path / "log").read_text().splitlines()]


def _starts(tmp_path: Path) -> int:
    return int((tmp_path / "starts").read_text())


CYCLE = ["tpu-vm:scp", "tpu-vm:ssh", "tpu-vm:ssh", "tpu-vm:ssh"]  # copy, install, start, stream


def test_spot_retries_when_capacity_is_short_and_resumes_after_preemption(fake, tmp_path):
    env = fake(plan=("sleep", "ok"), preemptions=1, no_capacity_after_preemption=2)
    result = _launch(env, "--spot", "--delete")
    assert result.returncode == 0, result.stderr
    queue = ["queued-resources:describe", "queued-resources:create", "queued-resources:describe",
             "queued-resources:describe", "tpu-vm:describe"]
    retry = ["queued-resources:describe", "queued-resources:create"]  # refused: no capacity
    assert _calls(tmp_path) == (
        queue + CYCLE
        + ["tpu-vm:describe", "queued-resources:describe", "queued-resources:delete"]
        + 2 * retry + queue + CYCLE + ["queued-resources:delete"])
    assert "attempt 1 of 20" in result.stderr and "attempt 2 of 20" in result.stderr
    assert "no more capacity" in result.stderr
    assert "zkd-tpu-qr is WAITING_FOR_RESOURCES" in result.stderr  # the progress line
    assert "training finished" in result.stderr
    # The same zkd-train command twice: the second run resumes from the same workdir.
    starts = (tmp_path / "trainer_args").read_text().splitlines()
    assert [s.split(": ", 1)[1] for s in starts] == [f"--config={CONFIG} --workdir=gs://b/w"] * 2
    assert (tmp_path / "qr").read_text().strip() == "MISSING"
    assert not list(tmp_path.glob("zkd_jax-src-*.tar.gz"))  # the local tarball is cleaned up


def test_spot_recreates_a_failed_queued_resource(fake, tmp_path):
    env = fake(qr="FAILED")
    result = _launch(env, "--spot", "--create-retries=3")
    assert result.returncode == 0, result.stderr
    assert _calls(tmp_path)[:3] == ["queued-resources:describe", "queued-resources:delete",
                                    "queued-resources:describe"]
    assert "FAILED; deleting and queueing it again" in result.stderr and _starts(tmp_path) == 1


def test_create_gives_up_after_the_bounded_retries(fake, tmp_path):
    env = fake(no_capacity=5)
    result = _launch(env, "--create-retries=3")
    assert result.returncode == 2
    assert _calls(tmp_path) == ["tpu-vm:describe", "tpu-vm:create"] * 3
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tpu_vm.sh: could not create zkd-tpu after 3 attempts")


def test_a_trainer_killed_without_exit_file_is_restarted(fake, tmp_path):
    env = fake(plan=("killed", "ok"))
    result = _launch(env)
    assert result.returncode == 0, result.stderr
    assert "stopped on worker 0 without an exit status" in result.stderr
    assert _calls(tmp_path) == (["tpu-vm:describe", "tpu-vm:create"] + CYCLE
                                + ["tpu-vm:describe", "tpu-vm:ssh"] + CYCLE)
    assert _starts(tmp_path) == 2


def test_a_preempted_trainer_is_restarted_on_the_same_vm(fake, tmp_path):
    env = fake(plan=("preempted", "preempted", "ok"))
    result = _launch(env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("preempted on worker 0 (exit status 75") == 2
    restart = ["tpu-vm:describe", "tpu-vm:ssh", "tpu-vm:ssh", "tpu-vm:ssh"]  # state, rc, start, log
    assert _calls(tmp_path) == ["tpu-vm:describe", "tpu-vm:create"] + CYCLE + 2 * restart
    assert _starts(tmp_path) == 3 and "training finished" in result.stderr


def test_restarts_of_a_dying_trainer_are_bounded(fake, tmp_path):
    env = fake(plan=("killed", "killed", "killed"))
    result = _launch(env, "--max-restarts=1")
    assert result.returncode == 2 and _starts(tmp_path) == 2
    assert result.stderr.strip().splitlines()[-1].startswith("tpu_vm.sh: gave up after 1 restarts")


def test_exit_0_after_a_dropped_stream_is_success(fake, tmp_path):
    env = fake(drops=1)
    result = _launch(env, "--delete")
    assert result.returncode == 0, result.stderr
    assert "training finished (exit status 0, read after the log stream broke)" in result.stderr
    assert "failed" not in result.stderr and _starts(tmp_path) == 1
    assert _calls(tmp_path)[-3:] == ["tpu-vm:describe", "tpu-vm:ssh", "tpu-vm:delete"]


def test_a_repairing_vm_is_waited_for_not_deleted(fake, tmp_path):
    env = fake(node="REPAIRING")
    result = _launch(env)
    assert result.returncode == 0, result.stderr
    assert _calls(tmp_path) == ["tpu-vm:describe", "tpu-vm:describe"] + CYCLE
    assert "zkd-tpu is REPAIRING" in result.stderr


@pytest.mark.parametrize("case", ["on_demand_preempted", "training_failed", "no_credentials"])
def test_failures_stop_with_one_message(fake, tmp_path, case):
    env = fake(preemptions=int(case == "on_demand_preempted"),
               plan=("fail",) if case == "training_failed" else ("ok",),
               node="NOAUTH" if case == "no_credentials" else "MISSING")
    result = _launch(env)
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    expected = {"on_demand_preempted": "rerun the same command",
                "training_failed": "exit status 3",
                "no_credentials": "gcloud auth list"}[case]
    assert message.startswith("tpu_vm.sh: ") and expected in message
    assert "tpu-vm:delete" not in _calls(tmp_path)  # a failed run keeps the VM for inspection
