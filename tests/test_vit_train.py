"""Acceptance 5 of issue 17: the ViT recipe through the one trainer, on CPU, small.

Real ``train_and_evaluate`` runs of ``configs/cifar100_vit.py`` on the offline digits, shrunk: the
students at 32 px with one or two blocks of width 8-32 (``config.student.model_overrides``), the
teacher a random resnet8 (``tiny_runs.save_teacher``) seeing the 16-px ``teacher_input`` of the
students' batch in train mode; batch 500, so an epoch is 3 steps. Everything else is the recipe:
the tf.data ViT transforms, AdamW with its decay mask and the per-epoch schedule, ``ViTKD`` (DeiT's
KD on its distillation head, accuracy on the mean of its heads), T2T's ``buffers`` in the state.
"""

from __future__ import annotations

import json
import math

import jax
import ml_collections
import numpy as np
import pytest

import tiny_runs
from zkd_jax.configs import cifar100_vit
from zkd_jax.io import checkpoint
from zkd_jax.train import train_and_evaluate

#: Small students (32-px images): module fields replaced through config.student.model_overrides.
SMALL = {
    "deit_ti": dict(patch_size=8, dim=16, depth=1, num_heads=2),
    "t2t_vit_7": dict(dim=16, depth=2, num_heads=2, token_dim=32),
    "pit_ti": dict(patch_size=8, stride=4, dims=(8, 16), depths=(1, 1), heads=(1, 2)),
    "pvt_ti": dict(dims=(8, 8, 8, 8), depths=(1, 1, 1, 1), heads=(1, 1, 1, 1),
                   mlp_ratios=(2, 2, 2, 2)),
}
#: The recipe each family runs here: the KD+LS recipe, and PVT alone (``base``, no teacher).
VARIANTS = {"deit_ti": "kd_ls", "t2t_vit_7": "kd_ls", "pit_ti": "kd_ls", "pvt_ti": "base"}
STEPS_PER_EPOCH = 3  # 1500 digits // 500


def vit_config(arch: str, teacher_dir: str, *, variant: str = "kd_ls",
               max_steps: int = -1) -> ml_collections.ConfigDict:
    c = cifar100_vit.get_config(f"base,{arch}" if variant == "base"
                                else f"{variant},resnet56,{arch}")
    c.dataset = "digits"
    c.vit.image_size, c.vit.teacher_image_size = 32, 16
    c.student.model_overrides = ml_collections.ConfigDict(SMALL[arch])
    if variant != "base":
        c.teacher.arch, c.teacher.checkpoint = "resnet8", teacher_dir
    c.batch_size, c.eval_batch_size, c.epochs = 500, 300, 2
    c.optimizer.update(lr=2e-3, min_lr=2e-3, warmup_epochs=0)  # constant: the loss must fall
    c.max_steps = max_steps
    c.log_every_steps = 1
    c.checkpoint_every_steps = 2
    c.progress_bar = False
    c.export = False
    return c


def records(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return tiny_runs.save_teacher(tmp_path_factory.mktemp("vit_teacher") / "resnet8")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, teacher_dir):
    """``straight(arch)``: the workdir of one uninterrupted 2-epoch run of ``arch`` (run once)."""
    done: dict[str, object] = {}

    def run(arch: str):
        if arch not in done:
            workdir = tmp_path_factory.mktemp(arch) / "run"
            summary = train_and_evaluate(vit_config(arch, teacher_dir, variant=VARIANTS[arch]),
                                         workdir)
            assert summary["finished"] and summary["step"] == 2 * STEPS_PER_EPOCH
            done[arch] = workdir
        return done[arch]

    return run


@pytest.mark.parametrize("arch", cifar100_vit.STUDENTS)
def test_each_student_family_trains_and_its_loss_falls(arch, straight):
    epochs = records(straight(arch))
    assert [r["epoch"] for r in epochs] == [1, 2]
    losses = [r["train_loss"] for r in epochs]
    assert all(math.isfinite(v) for v in losses) and losses[1] < losses[0], losses
    assert all(r["test_examples"] == 297 and 0 <= r["top1"] <= 100 for r in epochs)
    terms = {"train_cls_loss", "train_logit_distill_loss"} if VARIANTS[arch] != "base" else {
        "train_ce"}
    assert terms <= set(epochs[0])
    assert epochs[0]["lr"] == pytest.approx(2e-3)  # optimizer.name adamw, per-epoch rates


def test_resume_is_bit_identical_with_t2t_buffers(tmp_path, teacher_dir, straight):
    """T2T (fixed ``buffers``, drop path in its 2 blocks): stopped inside epoch 2 at step 4, then
    resumed to the end, it ends bit-identical to the uninterrupted run."""
    workdir = tmp_path / "resumed"
    first = train_and_evaluate(vit_config("t2t_vit_7", teacher_dir, max_steps=4), workdir)
    assert first["step"] == 4 and first["last_epoch"] == 1
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


def test_two_deit_students_in_bfloat16(tmp_path, teacher_dir):
    """K = 2 DeiT students in one program (the teacher once per batch, both heads through the
    K-student step), mixed precision: two steps run with finite losses, float32 parameters."""
    c = vit_config("deit_ti", teacher_dir, max_steps=2)
    c.mixed_precision = True
    c.students = ({"seed": 1}, {"seed": 2, "temperature": 3.0})
    out = train_and_evaluate(c, tmp_path / "k2")
    assert [s["step"] for s in out["students"]] == [2, 2]
    for k in range(2):
        ckpt = checkpoint.Checkpointer(tmp_path / "k2" / f"student_{k}")
        restored = ckpt.last.restore(2)
        ckpt.close()
        sums = restored["meta"]["epoch_sums"]
        assert all(math.isfinite(v) for v in sums.values()) and sums["logit_distill_loss"] > 0
        leaves = jax.tree.leaves(restored["state"]["params"])
        assert all(np.asarray(x).dtype == np.float32 for x in leaves)
