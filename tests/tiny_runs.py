"""Shared pieces of the reliability tests (issue 16): tiny real runs on the offline digits.

A resnet8 student distilled with KD from a resnet8 teacher of random variables (written with
``zkd_jax.io.torch_weights.save_variables``); batch 32 on the first 160 digits
(``config.train_examples``), so an epoch is 5 steps and a run of 2 epochs is 10, with a checkpoint every 2 steps.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from zkd_jax import models
from zkd_jax.io import torch_weights as convert
from zkd_jax.io import checkpoint
from zkd_jax.configs import common, demo
from zkd_jax.step.state import init_variables

STEPS_PER_EPOCH = 5  # 160 digits // 32
TOTAL_STEPS = 10


def save_teacher(directory, *, seed: int = 5, poison=None) -> str:
    """A resnet8 teacher in the zkd-convert format; ``poison(variables)`` may alter it first."""
    model = models.create("resnet8", num_classes=10, dataset="cifar100")
    variables = jax.device_get(init_variables(model, jax.random.PRNGKey(seed), (1, 32, 32, 3)))
    variables = jax.tree.map(np.array, variables)
    if poison is not None:
        poison(variables)
    convert.save_variables(directory, variables, arch="resnet8", dataset="cifar100",
                           num_classes=10)
    return str(directory)


def config(teacher_checkpoint: str, *, max_steps: int = -1) -> ml_collections.ConfigDict:
    c = demo.get_config("kd")
    c.suite = ml_collections.ConfigDict()
    settings, _ = common.method_settings("kd", "resnet8", "resnet8")
    c.method = common.method_config(settings)
    c.student.arch = "resnet8"
    c.teacher.arch = "resnet8"
    c.teacher.checkpoint = teacher_checkpoint
    c.teacher.train_if_missing = False
    c.batch_size = 32
    c.train_examples = 32 * STEPS_PER_EPOCH
    c.eval_batch_size = 304
    c.epochs = 2
    c.optimizer.milestones = (1,)
    c.max_steps = max_steps
    c.log_every_steps = 1
    c.checkpoint_every_steps = 2
    c.keep_checkpoints = 3
    c.progress_bar = False
    c.export = False
    return c


def final_state(workdir) -> tuple[int, list[np.ndarray]]:
    """(step, leaves) of the newest verified checkpoint."""
    ckpt = checkpoint.Checkpointer(workdir)
    step = ckpt.latest_step()
    restored = ckpt.last.restore(step)
    ckpt.close()
    return step, [np.asarray(x) for x in jax.tree.leaves(restored["state"])]


def assert_same_state(workdir_a, workdir_b) -> None:
    step_a, leaves_a = final_state(workdir_a)
    step_b, leaves_b = final_state(workdir_b)
    assert step_a == step_b
    assert len(leaves_a) == len(leaves_b) > 10
    for a, b in zip(leaves_a, leaves_b):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def largest_file(directory):
    """The largest file below ``directory`` (a checkpoint's array data)."""
    files = [p for p in directory.rglob("*") if p.is_file() and p.name != "zkd_manifest.json"]
    return max(files, key=lambda p: p.stat().st_size)
