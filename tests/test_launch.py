"""The launch scripts: syntax, and the gcloud / pip commands they print with --dry-run.

No gcloud, no network: ``--dry-run`` prints every command instead of running it, and the remote
shell snippets the TPU launcher sends to the workers are executed here against a fake ``zkd-train``
in a temporary $HOME, to prove their quoting survives two levels of shells.
"""

from __future__ import annotations

import os
import shlex
import signal
import shutil
import subprocess
import sys
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


def _job(cmd: list[str]) -> str:
    """The job that the start command runs in its own session (the argument of ``bash -c``)."""
    remote = _remote(cmd)
    return shlex.split(remote[remote.index("nohup bash -c ") + len("nohup bash -c "):])[0]


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
    assert all(c[0] in ("gcloud", "tar", "zkd-compile") for c in cmds), result.stdout
    return cmds


def _check_run_command(cmd: list[str], *, pod: bool) -> None:
    assert cmd[5] == "zkd-test" and _workers(cmd) == "all"
    assert "--zone=us-central2-b" in cmd
    inner = _job(cmd)
    train = shlex.split(inner[inner.index("zkd-train"):inner.index(";", inner.index("zkd-train"))])
    assert train[1:] == [f"--config={CONFIG}", "--workdir=gs://my-bucket/runs/kd_ls",
                         "--config.data_dir=gs://my-bucket/tfds", "--config.seed=3"]
    exports = shlex.split(inner[inner.index("export "):inner.index(" && ", inner.index("export "))])
    assert exports[:3] == ["export", "JAX_PLATFORMS=tpu", "TFDS_DATA_DIR=gs://my-bucket/tfds"]
    assert ("ZKD_DISTRIBUTED=1" in exports) == pod
    # The device check runs first, with JAX_PLATFORMS=tpu, and zkd-train only if it passes.
    assert inner.index("zkd_jax.cli.check_devices --platform=tpu") < inner.index("zkd-train")
    assert "setsid nohup bash -c " in _remote(cmd)


SSH_KEEPALIVE = ["--ssh-flag=-oServerAliveInterval=30", "--ssh-flag=-oServerAliveCountMax=4"]
SHIPPED = ["zkd_jax", "configs", "launch", "pyproject.toml", "README.md"]


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
    # Only what the workers need is shipped (no runs/, teachers/, .git, virtual environments).
    assert tar[2] == scp[5] and tar[-7:] == ["-C", str(ROOT), *SHIPPED]

    install, run, stream = _gcloud(cmds, "ssh")
    assert _workers(install) == "all"
    assert "'jax[tpu]>=0.10,<0.12'" in _remote(install)
    assert '"$HOME/zkd_jax[data]" google-cloud-storage' in _remote(install)
    _check_run_command(run, pod=pod)
    assert _workers(stream) == "0" and "tail" in _remote(stream)
    for ssh in (install, run, stream):
        assert all(flag in ssh for flag in SSH_KEEPALIVE)

    (delete,) = _gcloud(cmds, "delete")
    assert delete[5] == "zkd-test" and "--quiet" in delete


@pytest.mark.parametrize("accelerator,runtime,devices,per_host,kind", [
    ("v6e-8", "v2-alpha-tpuv6e", 8, 8, "v6"), ("v6e-16", "v2-alpha-tpuv6e", 16, 4, "v6"),
    ("v5p-8", "v2-alpha-tpuv5", 4, 4, "v5"), ("v5litepod-16", "v2-alpha-tpuv5-lite", 16, 4, "v5"),
    ("v5litepod-8", "v2-alpha-tpuv5-lite", 8, 8, "v5"), ("v4-8", "tpu-ubuntu2204-base", 4, 4, "v4"),
    ("v4-32", "tpu-ubuntu2204-base", 16, 4, "v4"), ("v3-8", "tpu-ubuntu2204-base", 8, 8, "v3"),
])
def test_tpu_runtime_and_device_check_follow_the_generation(accelerator, runtime, devices,
                                                             per_host, kind):
    cmds = _tpu_dry_run(accelerator)
    (create,) = _gcloud(cmds, "create")
    assert f"--version={runtime}" in create
    check = _job(_gcloud(cmds, "ssh")[1])
    assert (f"zkd_jax.cli.check_devices --platform=tpu --count={devices} --per-host={per_host} "
            f"--kind={kind} && ") in check
    if accelerator == "v6e-8":
        overridden = _tpu_dry_run(accelerator, "--version=my-runtime")
        assert "--version=my-runtime" in _gcloud(overridden, "create")[0]


def _queued(cmds: list[list[str]], verb: str) -> list[list[str]]:
    return [c for c in cmds if c[:4] == ["gcloud", "compute", "tpus", "queued-resources"]
            and c[4] == verb]


def test_tpu_spot_uses_queued_resources_and_resumes_after_preemption():
    cmds = _tpu_dry_run("v6e-16", "--spot", "--project=my-proj", "--", "--config.seed=3",
                        env={"ZKD_DRY_RUN_PREEMPTIONS": "2"})
    names = [f"{c[3]}:{c[4]}" for c in cmds if c[0] == "gcloud"]
    queue = ["queued-resources:describe", "queued-resources:create", "queued-resources:describe",
             "tpu-vm:describe"]
    cycle = ["tpu-vm:scp", "tpu-vm:ssh", "tpu-vm:ssh", "tpu-vm:ssh"]
    recover = ["tpu-vm:describe", "queued-resources:describe", "queued-resources:delete"]
    assert names == queue + cycle + 2 * (recover + queue + cycle)
    for create in _queued(cmds, "create"):
        assert create[5] == "zkd-test-qr" and "--node-id=zkd-test" in create and "--spot" in create
        assert "--accelerator-type=v6e-16" in create and "--runtime-version=v2-alpha-tpuv6e" in create
    for delete in _queued(cmds, "delete"):
        assert delete[5] == "zkd-test-qr" and "--force" in delete and "--quiet" in delete
    assert all("--project=my-proj" in c for c in cmds if c[0] == "gcloud")
    assert not _gcloud(cmds, "create")  # no plain tpu-vm create for spot
    runs = [c for c in _gcloud(cmds, "ssh") if "nohup bash -c" in _remote(c)]
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
    assert ("ZKD_DISTRIBUTED=1" in _job(run)) == pod


@pytest.mark.parametrize("args,message", [
    (["--config=c.py", "--workdir=gs://b/w"], "--zone"),
    (["--zone=z", "--workdir=gs://b/w"], "--config"),
    (["--zone=z", "--config=c.py", "--workdir=/tmp/w"], "gs://"),
    (["--zone=z", "--config=c.py", "--workdir=gs://b/w", "--data-dir=/data"], "gs://"),
    (["--zone=z", "--bogus"], "unknown argument"),
    (["--zone=z", "--accelerator-type=v9-8"], "unknown accelerator type"),
    (["--zone=z", "--create-retries=0"], "--create-retries"),
])
def test_tpu_bad_arguments_end_in_one_message(args, message):
    result = _run(TPU, "--dry-run", *args)
    assert result.returncode == 2 and result.stdout == ""
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def _fake_worker(tmp_path: Path, trainer: str, python: str = "exit 0") -> tuple[Path, dict]:
    """A worker's $HOME with the source tree and a venv whose zkd-train and python are scripts."""
    home = tmp_path / "home"
    (home / "zkd_jax").mkdir(parents=True)
    (home / "zkd_venv" / "bin").mkdir(parents=True)
    for name, body in (("zkd-train", trainer), ("python", python)):
        path = home / "zkd_venv" / "bin" / name
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(0o755)
    return home, {"HOME": str(home), "PATH": os.environ["PATH"]}


def _wait_for(path: Path, lines: int = 1, timeout: float = 20.0) -> list[str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= lines:
            return path.read_text().splitlines()
        time.sleep(0.05)
    raise AssertionError(f"{path} never got {lines} line(s)")


def test_tpu_remote_snippets_run_in_a_real_shell(tmp_path):
    """Runs the start and stream snippets against a fake zkd-train in a temporary $HOME."""
    home, env = _fake_worker(tmp_path, 'printf "%s\\n" "$PWD" "$ZKD_DISTRIBUTED" "$TFDS_DATA_DIR"'
                             ' "$JAX_PLATFORMS" "$@" > "$HOME/args.txt"\necho training-output\nexit 3')
    result = _run(TPU, "--dry-run", "--zone=z", "--accelerator-type=v4-16",
                  "--config=cfg.py:kd_ls,a,b", "--workdir=gs://b/it's here",
                  "--data-dir=gs://b/tfds", "--", "--config.method.temperature=2.0")
    assert result.returncode == 0, result.stderr
    _, run, stream = _gcloud(_commands(result.stdout), "ssh")
    for cmd in (run, stream):
        syntax = subprocess.run(["bash", "-n", "-c", _remote(cmd)], capture_output=True, text=True)
        assert syntax.returncode == 0, syntax.stderr
    subprocess.run(["bash", "-c", _remote(run)], env=env, check=True, timeout=30)
    _wait_for(home / "zkd_train.rc")
    assert (home / "args.txt").read_text().splitlines() == [
        str(home / "zkd_jax"), "1", "gs://b/tfds", "tpu", "--config=cfg.py:kd_ls,a,b",
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


def _gpu_venv(tmp_path: Path, trainer: str) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "zkd-train"
    fake.write_text("#!/usr/bin/env bash\n" + trainer)
    fake.chmod(0o755)
    return venv


def test_gpu_reruns_a_preempted_trainer(tmp_path):
    """Exit status 75 (preempted, checkpoint saved) reruns the same command, within the bound."""
    starts = tmp_path / "starts"
    venv = _gpu_venv(tmp_path, f'echo "$*" >> {starts}\n'
                               f'[ "$(wc -l < {starts})" -ge 3 ] || exit 75\necho done\n')
    result = _run(GPU, "--no-install", f"--venv={venv}", "--config=c.py", "--workdir=w")
    assert result.returncode == 0, result.stderr
    assert starts.read_text().splitlines() == ["--config=c.py --workdir=w"] * 3
    assert result.stderr.count("preempted (exit status 75, checkpoint saved); resuming") == 2
    starts.unlink()
    bounded = _run(GPU, "--no-install", f"--venv={venv}", "--config=c.py", "--workdir=w",
                   "--max-restarts=1")
    assert bounded.returncode == 75 and len(starts.read_text().splitlines()) == 2
    assert "after --max-restarts=1 restarts" in bounded.stderr


def test_gpu_passes_sigterm_on_and_exits_75_without_rerunning(tmp_path):
    """A scheduler's SIGTERM to the script reaches zkd-train; its 75 ends the script (requeue)."""
    starts, ready = tmp_path / "starts", tmp_path / "ready"
    venv = _gpu_venv(tmp_path, f'echo start >> {starts}\n'
                               f'trap \'echo saved; exit 75\' TERM\ntouch {ready}\n'
                               'for i in $(seq 300); do sleep 0.1; done\nexit 0\n')
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    proc = subprocess.Popen(["bash", str(GPU), "--no-install", f"--venv={venv}", "--config=c.py",
                             "--workdir=w"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for _ in range(300):
        if ready.exists():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, err
    assert "saved" in out and starts.read_text().splitlines() == ["start"]


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (nobody may reap it here)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_tpu_a_new_start_stops_the_old_trainer_first(tmp_path):
    """Start the job twice on one "worker": the first trainer (not only its wrapper) is gone first."""
    trainer = ('for p in $(cat "$HOME/pids" 2>/dev/null); do\n'
               '  if [ "$(ps -o stat= -p "$p" 2>/dev/null | cut -c1)" = S ]; then echo "$p" >> "$HOME/overlap"; fi\n'
               'done\n'
               'echo $$ >> "$HOME/pids"\n'
               # the second trainer ignores SIGTERM: the third start must SIGKILL its group
               '[ "$(wc -l < "$HOME/pids")" != 2 ] || trap "" TERM\n'
               'exec sleep 60')
    home, env = _fake_worker(tmp_path, trainer)
    result = _run(TPU, "train", "--dry-run", "--zone=z", "--config=c.py", "--workdir=gs://b/w",
                  env={"ZKD_TPU_STOP_WAIT": "1"})
    (cmd,) = _commands(result.stdout)
    remote = _remote(cmd)
    pids: list[int] = []
    try:
        for n in (1, 2, 3):
            subprocess.run(["bash", "-c", remote], env=env, check=True, timeout=30)
            pids = [int(p) for p in _wait_for(home / "pids", n)]
            assert _alive(pids[-1])
            assert not any(_alive(p) for p in pids[:-1])  # every earlier trainer is gone
            pgid = int((home / "zkd_train.pid").read_text().split()[0])
            assert os.getpgid(pids[-1]) == pgid  # the pid file names the trainer's own group
        assert not (home / "overlap").exists()  # no trainer saw an earlier one still running
        assert (home / "zkd_train.log.1").exists()  # the previous log is kept once
        stop = _run(TPU, "stop", "--dry-run", "--zone=z")
        (cmd,) = _commands(stop.stdout)
        subprocess.run(["bash", "-c", _remote(cmd)], env=env, check=True, timeout=30)
        assert not _alive(pids[-1]) and not (home / "zkd_train.pid").exists()
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, 9)


def test_tpu_job_refuses_to_train_without_a_tpu(tmp_path):
    """The job's device check, with the real JAX of this machine: no TPU, one line, no training."""
    python = f'exec {shlex.quote(sys.executable)} "$@"'
    home, env = _fake_worker(tmp_path, 'touch "$HOME/trained"', python=python)
    (home / "zkd_jax").rmdir()
    (home / "zkd_jax").symlink_to(ROOT)  # the job runs the check from the source tree
    result = _run(TPU, "train", "--dry-run", "--zone=z", "--accelerator-type=v6e-8",
                  "--config=c.py", "--workdir=gs://b/w")
    (cmd,) = _commands(result.stdout)
    subprocess.run(["bash", "-c", _remote(cmd)], env=env, check=True, timeout=30)
    assert _wait_for(home / "zkd_train.rc", timeout=60) == ["1"]
    assert not (home / "trained").exists()
    (line,) = (home / "zkd_train.log").read_text().strip().splitlines()
    assert line.startswith("zkd-check-devices: ") and "TPU" in line


def _python_path(tmp_path: Path, *pythons: tuple[str, str]) -> str:
    """A PATH with only the tools gpu_local.sh needs and fake interpreters (name, version)."""
    bin_dir = tmp_path / "pybin"
    bin_dir.mkdir()
    for tool in ("dirname", "sed", "head"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    for name, version in pythons:
        ok = int(tuple(map(int, version.split(".")[:2])) >= (3, 11))
        (bin_dir / name).write_text(f'#!/bin/sh\n[ "$1" = --version ] && echo "Python {version}" '
                                    f'&& exit 0\nexit {1 - ok}\n')
        (bin_dir / name).chmod(0o755)
    return str(bin_dir)


@pytest.mark.parametrize("pythons,expected", [
    ([("python3", "3.10.12"), ("python3.12", "3.12.3")], "python3.12"),
    ([("python3", "3.10.12"), ("python3.11", "3.11.9")], "python3.11"),
    ([("python3", "3.12.3")], "python3"),
    ([("python3", "3.10.12")], None),
])
def test_gpu_picks_a_python_of_at_least_3_11_or_refuses(tmp_path, pythons, expected):
    env = {"PATH": _python_path(tmp_path, *pythons)}
    result = subprocess.run([shutil.which("bash"), str(GPU), "--dry-run", "--config=c.py",
                             "--workdir=w", f"--venv={tmp_path / 'venv'}"], capture_output=True,
                            text=True, env=env, timeout=30, check=False)
    if expected is None:
        assert result.returncode == 2 and result.stdout == ""
        (line,) = result.stderr.strip().splitlines()
        assert "python3 is 3.10.12" in line and ">= 3.11" in line
    else:
        assert result.returncode == 0, result.stderr
        assert _commands(result.stdout)[0] == [expected, "-m", "venv", str(tmp_path / "venv")]
    old = subprocess.run([shutil.which("bash"), str(GPU), "--dry-run", "--config=c.py", "--workdir=w",
                          f"--venv={tmp_path / 'venv'}", "--python=python3"], capture_output=True,
                         text=True, env=env, timeout=30, check=False)
    assert (old.returncode == 2) == (pythons[0][1] < "3.11")


@pytest.mark.parametrize("accelerator,topology", [
    ("v4-8", "v4:2x2x1"), ("v5p-16", "v5p:2x2x2"), ("v5litepod-4", "v5e:2x2"), ("v6e-8", "v6e:2x4")])
def test_tpu_preflight_compiles_for_the_slice_before_asking_for_capacity(accelerator, topology):
    cmds = _tpu_dry_run(accelerator, "--", "--config.seed=3", "--config.mixed_precision=True",
                        "--verbose")
    assert cmds[0] == ["zkd-compile", f"--config={CONFIG}", f"--topology={topology}",
                       "--config.seed=3", "--config.mixed_precision=True"]
    assert [c[0] for c in cmds].count("zkd-compile") == 1
    skipped = _tpu_dry_run(accelerator, "--no-preflight")
    assert skipped[0][0] == "gcloud" and all(c[0] != "zkd-compile" for c in skipped)


def test_tpu_preflight_is_skipped_where_zkd_compile_has_no_topology():
    result = _run(TPU, "run", "--dry-run", "--zone=z", "--accelerator-type=v3-8",
                  f"--config={CONFIG}", "--workdir=gs://b/w")
    assert result.returncode == 0, result.stderr
    assert "no zkd-compile topology for v3-8" in result.stderr
    assert all(c[0] != "zkd-compile" for c in _commands(result.stdout))


def test_tpu_a_refused_preflight_creates_nothing(tmp_path):
    """A config zkd-compile refuses ends the script before gcloud is ever called."""
    log = tmp_path / "gcloud.log"
    (tmp_path / "gcloud").write_text(f"#!/bin/sh\necho \"$*\" >> {log}\n")
    (tmp_path / "refuse").write_text(
        "#!/bin/sh\necho \"zkd-compile: error: train_step needs 20.00 GiB\" >&2\nexit 1\n")
    for f in ("gcloud", "refuse"):
        (tmp_path / f).chmod(0o755)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "ZKD_COMPILE": str(tmp_path / "refuse")}
    result = _run(TPU, "run", "--zone=z", "--accelerator-type=v5litepod-4", f"--config={CONFIG}",
                  "--workdir=gs://b/w", env=env)
    assert result.returncode == 2
    assert "train_step needs 20.00 GiB" in result.stderr
    assert "preflight: zkd-compile refused the config for v5e:2x2 (exit status 1" in result.stderr
    assert not log.exists()
