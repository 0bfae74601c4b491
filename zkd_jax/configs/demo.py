"""The embedded offline demo, the default config of ``zkd-train``: digits, a teacher, KD vs KD+LS.

scikit-learn's handwritten digits (1,500 train / 297 test images, 8x8 upsampled to 32x32x3; no
download). ``zkd-train --config=configs/demo.py --workdir=workdir/demo`` runs ``train_suite``:

1. a small teacher (cross-entropy) in ``workdir/demo/teacher``;
2. a student distilled with KD (tau 4, ce 0.1, kd 0.9) in ``workdir/demo/kd``;
3. the same student with KD + logit standardization (tau 2, ce 0.1, kd 9) in ``workdir/demo/kd_ls``;

then prints a table of the three test accuracies. The method settings are the paper's defaults for
a pair outside its table; the architectures, epochs and learning rate are the demo's own (chosen so
that the whole demo runs in a few minutes on a 2-core CPU; docs/demo.md), not the paper's.
"""

from __future__ import annotations

import ml_collections

from zkd_jax.configs import common

DATASET = "digits"
TEACHER_ARCH = "resnet14"
STUDENT_ARCH = "resnet8"
TEACHER_EPOCHS = 5
STUDENT_EPOCHS = 5


def _solver(epochs: int) -> dict:
    """SGD with momentum 0.9 and weight decay 5e-4 as the paper's, but batch 32, lr 0.1 and a x0.1
    decay for the last epoch: a few hundred small steps is what gets these models far on a CPU
    budget (the last, low-rate epoch also lets BatchNorm's running statistics catch up)."""
    return dict(batch_size=32, epochs=epochs, lr=0.1, momentum=0.9, nesterov=False,
                weight_decay=5e-4, milestones=(epochs - 1,), decay_rate=0.1)


def _small_run(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config.eval_batch_size = 304  # the 297 test images in one padded batch (a multiple of 8 and 16)
    config.log_every_steps = 8
    config.keep_checkpoints = 1
    return config


def teacher_config() -> ml_collections.ConfigDict:
    settings, _ = common.method_settings(common.TEACHER, None, TEACHER_ARCH)
    return _small_run(common.build_config(
        dataset=DATASET, variant=common.TEACHER, teacher=None, student=TEACHER_ARCH,
        solver=_solver(TEACHER_EPOCHS), method=settings, paper_keys=(),
    ))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The demo config. ``arg`` (optional) restricts the students, e.g. ``"kd_ls"`` or ``"kd,kd_ls"``."""
    variants = tuple(v.strip() for v in (arg or "kd,kd_ls").split(",") if v.strip())
    for v in variants:
        if v not in common.METHODS:
            raise ValueError(f"unknown method {v!r}; use one of {', '.join(common.METHODS)}.")
    suite = {}
    for v in variants:
        settings, _ = common.method_settings(v, TEACHER_ARCH, STUDENT_ARCH)
        suite[v] = common.method_config(settings)
    first, _ = common.method_settings(variants[0], TEACHER_ARCH, STUDENT_ARCH)
    config = _small_run(common.build_config(
        dataset=DATASET, variant=variants[0], teacher=TEACHER_ARCH, student=STUDENT_ARCH,
        solver=_solver(STUDENT_EPOCHS), method=first, paper_keys=(),
        defaulted=common.method_keys(first), teacher_recipe=teacher_config(),
    ))
    config.teacher.train_if_missing = True
    config.suite = ml_collections.ConfigDict(suite)
    return config
