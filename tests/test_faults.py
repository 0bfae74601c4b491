"""Fault injection: ``zkd-train`` killed at named moments, SIGTERM mid-epoch, a full disk.

Each case runs ``zkd-train`` as a subprocess on a tiny run (tests/tiny_runs.py: 2 epochs of 5 steps,
a checkpoint every 2 steps) with ``ZKD_FAULT=<moment>:<step>[:<signal>]``
(``zkd_jax.trainer.faults``: the trainer sends itself the signal there), then reruns the same
command, and asserts that the final parameters and every epoch's logged metrics are bit-identical
to an uninterrupted run's. A full disk is an ``OSError(ENOSPC)`` raised inside orbax's background
writes (patched in the subprocess) of checkpoint 8: one line naming the path, exit code 1, no traceback and no
temporary directory left.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

import tiny_runs
from zkd_jax.io import metrics as metrics_io
from zkd_jax.trainer import train_and_evaluate

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMING = ("epoch_seconds", "eval_seconds", "images_per_sec")

CONFIG = '''
import sys
sys.path.insert(0, {tests!r})
import tiny_runs

def get_config():
    config = tiny_runs.config({teacher!r})
    config.input_pipeline = "device"  # no TensorFlow to import: a quicker start
    return config
'''

#: zkd-train with every orbax write into checkpoint 4 failing as on a full disk.
DISK_FULL = '''
import errno, sys
from orbax.checkpoint._src.path import async_path

def full(real):
    async def write(path, data):
        if "/checkpoints/8" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return await real(path, data)
    return write

async_path.write_text = full(async_path.write_text)
async_path.write_bytes = full(async_path.write_bytes)
from zkd_jax.cli import train
sys.argv = ["zkd-train", *sys.argv[1:]]
train.run()
'''


def write_config(root):
    """``(root/tiny_config.py, teacher)``: the tiny run's config file, distilling from a teacher
    saved in ``root/teacher``."""
    teacher = tiny_runs.save_teacher(root / "teacher")
    config_file = root / "tiny_config.py"
    config_file.write_text(CONFIG.format(tests=str(ROOT / "tests"), teacher=teacher))
    return config_file, teacher


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(config file, the uninterrupted run's workdir)."""
    root = tmp_path_factory.mktemp("faults")
    config_file, teacher = write_config(root)
    config = tiny_runs.config(teacher)
    config.input_pipeline = "device"
    train_and_evaluate(config, root / "straight")
    return config_file, root / "straight"


def zkd_train(config_file, workdir, *, fault: str | None = None, script: str | None = None):
    env = {k: v for k, v in os.environ.items() if k not in ("ZKD_TRACEBACK", "ZKD_FAULT")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    if fault:
        env["ZKD_FAULT"] = fault
    command = ["-c", script] if script else ["-m", "zkd_jax.cli.train"]
    return subprocess.run([sys.executable, *command, f"--config={config_file}",
                           f"--workdir={workdir}"], env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def assert_same_run(straight, workdir) -> None:
    """Final parameters and every epoch's metrics (but timings) bit-identical."""
    tiny_runs.assert_same_state(straight, workdir)
    a, b = (metrics_io.read_metrics(d) for d in (straight, workdir))
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k not in TIMING} == {
            k: v for k, v in rb.items() if k not in TIMING}


def _stderr_lines(proc) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("zkd-train: ")]


def test_faults_in_a_row_then_a_rerun_ends_bit_identical(setup, tmp_path):
    """Killed between the epoch-end checkpoint and metrics.jsonl, then SIGTERM mid-epoch, then a
    full disk: each rerun of the same command resumes; the last one ends as the uninterrupted
    run did."""
    config_file, straight = setup
    workdir = tmp_path / "run"
    killed = zkd_train(config_file, workdir, fault="after_checkpoint_commit:5")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert metrics_io.read_metrics(workdir) == []  # epoch 1's record only in checkpoint 5

    preempted = zkd_train(config_file, workdir, fault="after_step:7:TERM")
    assert preempted.returncode == 75, preempted.stderr[-3000:]
    assert _stderr_lines(preempted) == [f"zkd-train: preempted: checkpoint saved at step 7 in "
                                        f"{workdir}; rerun the same command to resume"]
    assert tiny_runs.final_state(workdir)[0] == 7  # odd: not one of the every-2-steps ones
    assert [r["epoch"] for r in metrics_io.read_metrics(workdir)] == [1]

    full = zkd_train(config_file, workdir, script=DISK_FULL)
    assert full.returncode == 1, full.stderr[-3000:]
    lines = _stderr_lines(full)
    assert len(lines) == 1 and lines[0].startswith("zkd-train: error: "), lines
    assert f"{workdir}/checkpoints" in lines[0] and "No space left on device" in lines[0]
    assert not [p for p in workdir.rglob("*") if "tmp" in p.name], list(workdir.rglob("*tmp*"))

    again = zkd_train(config_file, workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_run(straight, workdir)
