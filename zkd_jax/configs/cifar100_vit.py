"""The ViT students of the paper: ``get_config("METHOD,resnet56,STUDENT")``,
``get_config("base,STUDENT")`` or ``get_config("teacher,resnet56")``.

STUDENT is one of deit_ti, t2t_vit_7, pit_ti, pvt_ti (``models`` family ``cifar100_224``: CIFAR-100
upsampled to 224 px); METHOD is ``kd_ls`` (the reference's ``*_KD_ours.yaml``: 0.5 CE + w T^2 KL
on standardized logits, T 2, w 10 for DeiT and 9 otherwise) or ``kd`` (no standardization,
w = 1); ``base`` trains the student alone (CE, weight 1). The teacher is the 32-px CIFAR
``resnet56`` and sees the pixel pick ``(7 i + 3, 7 j + 3)`` of the student's 224-px batch in train
mode (BatchNorm batch statistics); ``teacher,resnet56`` is its pycls recipe (``r-56_c100.yaml``).

Command line: ``zkd-train --config=configs/cifar100_vit.py:kd_ls,resnet56,deit_ti --workdir=DIR
--config.teacher.checkpoint=teachers/resnet56``. The fields beyond the CNN configs' (``vit.*``,
``optimizer.name``, ``student.model_overrides`` ...) are read by ``zkd_jax.trainer.recipe``.
"""

from __future__ import annotations

import ml_collections

from zkd_jax.configs import common

DATASET = "cifar100"
MODEL_DATASET = "cifar100_224"
TEACHER_ARCH = "resnet56"
STUDENTS = ("deit_ti", "t2t_vit_7", "pit_ti", "pvt_ti")
DEFAULT = "kd_ls,resnet56,deit_ti"
#: EXTRA_WEIGHT_IN of the reference's configs (DeiT 10; the others leave the default 9).
EXTRA_WEIGHT = {"deit_ti": 10.0, "t2t_vit_7": 9.0, "pit_ti": 9.0, "pvt_ti": 9.0}
#: The reference code's README (Base, ECCV2022, KD+Ours) and the official logs (best, last).
TOP1 = {
    "deit_ti": dict(base=65.08, eccv2022=78.15, kd_ls=78.55, log_best=78.73, log_last=78.46),
    "t2t_vit_7": dict(base=69.37, eccv2022=78.35, kd_ls=78.43, log_best=78.10, log_last=77.95),
    "pit_ti": dict(base=73.58, eccv2022=78.48, kd_ls=78.76, log_best=78.76, log_last=78.48),
    "pvt_ti": dict(base=69.22, eccv2022=77.07, kd_ls=78.43, log_best=78.45, log_last=78.23),
}
VIT_SOLVER = dict(name="adamw", lr=5e-4, min_lr=5e-6, warmup_epochs=20, warmup_factor=1e-3,
                  weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8)
TEACHER_SOLVER = dict(name="sgd_masked", lr=0.1, min_lr=0.0, warmup_epochs=0, warmup_factor=0.1,
                      weight_decay=5e-4, momentum=0.9, nesterov=True)


def _base(student: str, variant: str) -> ml_collections.ConfigDict:
    c = common.base_config()
    c.dataset = DATASET
    c.model_dataset = MODEL_DATASET if student in STUDENTS else DATASET
    c.variant = variant
    c.student.arch = student
    # Module fields replaced in the student (flax clone), e.g. dict(dim=16, depth=1) for a small
    # test model; its img_size follows vit.image_size.
    c.student.model_overrides = ml_collections.ConfigDict()
    c.batch_size = 128  # drop_last: 390 steps per epoch
    c.eval_batch_size = 200
    c.epochs = 300
    c.seed = 1  # RNG_SEED
    c.vit = ml_collections.ConfigDict(dict(
        image_size=224 if student in STUDENTS else 32,
        # zkd_jax.data.vit_augment: RandomResizedCrop(bicubic) + flip + RandAugment + erasing
        train_transform="rrc_flip_randaug_m9_mstd0.5_inc1_erase0.25",
        eval_transform="resize_bilinear",
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        teacher_image_size=32,  # views.teacher_input: pixel (7i + 3, 7j + 3)
        teacher_model_dataset=DATASET,  # the teacher is the 32-px CIFAR resnet56
        teacher_train_mode=True,  # BN batch statistics (the reference's model.train())
        eval_head="mean",  # DeiT: test accuracy on (cls + dist) / 2
    ))
    c.paper.source = ("Sun et al., CVPR 2024 (arXiv 2403.01427), ViT students (reference code: "
                      "tiny-transformers); settings: zkd_jax/configs/cifar100_vit.py, "
                      "docs/configs.md")
    return c


def teacher_config(arch: str = TEACHER_ARCH) -> ml_collections.ConfigDict:
    """pycls's ResNet-56: 32 px with the same strong pipeline, SGD nesterov, cosine to 0."""
    c = _base(arch, common.TEACHER)
    c.optimizer = ml_collections.ConfigDict(TEACHER_SOLVER)
    c.vit.eval_head = "cls"
    c.paper.settings = ("batch_size", "epochs", *(f"optimizer.{k}" for k in TEACHER_SOLVER))
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """One ViT run's config; ``arg`` defaults to ``"kd_ls,resnet56,deit_ti"``.

    Raises:
      ValueError: an unknown method, teacher or student (the message lists the valid ones).
    """
    parts = [p.strip() for p in (arg or DEFAULT).split(",")]
    if parts[0] == common.TEACHER:
        if parts[1:] != [TEACHER_ARCH]:
            raise ValueError(f"the ViT teacher recipe is 'teacher,{TEACHER_ARCH}' (got {arg!r}).")
        return teacher_config()
    if parts[0] == "base" and len(parts) == 2:
        variant, teacher, student = "base", None, parts[1]
    elif len(parts) == 3 and parts[0] in ("kd", "kd_ls"):
        variant, teacher, student = parts
    else:
        raise ValueError(
            f"config argument {arg!r}: use 'kd_ls,{TEACHER_ARCH},STUDENT', "
            f"'kd,{TEACHER_ARCH},STUDENT', 'base,STUDENT' or 'teacher,{TEACHER_ARCH}'."
        )
    if student not in STUDENTS:
        raise ValueError(f"unknown ViT student {student!r}; use one of {', '.join(STUDENTS)}.")
    if teacher not in (None, TEACHER_ARCH):
        raise ValueError(f"the ViT students' teacher is {TEACHER_ARCH!r} (got {teacher!r}).")
    c = _base(student, variant)
    c.optimizer = ml_collections.ConfigDict(VIT_SOLVER)
    c.teacher.arch = teacher
    if variant == "base":
        c.method = ml_collections.ConfigDict(dict(name="ce", ce_weight=1.0))
    else:
        c.method = ml_collections.ConfigDict(dict(
            name="vit_kd", temperature=2.0, ce_weight=0.5, logit_weight=1.0,
            extra_weight=EXTRA_WEIGHT[student], standardize=variant == "kd_ls",
            # DeiT: KD on its distillation head. T2T/PiT/PVT: unknown in the reference; the class
            # head (as the goldens assume); "dist" is not available for them.
            kd_head="dist" if student == "deit_ti" else "cls",
        ))
        c.teacher.recipe = teacher_config()
    c.vit.eval_head = "mean" if student == "deit_ti" else "cls"
    c.paper.top1 = TOP1[student].get(variant)
    c.paper.settings = ("batch_size", "epochs", *(f"optimizer.{k}" for k in VIT_SOLVER),
                        *(f"method.{k}" for k in c.method))
    return c
