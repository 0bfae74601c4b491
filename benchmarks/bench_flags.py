"""Flags and output fields shared by the benchmark scripts (train_step.py, epoch_time.py).

Importing this module defines ``--config`` (an ml_collections config file with its argument),
``--mixed_precision``, ``--batch``, ``--tag``, ``--profile`` and ``--profile_steps``.
"""

from __future__ import annotations

import datetime

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file(
    "config", None,
    "Config file and argument, e.g. configs/cifar100.py:kd_ls,resnet32x4,resnet8x4.")
MIXED = flags.DEFINE_bool("mixed_precision", None, "bfloat16 compute (default: the config's).")
BATCH = flags.DEFINE_integer("batch", None, "Global batch size (default: the config's).")
TAG = flags.DEFINE_string("tag", None, "A label copied into the output (e.g. the issue's row).")
PROFILE = flags.DEFINE_string(
    "profile", None, "Directory for a jax.profiler trace of --profile_steps steps after warm-up "
    "(TensorBoard's profile plugin or Perfetto reads DIR/plugins/profile/<run>/*.xplane.pb).")
PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 3, "Steps traced with --profile.")


def load_config(argv) -> ml_collections.ConfigDict:
    """The ``--config`` with ``--mixed_precision`` and ``--batch`` applied; usage errors else."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if CONFIG.value is None:
        raise app.UsageError(
            "--config is required, e.g. configs/cifar100.py:kd_ls,resnet32x4,resnet8x4")
    config = CONFIG.value
    with config.unlocked():
        if MIXED.value is not None:
            config.mixed_precision = MIXED.value
        if BATCH.value is not None:
            config.batch_size = BATCH.value
    return config


def run_fields() -> dict:
    """``config`` (as given on the command line), ``tag``, and where and when it ran."""
    dev = jax.devices()[0]
    return {
        "config": flags.FLAGS["config"].serialize().split("=", 1)[-1], "tag": TAG.value,
        "device_kind": dev.device_kind, "device_count": jax.device_count(),
        "platform": dev.platform, "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
