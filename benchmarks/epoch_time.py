"""Measures whole epochs of ``zkd-train`` (input, steps, evaluation, checkpoints) and projects a run.

Issue 7's last target: a full 240-epoch CIFAR-100 run, on-device input path and per-epoch
evaluation included, projected from a measured epoch. This runs the real trainer
(``zkd_jax.trainer.train_and_evaluate``) three times in one process, each in a fresh workdir, with
``input_pipeline="device"``:

1. a warm-up run of ``--short`` epochs (compiles the step, the feed, the eval step; checkpoints);
2. the same run again, timed: ``T_short`` (startup + ``short`` epochs, compiled programs loaded
   from JAX's persistent compilation cache, which this script turns on in its temporary folder);
3. a run of ``--long`` epochs, timed: ``T_long``.

One epoch is ``(T_long - T_short) / (long - short)``: everything an epoch does (781 steps for
CIFAR-100 at batch 64 with their host loop, the 10,000-image evaluation, metrics, TensorBoard,
``summary.json``, the orbax checkpoint) and nothing a run does once (startup, compilation).
``total_minutes`` = startup + ``config.epochs`` (240) epochs. The LR schedule is the config's (the
runs stop early through ``max_steps``), the teacher has random weights saved in the zkd-convert
format (a converted teacher costs the same), and the data is ``--dataset`` (default
``synthetic_cifar100``: random images of CIFAR-100's shapes, no download, no TensorFlow).

    python benchmarks/epoch_time.py --config=configs/cifar100.py:kd_ls,resnet32x4,resnet8x4 \
        [--mixed_precision] [--short=1] [--long=3] [--dataset=synthetic_cifar100] \
        [--config.steps_per_call=8]   # any config field can be overridden this way
        [--profile=DIR [--profile_steps=3]]

``--profile=DIR``: the warm-up run (not timed) traces ``--profile_steps`` steps from its third on
(``zkd-train --config.profile_steps``); the trace is copied to ``DIR/plugins/profile/<run>/``.

    # CPU smoke test (digits: 23 steps per epoch at batch 64):
    python benchmarks/epoch_time.py --config=configs/demo.py:kd_ls --dataset=digits --batch=64

Prints ONE JSON object (keys: see ``docs/measurements.md``, "Training step throughput").
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import time

import bench_flags
import jax
import ml_collections
from absl import app, flags
from etils import epath

_DATASET = flags.DEFINE_string("dataset", "synthetic_cifar100",
                               "zkd_jax.data name; it must fit the on-device path.")
_SHORT = flags.DEFINE_integer("short", 1, "Epochs of the short run.")
_LONG = flags.DEFINE_integer("long", 3, "Epochs of the long run (> short).")

KEYS = ("benchmark", "tag", "config", "dataset", "method", "teacher", "student", "batch",
        "mixed_precision", "steps_per_call", "device_kind", "device_count", "platform", "jax_version", "date",
        "short_epochs", "long_epochs", "short_seconds", "long_seconds", "compile_run_seconds",
        "steps_per_epoch", "epoch_seconds", "images_per_sec_epoch", "startup_seconds", "epochs",
        "total_minutes", "last_record")


def save_random_teacher(config, directory: epath.Path) -> str:
    """Random teacher variables of ``config.teacher.arch`` in the zkd-convert format."""
    from zkd_jax import data, models
    from zkd_jax.io import torch_weights as convert
    from zkd_jax.step import init_variables
    from zkd_jax.trainer import setup

    info = data.info(config.dataset)
    family = setup._model_dataset(config)  # pylint: disable=protected-access
    model = models.create(config.teacher.arch, num_classes=info.num_classes, dataset=family)
    size = info.image_size
    variables = init_variables(model, jax.random.PRNGKey(123), (1, size, size, 3))
    convert.save_variables(directory, jax.device_get(variables), arch=config.teacher.arch,
                           dataset=family, num_classes=info.num_classes)
    return str(directory)


def timed_run(config, workdir: epath.Path, epochs: int, steps_per_epoch: int) -> tuple[float, dict]:
    """Wall seconds of ``train_and_evaluate`` stopped after ``epochs`` epochs, and its summary."""
    from zkd_jax.trainer import train_and_evaluate

    with config.unlocked():
        config.max_steps = epochs * steps_per_epoch
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the trainer's log lines; stdout is the JSON
        summary = train_and_evaluate(config, workdir)
    return time.perf_counter() - start, summary


def run(config, *, short: int, long: int, profile: str | None = None,
        profile_steps: int = 3) -> dict:
    """The measurement of the module docstring; returns the result dict (``KEYS``)."""
    from zkd_jax import data
    from zkd_jax.io import metrics as metrics_io

    if not 0 < short < long:
        raise ValueError(f"need 0 < --short < --long, got {short} and {long}.")
    if long > config.epochs:
        raise ValueError(f"--long={long} exceeds config.epochs={config.epochs}.")
    steps = data.steps_per_epoch(config.dataset, config.batch_size, config.train_examples)
    with tempfile.TemporaryDirectory(prefix="zkd_epoch_time_") as tmp:
        root = epath.Path(tmp)
        # Each run builds (compiles) its own programs; JAX's persistent compilation cache lets the
        # short and long runs load what the warm-up run compiled, so their difference is training.
        jax.config.update("jax_compilation_cache_dir", str(root / "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        with config.unlocked():
            if config.teacher.arch:
                config.teacher.checkpoint = save_random_teacher(config, root / "teacher")
                config.teacher.train_if_missing = False
        with config.unlocked():
            config.profile_steps = profile_steps if profile else 0
        compile_s, _ = timed_run(config, root / "warmup", short, steps)
        if profile and (root / "warmup" / "profile").exists():
            shutil.copytree(str(root / "warmup" / "profile"), profile, dirs_exist_ok=True)
        with config.unlocked():
            config.profile_steps = 0
        short_s, _ = timed_run(config, root / "short", short, steps)
        long_s, _ = timed_run(config, root / "long", long, steps)
        records = metrics_io.read_metrics(root / "long")
    epoch_s = (long_s - short_s) / (long - short)
    startup_s = max(short_s - short * epoch_s, 0.0)
    return {
        "benchmark": "epoch_time", "dataset": config.dataset,
        "method": config.get("variant") or config.method.name, "teacher": config.teacher.arch,
        "student": config.student.arch, "batch": config.batch_size,
        "mixed_precision": bool(config.mixed_precision),
        "steps_per_call": int(config.get("steps_per_call") or 1), **bench_flags.run_fields(),
        "short_epochs": short, "long_epochs": long, "short_seconds": round(short_s, 3),
        "long_seconds": round(long_s, 3), "compile_run_seconds": round(compile_s, 3),
        "steps_per_epoch": steps, "epoch_seconds": round(epoch_s, 3),
        "images_per_sec_epoch": round(steps * config.batch_size / max(epoch_s, 1e-9), 1),
        "startup_seconds": round(startup_s, 3), "epochs": config.epochs,
        "total_minutes": round((startup_s + config.epochs * epoch_s) / 60, 2),
        "last_record": records[-1] if records else None,
    }


def main(argv) -> None:
    config = bench_flags.load_config(argv)
    with config.unlocked():
        config.dataset = _DATASET.value
        config.input_pipeline = "device"
        config.progress_bar = False
        config.export = False
        config.keep_checkpoints = 1
        config.suite = ml_collections.ConfigDict()
        config.students = ()
    result = run(config, short=_SHORT.value, long=_LONG.value, profile=bench_flags.PROFILE.value,
                 profile_steps=bench_flags.PROFILE_STEPS.value)
    print(json.dumps({k: result[k] for k in KEYS}), flush=True)


if __name__ == "__main__":
    app.run(main)
