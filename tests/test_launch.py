"""The launch scripts: syntax, and the gcloud / pip commands they print with --dry-run.

No gcloud, no network: ``--dry-run`` prints every command instead of running it, and the remote
shell snippets the TPU launcher sends to the workers are executed here against a fake ``zkd-train``
in a temporary $HOME, to prove their quoting survives two levels of shells.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "launch" / "tpu_vm.sh"
GPU = ROOT / "launch" / "gpu_local.sh"
CONFIG = "configs/cifar100.py:kd_ls,resnet32x4,resnet8x4"


def _scripts() -> list[Path]:
    found = sorted(ROOT.glob("launch/*.sh")) + sorted(ROOT.glob("*.sh"))
    found += [p for p in (ROOT / ".ci" / "run",) if p.exists()]
    return found


def _run(script: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ZKD_")}
    full_env.update(env or {})
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                          env=full_env, timeout=60, check=False)


def _commands(stdout: str) -> list[list[str]]:
    """The printed commands, each split as a shell would split it."""
    return [shlex.split(line) for line in stdout.splitlines() if line.strip()]


def _gcloud(cmds: list[list[str]], verb: str) -> list[list[str]]:
    """The ``gcloud compute tpus tpu-vm VERB ...`` commands, in order."""
    return [c for c in cmds if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and c[4] == verb]


def _remote(cmd: list[str]) -> str:
    (arg,) = [a for a in cmd if a.startswith("--command=")]
    return arg[len("--command="):]


def _workers(cmd: list[str]) -> str:
    (arg,) = [a for a in cmd if a.startswith("--worker=")]
    return arg[len("--worker="):]


def test_every_script_parses_with_bash_n():
    scripts = _scripts()
    assert TPU in scripts and GPU in scripts
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"


def _tpu_dry_run(accelerator: str, *extra: str, env: dict[str, str] | None = None):
    result = _run(TPU, "run", "--dry-run", "--name=zkd-test", "--zone=us-central2-b",
                  f"--accelerator-type={accelerator}", f"--config={CONFIG}",
                  "--workdir=gs://my-bucket/runs/kd_ls", "--data-dir=gs://my-bucket/tfds",
                  *extra, env=env)
    assert result.returncode == 0, result.stderr
    cmds = _commands(result.stdout)
    assert all(c[0] in ("gcloud", "tar") for c in cmds), result.stdout
    return cmds


def _check_run_command(cmd: list[str], *, pod: bool) -> None:
    assert cmd[5] == "zkd-test" and _workers(cmd) == "all"
    assert "--zone=us-central2-b" in cmd
    job = _remote(cmd)
    inner = shlex.split(job[job.index("nohup bash -c ") + len("nohup bash -c "):])[0]
    train = shlex.split(inner[inner.index("zkd-train"):inner.index(";", inner.index("zkd-train"))])
    assert train[1:] == [f"--config={CONFIG}", "--workdir=gs://my-bucket/runs/kd_ls",
                         "--config.data_dir=gs://my-bucket/tfds", "--config.seed=3"]
    assert "export TFDS_DATA_DIR=gs://my-bucket/tfds" in inner
    assert ("ZKD_DISTRIBUTED=1" in inner) == pod


@pytest.mark.parametrize("accelerator,pod", [("v4-8", False), ("v4-32", True)])
def test_tpu_dry_run_prints_create_install_run_stream_delete(accelerator, pod):
    cmds = _tpu_dry_run(accelerator, "--delete", "--", "--config.seed=3")
    verbs = [c[4] for c in cmds if c[0] == "gcloud"]
    assert verbs == ["describe", "create", "scp", "ssh", "ssh", "ssh", "delete"]

    (create,) = _gcloud(cmds, "create")
    assert create[5] == "zkd-test"
    assert f"--accelerator-type={accelerator}" in create
    assert "--version=tpu-ubuntu2204-base" in create and "--zone=us-central2-b" in create
    assert "--spot" not in create

    (scp,) = _gcloud(cmds, "scp")
    assert _workers(scp) == "all" and scp[6] == "zkd-test:zkd_jax-src.tar.gz"
    (tar,) = [c for c in cmds if c[0] == "tar"]
    assert tar[2] == scp[5] and tar[-3:] == ["-C", str(ROOT), "."]

    install, run, stream = _gcloud(cmds, "ssh")
    assert _workers(install) == "all"
    assert "'jax[tpu]>=0.10,<0.12'" in _remote(install)
    assert '"$HOME/zkd_jax[data]" google-cloud-storage' in _remote(install)
    _check_run_command(run, pod=pod)
    assert _workers(stream) == "0" and "tail" in _remote(stream)

    (delete,) = _gcloud(cmds, "delete")
    assert delete[5] == "zkd-test" and "--quiet" in delete


def test_tpu_spot_pod_recreates_and_resumes_after_preemption():
    cmds = _tpu_dry_run("v4-32", "--spot", "--project=my-proj", "--", "--config.seed=3",
                        env={"ZKD_DRY_RUN_PREEMPTIONS": "2"})
    verbs = [c[4] for c in cmds if c[0] == "gcloud"]
    cycle = ["delete", "create", "scp", "ssh", "ssh", "ssh"]
    assert verbs == ["describe", "create", "scp", "ssh", "ssh", "ssh"] + 2 * (["describe"] + cycle)
    for create in _gcloud(cmds, "create"):
        assert "--spot" in create and "--accelerator-type=v4-32" in create
    assert all("--project=my-proj" in c for c in cmds if c[0] == "gcloud")
    runs = [c for c in _gcloud(cmds, "ssh") if "zkd-train" in _remote(c)]
    assert len(runs) == 3  # the first start and one resume per preemption, same workdir each time
    for run in runs:
        _check_run_command(run, pod=True)


def test_tpu_reuses_a_ready_vm_and_deletes_on_request():
    result = _run(TPU, "--dry-run", "--zone=europe-west4-a", f"--config={CONFIG}",
                  "--workdir=gs://b/w", env={"ZKD_DRY_RUN_STATE": "READY"})
    assert result.returncode == 0, result.stderr
    verbs = [c[4] for c in _commands(result.stdout) if c[0] == "gcloud"]
    assert verbs == ["describe", "scp", "ssh", "ssh", "ssh"]  # no create, no delete
    deleted = _run(TPU, "delete", "--dry-run", "--name=old", "--zone=europe-west4-a")
    assert _commands(deleted.stdout) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "old", "--zone=europe-west4-a", "--quiet"]]


@pytest.mark.parametrize("accelerator,pod", [("v5litepod-8", False), ("v5litepod-16", True),
                                             ("v6e-8", False), ("v5p-8", False), ("v3-32", True)])
def test_tpu_multi_host_runtime_only_on_pods(accelerator, pod):
    result = _run(TPU, "train", "--dry-run", "--zone=z", f"--accelerator-type={accelerator}",
                  "--config=c.py", "--workdir=gs://b/w")
    (run,) = _commands(result.stdout)
    assert ("ZKD_DISTRIBUTED=1" in _remote(run)) == pod


@pytest.mark.parametrize("args,message", [
    (["--config=c.py", "--workdir=gs://b/w"], "--zone"),
    (["--zone=z", "--workdir=gs://b/w"], "--config"),
    (["--zone=z", "--config=c.py", "--workdir=/tmp/w"], "gs://"),
    (["--zone=z", "--config=c.py", "--workdir=gs://b/w", "--data-dir=/data"], "gs://"),
    (["--zone=z", "--bogus"], "unknown argument"),
])
def test_tpu_bad_arguments_end_in_one_message(args, message):
    result = _run(TPU, "--dry-run", *args)
    assert result.returncode == 2 and result.stdout == ""
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_tpu_remote_snippets_run_in_a_real_shell(tmp_path):
    """Runs the start and stream snippets against a fake zkd-train in a temporary $HOME."""
    home = tmp_path / "home"
    (home / "zkd_jax").mkdir(parents=True)
    (home / "zkd_venv" / "bin").mkdir(parents=True)
    fake = home / "zkd_venv" / "bin" / "zkd-train"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$PWD" "$ZKD_DISTRIBUTED" "$TFDS_DATA_DIR"'
                    ' "$@" > "$HOME/args.txt"\necho training-output\nexit 3\n')
    fake.chmod(0o755)
    result = _run(TPU, "--dry-run", "--zone=z", "--accelerator-type=v4-16",
                  "--config=cfg.py:kd_ls,a,b", "--workdir=gs://b/it's here",
                  "--data-dir=gs://b/tfds", "--", "--config.method.temperature=2.0")
    assert result.returncode == 0, result.stderr
    _, run, stream = _gcloud(_commands(result.stdout), "ssh")
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    for cmd in (run, stream):
        syntax = subprocess.run(["bash", "-n", "-c", _remote(cmd)], capture_output=True, text=True)
        assert syntax.returncode == 0, syntax.stderr
    subprocess.run(["bash", "-c", _remote(run)], env=env, check=True, timeout=30)
    deadline = time.time() + 20
    while not (home / "zkd_train.rc").exists() and time.time() < deadline:
        time.sleep(0.1)
    assert (home / "args.txt").read_text().splitlines() == [
        str(home / "zkd_jax"), "1", "gs://b/tfds", "--config=cfg.py:kd_ls,a,b",
        "--workdir=gs://b/it's here", "--config.data_dir=gs://b/tfds",
        "--config.method.temperature=2.0"]
    streamed = subprocess.run(["bash", "-c", _remote(stream)], env=env, capture_output=True,
                              text=True, timeout=30)
    assert streamed.returncode == 3  # the training's exit status comes back through the stream
    assert "training-output" in streamed.stdout


def test_gpu_dry_run_installs_cuda_jax_and_runs_the_config(tmp_path):
    venv = tmp_path / "venv"
    result = _run(GPU, "--dry-run", f"--config={CONFIG}", "--workdir=/tmp/runs/kd_ls",
                  "--gpus=0,1", f"--venv={venv}", "--data-dir=/data/tfds", "--", "--config.seed=1")
    assert result.returncode == 0, result.stderr
    cmds = _commands(result.stdout)
    assert cmds[0] == ["python3", "-m", "venv", str(venv)]
    assert cmds[2] == [f"{venv}/bin/python", "-m", "pip", "install", "-q", "jax[cuda12]>=0.10,<0.12",
                       "-e", f"{ROOT}[data]"]
    run = cmds[-1]
    assert run[:4] == ["env", "CUDA_VISIBLE_DEVICES=0,1", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9",
                       "TFDS_DATA_DIR=/data/tfds"]
    assert run[4:] == [f"{venv}/bin/zkd-train", f"--config={CONFIG}", "--workdir=/tmp/runs/kd_ls",
                       "--config.data_dir=/data/tfds", "--config.seed=1"]

    cuda13 = _run(GPU, "--dry-run", "--config=c.py", "--workdir=w", "--cuda=13", f"--venv={venv}")
    assert any("jax[cuda13]>=0.10,<0.12" in c for c in _commands(cuda13.stdout))
    bad = _run(GPU, "--dry-run", "--config=c.py", "--workdir=w", "--cuda=11")
    assert bad.returncode == 2 and "--cuda" in bad.stderr


def test_gpu_runs_zkd_train_from_an_existing_venv(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "zkd-train"
    fake.write_text('#!/usr/bin/env bash\necho "$PWD|$CUDA_VISIBLE_DEVICES|$*"\n')
    fake.chmod(0o755)
    result = _run(GPU, "--no-install", f"--venv={venv}", "--gpus=1", "--config=c.py:x,y",
                  "--workdir=out dir")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{ROOT}|1|--config=c.py:x,y --workdir=out dir"


FAKE_GCLOUD = r'''#!/usr/bin/env bash
# A stand-in for gcloud: logs its arguments, models one TPU VM in $FAKE_DIR/state.
echo "$*" >> "$FAKE_DIR/log"
state="$(cat "$FAKE_DIR/state")"
case "$4" in
  describe)
    if [ "$state" = MISSING ]; then echo "ERROR: (gcloud) NOT_FOUND: tpu $5" >&2; exit 1; fi
    if [ "$state" = NOAUTH ]; then echo "ERROR: (gcloud) You do not currently have an active account" >&2; exit 1; fi
    echo "$state" ;;
  create) echo READY > "$FAKE_DIR/state" ;;
  delete) echo MISSING > "$FAKE_DIR/state" ;;
  ssh)
    case "$*" in
      *"--worker=0 --command=tail"*)
        n="$(cat "$FAKE_DIR/preemptions")"
        if [ "$n" -gt 0 ]; then
          echo $((n - 1)) > "$FAKE_DIR/preemptions"; echo PREEMPTED > "$FAKE_DIR/state"; exit 255
        fi
        exit "$(cat "$FAKE_DIR/train_rc")" ;;
      *"--worker=0 --command=cat"*) cat "$FAKE_DIR/train_rc" ;;
    esac ;;
esac
exit 0
'''


def _fake_gcloud(tmp_path, *, state="MISSING", preemptions=0, train_rc=0) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    for name, value in (("state", state), ("preemptions", preemptions), ("train_rc", train_rc)):
        (tmp_path / name).write_text(f"{value}\n")
    (tmp_path / "log").write_text("")
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path),
            "ZKD_TPU_RETRY_SLEEP": "0", "TMPDIR": str(tmp_path)}


def _verbs(tmp_path) -> list[str]:
    return [line.split()[3] for line in (tmp_path / "log").read_text().splitlines()]


def test_tpu_spot_loop_against_a_fake_gcloud(tmp_path):
    """The real (not dry-run) code path: a preempted spot VM is recreated and the run resumed."""
    env = _fake_gcloud(tmp_path, preemptions=1)
    result = _run(TPU, "--zone=z", "--spot", f"--config={CONFIG}", "--workdir=gs://b/w", "--delete",
                  env=env)
    assert result.returncode == 0, result.stderr
    cycle = ["scp", "ssh", "ssh", "ssh"]
    assert _verbs(tmp_path) == (["describe", "create", *cycle, "describe", "delete", "create", *cycle,
                                 "delete"])
    assert "preempted" in result.stderr and (tmp_path / "state").read_text().strip() == "MISSING"
    assert not list(tmp_path.glob("zkd_jax-src-*.tar.gz"))  # the local tarball is cleaned up


@pytest.mark.parametrize("case", ["on_demand_preempted", "training_failed", "no_credentials"])
def test_tpu_failures_stop_with_one_message(tmp_path, case):
    env = _fake_gcloud(tmp_path, preemptions=int(case == "on_demand_preempted"),
                       train_rc=3 if case == "training_failed" else 0,
                       state="NOAUTH" if case == "no_credentials" else "MISSING")
    result = _run(TPU, "--zone=z", f"--config={CONFIG}", "--workdir=gs://b/w", env=env)
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    expected = {"on_demand_preempted": "rerun the same command",
                "training_failed": "exit status 3",
                "no_credentials": "gcloud auth list"}[case]
    assert message.startswith("tpu_vm.sh: ") and expected in message
    assert "delete" not in _verbs(tmp_path)  # a failed run keeps the VM for inspection
