"""benchmarks/train_step.py runs on CPU and prints one JSON object with the documented keys.

Issue 18: ``--yardstick`` times the plain Flax/optax step of ``benchmarks/yardstick.py`` in the same
run; started from the same student variables on the same batch, its first loss equals the project
step's to float rounding (what makes the ratio fair). ``--profile`` writes a trace of 2 steps.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "train_step.py"
SMALL = ["--config=configs/cifar100.py:kd_ls,resnet8,resnet8", "--batch=8", "--steps=2",
         "--repeats=2"]
KEYS = {"benchmark", "tag", "config", "method", "teacher", "student", "batch", "students",
        "mixed_precision", "students_form", "device_kind", "device_count", "platform",
        "jax_version", "date", "steps", "repeats", "compile_seconds", "ms_per_step",
        "ms_per_step_rounds", "dispatch_ms_per_step", "images_per_sec",
        "images_per_sec_per_student", "teacher_ms_per_step", "yardstick_ms_per_step",
        "yardstick_ms_per_step_rounds", "ratio_to_yardstick", "loss_first_step",
        "yardstick_loss_first_step", "profile", "projection"}
PROJECTION_KEYS = {"dataset", "steps_per_epoch", "train_seconds_per_epoch", "input_ms_per_step",
                   "input_seconds_per_epoch", "eval_images", "eval_batch", "eval_batches",
                   "eval_ms_per_batch", "eval_seconds_per_epoch", "epoch_seconds", "epochs",
                   "total_minutes"}


def _run(*args: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(SCRIPT), *SMALL, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stdout  # exactly one JSON object on stdout
    return json.loads(lines[0])


def test_single_student_json(tmp_path):
    out = _run("--noepoch_projection", "--tag=fp32_b8", "--yardstick",
               f"--profile={tmp_path / 'prof'}", "--profile_steps=2")
    assert set(out) == KEYS and out["tag"] == "fp32_b8"
    assert out["config"] == "configs/cifar100.py:kd_ls,resnet8,resnet8"
    assert (out["batch"], out["students"], out["students_form"]) == (8, 1, None)
    assert out["platform"] == "cpu" and out["mixed_precision"] is False
    assert len(out["ms_per_step_rounds"]) == 2 and out["ms_per_step"] > 0
    assert out["images_per_sec"] == pytest.approx(8 / (out["ms_per_step"] / 1e3), rel=1e-3,
                                                  abs=0.05)  # rounded to 0.1 img/s
    assert out["projection"] is None and out["teacher_ms_per_step"] is None
    assert 0 < out["dispatch_ms_per_step"]
    # the yardstick: same variables and batch, so the same first loss to float rounding
    assert out["yardstick_loss_first_step"] == pytest.approx(out["loss_first_step"], rel=1e-5)
    assert len(out["yardstick_ms_per_step_rounds"]) == 2 and out["yardstick_ms_per_step"] > 0
    assert out["ratio_to_yardstick"] == pytest.approx(
        out["yardstick_ms_per_step"] / out["ms_per_step"], rel=1e-3)
    # --profile: a trace of 2 steps on disk
    assert out["profile"] == str(tmp_path / "prof")
    traces = list((tmp_path / "prof").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0


def test_two_students_mixed_precision_with_projection():
    out = _run("--students=2", "--mixed_precision", "--eval_batch=16")
    assert set(out) == KEYS and (out["students"], out["students_form"]) == (2, "loop")
    assert out["mixed_precision"] is True
    assert out["yardstick_ms_per_step"] is None and out["ratio_to_yardstick"] is None
    assert out["profile"] is None and out["loss_first_step"] > 0
    # Both are rounded to 0.1 img/s in the JSON: equal up to that rounding (0.05 + 2 x 0.05).
    assert out["images_per_sec"] == pytest.approx(2 * out["images_per_sec_per_student"],
                                                  abs=0.15)
    assert 0 < out["teacher_ms_per_step"] and 0 < out["dispatch_ms_per_step"]
    proj = out["projection"]
    assert set(proj) == PROJECTION_KEYS
    assert (proj["steps_per_epoch"], proj["eval_images"]) == (6250, 10000)
    assert proj["eval_batches"] == 625
    assert proj["epochs"] == 240 and proj["input_ms_per_step"] > 0
    expected = proj["train_seconds_per_epoch"] + proj["input_seconds_per_epoch"] + proj[
        "eval_seconds_per_epoch"]
    assert proj["epoch_seconds"] == pytest.approx(expected, abs=2e-3)
    assert proj["total_minutes"] == pytest.approx(240 * proj["epoch_seconds"] / 60, abs=0.01)

