"""benchmarks/epoch_time.py measures real trainer epochs on CPU and prints one documented JSON."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "epoch_time.py"
KEYS = {"benchmark", "tag", "config", "dataset", "method", "teacher", "student", "batch",
        "mixed_precision", "steps_per_call", "device_kind", "device_count", "platform", "jax_version", "date",
        "short_epochs",
        "long_epochs", "short_seconds", "long_seconds", "compile_run_seconds", "steps_per_epoch",
        "epoch_seconds", "images_per_sec_epoch", "startup_seconds", "epochs", "total_minutes",
        "last_record"}


def test_epoch_time_on_digits():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    args = ["--config=configs/cifar100.py:kd_ls,resnet8,resnet8", "--dataset=digits",
            "--batch=32", "--config.train_examples=352", "--short=1", "--long=2", "--tag=cpu",
            "--config.steps_per_call=4"]  # the scanned path: 11 steps = 4 + 4 + 1 + 1 + 1
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stdout
    out = json.loads(lines[0])
    assert set(out) == KEYS and out["tag"] == "cpu" and out["method"] == "kd_ls"
    assert out["steps_per_call"] == 4
    assert (out["dataset"], out["steps_per_epoch"], out["epochs"]) == ("digits", 11, 240)
    assert out["epoch_seconds"] == pytest.approx(out["long_seconds"] - out["short_seconds"],
                                                 abs=2e-3)
    # A difference of two timed runs: no sign is asserted (on a loaded machine the 1-epoch run can
    # take longer than the 2-epoch one); the projection's arithmetic is.
    assert out["short_seconds"] > 0 and out["long_seconds"] > 0 and out["startup_seconds"] >= 0
    expected = (out["startup_seconds"] + 240 * out["epoch_seconds"]) / 60
    assert out["total_minutes"] == pytest.approx(expected, abs=0.02)
    record = out["last_record"]  # the long run's last evaluation: epoch 2 through the device feed
    assert (record["epoch"], record["step"], record["test_examples"]) == (2, 22, 297)
