"""Acceptance 5 of issue 17: the ViT recipe through the one trainer, on CPU, small.

Real ``train_and_evaluate`` runs of ``configs/cifar100_vit.py`` on the offline digits, shrunk: the
students at 32 px with one or two blocks of width 8-32 (``config.student.model_overrides``), the
teacher a random resnet8 (NumPy draws: no init program to compile) seeing the 16-px ``teacher_input`` of the
students' batch in train mode; batch 500, so an epoch is 3 steps. Everything else is the recipe:
the tf.data ViT transforms, AdamW with its decay mask and the per-epoch schedule, ``ViTKD`` (DeiT's
KD on its distillation head, accuracy on the mean of its heads), T2T's ``buffers`` in the state.
DeiT runs as K = 2 students in one program (the ``vmap`` form) and in bfloat16 (one run covers
both: CI time).
"""

from __future__ import annotations

import json
import math

import jax
import ml_collections
import numpy as np
import pytest

import tiny_runs
from zkd_jax import models
from zkd_jax.io import torch_weights as convert
from zkd_jax.configs import cifar100_vit
from zkd_jax.io import checkpoint
from zkd_jax.trainer import train_and_evaluate

#: Small students (32-px images): module fields replaced through config.student.model_overrides.
SMALL = {
    "deit_ti": dict(patch_size=8, dim=16, depth=1, num_heads=2),
    "t2t_vit_7": dict(dim=16, depth=2, num_heads=2, token_dim=32),
    "pit_ti": dict(patch_size=8, stride=4, dims=(8, 16), depths=(1, 1), heads=(1, 2)),
    "pvt_ti": dict(patch_sizes=(4, 2), dims=(8, 8), depths=(1, 1), heads=(1, 1),
                   mlp_ratios=(2, 2), sr_ratios=(2, 1)),  # two of the four stages
}
#: The recipe each family runs here: the KD+LS recipe, and PVT alone (``base``, no teacher).
VARIANTS = {"deit_ti": "kd_ls", "t2t_vit_7": "kd_ls", "pit_ti": "kd_ls", "pvt_ti": "base"}
#: DeiT: two students (the second at another temperature) in bfloat16.
DEIT_STUDENTS = ({"seed": 1}, {"seed": 2, "temperature": 3.0})
STEPS_PER_EPOCH = 3  # config.train_examples = 3 * 100


def vit_config(arch: str, teacher_dir: str, *, variant: str = "kd_ls",
               max_steps: int = -1) -> ml_collections.ConfigDict:
    c = cifar100_vit.get_config(f"base,{arch}" if variant == "base"
                                else f"{variant},resnet56,{arch}")
    c.dataset = "digits"
    c.vit.image_size, c.vit.teacher_image_size = 32, 16
    c.student.model_overrides = ml_collections.ConfigDict(SMALL[arch])
    if variant != "base":
        c.teacher.arch, c.teacher.checkpoint = "resnet8", teacher_dir
    c.batch_size, c.eval_batch_size, c.epochs = 100, 300, 2
    c.train_examples = STEPS_PER_EPOCH * 100
    c.optimizer.update(lr=2e-3, min_lr=2e-3, warmup_epochs=0)  # constant: the loss must fall
    c.max_steps = max_steps
    c.log_every_steps = 1
    c.progress_bar = False
    c.export = False
    return c


def records(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A resnet8 teacher (10 classes) in the zkd-convert format: He-normal weights, BN scales and
    variances 1, biases and means 0."""
    model = models.create("resnet8", num_classes=10, dataset="cifar100")
    rng = np.random.default_rng(5)

    def draw(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            return np.ones(leaf.shape, np.float32)
        if name in ("bias", "mean"):
            return np.zeros(leaf.shape, np.float32)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    variables = jax.tree_util.tree_map_with_path(draw, models.abstract_variables(model))
    directory = tmp_path_factory.mktemp("vit_teacher") / "resnet8"
    convert.save_variables(directory, variables, arch="resnet8", dataset="cifar100",
                           num_classes=10)
    return str(directory)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, teacher_dir):
    """``straight(arch)``: the workdir of one uninterrupted 2-epoch run of ``arch`` (run once)."""
    done: dict[str, object] = {}

    def run(arch: str):
        if arch not in done:
            workdir = tmp_path_factory.mktemp(arch) / "run"
            config = vit_config(arch, teacher_dir, variant=VARIANTS[arch])
            if arch == "deit_ti":  # "vmap": one batched student program (compiles as fast as one)
                config.mixed_precision, config.students = True, DEIT_STUDENTS
                config.students_form = "vmap"
            summary = train_and_evaluate(config, workdir)
            for s in summary.get("students", [summary]):
                assert s["finished"] and s["step"] == 2 * STEPS_PER_EPOCH
            done[arch] = workdir
        return done[arch]

    return run


@pytest.mark.parametrize("arch", cifar100_vit.STUDENTS)
def test_each_student_family_trains_and_its_loss_falls(arch, straight):
    workdir = straight(arch)
    dirs = [workdir / f"student_{k}" for k in range(2)] if arch == "deit_ti" else [workdir]
    for d in dirs:
        epochs = records(d)
        assert [r["epoch"] for r in epochs] == [1, 2]
        losses = [r["train_loss"] for r in epochs]
        assert all(math.isfinite(v) for v in losses) and losses[1] < losses[0], losses
        assert all(r["test_examples"] == 297 and 0 <= r["top1"] <= 100 for r in epochs)
        terms = {"train_cls_loss", "train_logit_distill_loss"} if VARIANTS[arch] != "base" else {
            "train_ce"}
        assert terms <= set(epochs[0])
        assert epochs[0]["lr"] == pytest.approx(2e-3)  # optimizer.name adamw, per-epoch rates


def test_deit_students_ran_in_bfloat16_with_float32_parameters(straight):
    """K = 2 DeiT students in one program (the teacher once per batch, both heads through the
    vmapped K-student step), mixed precision: finite losses, float32 parameters, distinct
    students."""
    workdir = straight("deit_ti")
    params = []
    for k in range(2):
        ckpt = checkpoint.Checkpointer(workdir / f"student_{k}")
        restored = ckpt.last.restore(ckpt.latest_step())
        ckpt.close()
        leaves = jax.tree.leaves(restored["state"]["params"])
        assert all(np.asarray(x).dtype == np.float32 for x in leaves)
        params.append(leaves)
    assert not all(np.array_equal(a, b) for a, b in zip(*params))
    kd = [records(workdir / f"student_{k}")[0]["train_logit_distill_loss"] for k in range(2)]
    assert kd[0] > 0 and kd[1] > 0 and kd[0] != kd[1]  # T 2 and 3


def test_resume_is_bit_identical_with_t2t_buffers(tmp_path, teacher_dir, straight):
    """T2T (fixed ``buffers``, drop path in its 2 blocks): stopped inside epoch 1 at step 2, then
    resumed to the end, it ends bit-identical to the uninterrupted run (metrics too)."""
    workdir = tmp_path / "resumed"
    first = train_and_evaluate(vit_config("t2t_vit_7", teacher_dir, max_steps=2), workdir)
    assert first["step"] == 2 and first["last_epoch"] == 0
    second = train_and_evaluate(vit_config("t2t_vit_7", teacher_dir), workdir)
    assert second["finished"] and second["step"] == 6
    tiny_runs.assert_same_state(straight("t2t_vit_7"), workdir)
    ckpt = checkpoint.Checkpointer(workdir)
    state = ckpt.last.restore(ckpt.latest_step())["state"]
    ckpt.close()
    buffers = state["buffers"]["t2t_module"]
    assert {"attention_0", "attention_1"} <= set(buffers) and "pos_embed" in state["buffers"]
    assert [r["train_loss"] for r in records(workdir)] == [
        r["train_loss"] for r in records(straight("t2t_vit_7"))]
