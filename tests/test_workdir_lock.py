"""One run per workdir.

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
from zkd_jax.trainer import train_and_evaluate

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ("import sys; import tiny_runs; from zkd_jax.trainer import train_and_evaluate; "
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
        _wait_for(lambda: workdir_lock.holder(workdir) is not None, proc)
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
    assert workdir_lock.holder(workdir)["pid"] == proc.pid  # left behind by the killed run
    summary = train_and_evaluate(tiny_runs.config(teacher_dir), workdir)
    out = capsys.readouterr().out
    assert f"taking over the stale lock of {workdir} left by pid {proc.pid}" in out
    assert "damaged" not in out  # the newest checkpoint was committed with its manifest
    assert summary["finished"] and summary["step"] == tiny_runs.TOTAL_STEPS
    assert lock.exists() and workdir_lock.holder(workdir) is None  # released, file kept
    straight = tmp_path / "straight"
    train_and_evaluate(tiny_runs.config(teacher_dir), straight)
    tiny_runs.assert_same_state(straight, workdir)


def test_lock_is_released_on_an_exception(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with workdir_lock.locked(tmp_path / "w"):
            assert workdir_lock.holder(tmp_path / "w")["pid"] == os.getpid()
            raise RuntimeError("boom")
    assert workdir_lock.holder(tmp_path / "w") is None
    with pytest.raises(ValueError, match="exists and is not a directory"):
        (tmp_path / "file").write_text("")
        with workdir_lock.locked(tmp_path / "file"):
            pass


ROUNDS, WORKERS = 100, 6


def _contend(workdir, stale, barrier, holders, observed, failures, index):
    """One of WORKERS processes: per round, all call ``acquire`` on a stale lock at once (barrier);
    the winner holds it until every other has tried, so two holders would both be counted."""
    sys.stdout = open(os.devnull, "w")  # the takeover line, once per round
    path = os.path.join(workdir, workdir_lock.LOCK_FILE)
    try:
        for rnd in range(ROUNDS):
            if index == 0:  # a lock file left by a dead process of this host, not flock-ed
                holders.value = 0
                with open(path, "w", encoding="utf-8") as f:
                    f.write(stale)
            barrier.wait()
            taken = None
            try:
                taken = workdir_lock.acquire(workdir)
                with holders.get_lock():
                    holders.value += 1
            except workdir_lock.WorkdirLockedError as err:
                if "is in use by pid" not in str(err):
                    failures.value += 1
            barrier.wait()  # every process has tried; the holder still holds
            if taken is not None:
                observed[rnd] = holders.value
                if workdir_lock.holder(workdir)["pid"] != os.getpid():
                    failures.value += 1
            barrier.wait()
            workdir_lock.release(taken)
            barrier.wait()  # released before the next round's stale file
    except BaseException:  # noqa: BLE001  (a broken barrier: counted, the parent asserts)
        failures.value += 1
        barrier.abort()


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # the children never touch JAX
def test_stale_lock_taken_by_exactly_one_of_many_processes(tmp_path):
    """6 processes x 100 rounds on a stale lock: exactly one holder each round."""
    import multiprocessing
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "then"})
    ctx = multiprocessing.get_context("fork")  # workers need no JAX: no re-import per process
    barrier = ctx.Barrier(WORKERS, timeout=60)
    holders, failures = ctx.Value("i", 0), ctx.Value("i", 0)
    observed = ctx.Array("i", [-1] * ROUNDS)
    procs = [ctx.Process(target=_contend, args=(str(tmp_path), stale, barrier, holders, observed,
                                                failures, i)) for i in range(WORKERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * WORKERS
    assert failures.value == 0
    assert list(observed) == [1] * ROUNDS  # one holder, and it was the only one, every round
    assert workdir_lock.holder(tmp_path) is None
