"""Issue 16, acceptance 1: one run per workdir.

A real run in a subprocess holds the lock: a second run ends at once naming it and writes nothing;
after the first is killed with SIGKILL (mid-run, after its first checkpoint), a new run takes the
stale lock over and ends bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

import tiny_runs
from zkd_jax.io import lock as workdir_lock
from zkd_jax.train import train_and_evaluate

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ("import sys; import tiny_runs; from zkd_jax.train import train_and_evaluate; "
          "train_and_evaluate(tiny_runs.config(sys.argv[1]), sys.argv[2])")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return tiny_runs.save_teacher(tmp_path_factory.mktemp("teacher") / "resnet8")


def _wait_for(predicate, proc, timeout=300.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_second_run_refused_then_stale_lock_taken_over(tmp_path, teacher_dir, capsys):
    workdir = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, teacher_dir, str(workdir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lock = workdir / workdir_lock.LOCK_FILE
        _wait_for(lock.exists, proc)
        assert json.loads(lock.read_text())["pid"] == proc.pid
        before = sorted(p.name for p in workdir.iterdir())
        with pytest.raises(workdir_lock.WorkdirLockedError,
                           match=rf"workdir {workdir} is in use by pid {proc.pid} on host "):
            train_and_evaluate(tiny_runs.config(teacher_dir), workdir)
        assert "metrics.jsonl" not in before and not (workdir / "metrics.jsonl").exists()
        _wait_for(lambda: (workdir / "checkpoints" / "2" / "zkd_manifest.json").exists()
                  or (workdir / "checkpoints" / "4").exists(), proc)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert lock.exists()  # left behind by the killed run
    summary = train_and_evaluate(tiny_runs.config(teacher_dir), workdir)
    out = capsys.readouterr().out
    assert f"taking over the stale lock of {workdir} left by pid {proc.pid}" in out
    assert summary["finished"] and summary["step"] == tiny_runs.TOTAL_STEPS
    assert not lock.exists()  # released at the end
    straight = tmp_path / "straight"
    train_and_evaluate(tiny_runs.config(teacher_dir), straight)
    tiny_runs.assert_same_state(straight, workdir)


def test_lock_is_released_on_an_exception(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with workdir_lock.locked(tmp_path / "w"):
            assert (tmp_path / "w" / workdir_lock.LOCK_FILE).exists()
            raise RuntimeError("boom")
    assert not (tmp_path / "w" / workdir_lock.LOCK_FILE).exists()
    with pytest.raises(ValueError, match="exists and is not a directory"):
        (tmp_path / "file").write_text("")
        with workdir_lock.locked(tmp_path / "file"):
            pass
