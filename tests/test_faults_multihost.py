"""Preemption of a 2-process run (``jax.distributed`` on CPU, one device per process).

Process 1 alone receives SIGTERM after its first step (``ZKD_FAULT=after_step:1:TERM``): JAX's
preemption service tells process 0, both save a checkpoint at the same step boundary and exit with
75; rerunning the same two commands finishes the run with the parameters and per-epoch metrics of
an uninterrupted run (one process driving two CPU devices: the same mesh and global batches; two
partial sums add up alike in either order).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

import tiny_runs
from cpu_devices import with_devices
from test_faults import ROOT, TIMING, write_config
from zkd_jax.io import checkpoint
from zkd_jax.io import metrics as metrics_io
from test_multihost import SUITE_JAX_SETTINGS, _free_port


def _start(config_file, workdir, devices: int, log, **extra: str) -> subprocess.Popen:
    """``zkd-train`` in the background, its output into the file ``log`` (pipes read one after
    the other could fill up and stall the other process)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ZKD_", "TPU_", "JAX_")) or k in SUITE_JAX_SETTINGS}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=with_devices(devices), PYTHONPATH=str(ROOT),
               **extra)
    return subprocess.Popen([sys.executable, "-m", "zkd_jax.cli.train", f"--config={config_file}",
                             f"--workdir={workdir}"], env=env, stdout=log, stderr=log)


def _two(config_file, workdir, fault: str | None = None) -> list[tuple[int, str]]:
    address = f"127.0.0.1:{_free_port()}"
    logs = [workdir.parent / f"{workdir.name}_{i}_{len(list(workdir.parent.glob('*.log')))}.log"
            for i in range(2)]
    procs = [_start(config_file, workdir, 1, logs[i].open("w"), ZKD_COORDINATOR_ADDRESS=address,
                    ZKD_NUM_PROCESSES="2", ZKD_PROCESS_ID=str(i), JAX_COORDINATOR_BIND_ADDRESS=address,
                    **({"ZKD_FAULT": fault} if fault and i == 1 else {}))
             for i in range(2)]
    out = []
    try:
        for proc, log in zip(procs, logs):
            proc.wait(timeout=120)  # a run of this size takes well under a minute
            out.append((proc.returncode, log.read_text()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return out


def _host_leaves(workdir) -> tuple[int, list[np.ndarray]]:
    """(step, leaves) of the newest checkpoint as NumPy arrays: written by two processes, its
    arrays name devices this one-device process lacks."""
    import jax
    import orbax.checkpoint as ocp

    ckpt = checkpoint.Checkpointer(workdir)
    step = ckpt.latest_step()
    ckpt.close()
    path = workdir / "checkpoints" / str(step) / "state"
    tree = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    return step, jax.tree.leaves(state)


def _assert_same_run(straight, workdir) -> None:
    (step_a, a), (step_b, b) = _host_leaves(straight), _host_leaves(workdir)
    assert step_a == step_b == tiny_runs.TOTAL_STEPS and len(a) == len(b) > 10
    assert all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b))
    ra, rb = (metrics_io.read_metrics(d) for d in (straight, workdir))
    assert [r["epoch"] for r in ra] == [r["epoch"] for r in rb] == [1, 2]
    for x, y in zip(ra, rb):
        assert {k: v for k, v in x.items() if k not in TIMING} == {
            k: v for k, v in y.items() if k not in TIMING}


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    return write_config(tmp_path_factory.mktemp("faults_multihost"))[0]


def test_sigterm_on_one_process_stops_both_at_one_step_and_resumes(config_file, tmp_path):
    straight = tmp_path / "straight"
    log = tmp_path / "straight.log"
    reference = _start(config_file, straight, 2, log.open("w"))
    assert reference.wait(timeout=300) == 0, log.read_text()[-3000:]

    workdir = tmp_path / "run"
    first = _two(config_file, workdir, fault="after_step:1:TERM")
    assert [rc for rc, _ in first] == [75, 75], [err[-3000:] for _, err in first]
    steps = set()
    for _, err in first:
        assert "Traceback" not in err, err[-3000:]
        lines = [ln for ln in err.splitlines() if ln.startswith("zkd-train: ")]
        assert len(lines) == 1, lines
        steps.add(int(re.search(r"preempted: checkpoint saved at step (\d+) ", lines[0])[1]))
    assert len(steps) == 1 and 1 <= min(steps) < tiny_runs.TOTAL_STEPS, steps
    assert _host_leaves(workdir)[0] == min(steps)

    again = _two(config_file, workdir)
    assert [rc for rc, _ in again] == [0, 0], [err[-3000:] for _, err in again]
    assert metrics_io.read_summary(workdir)["finished"], again[0][1][-3000:]
    _assert_same_run(straight, workdir)
