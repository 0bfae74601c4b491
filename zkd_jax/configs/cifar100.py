"""CIFAR-100 configs: ``get_config("METHOD,TEACHER,STUDENT")`` or ``get_config("teacher,ARCH")``.

METHOD is one of kd, kd_ls, dkd, dkd_ls, mlkd, mlkd_ls, ctkd, ctkd_ls ("_ls": with logit
standardization). Per-pair settings come from ``common.CIFAR100_PAIRS``; a pair
outside that table gets the method's defaults (listed in ``config.paper.defaulted``).

Command line: ``zkd-train --config=configs/cifar100.py:kd_ls,resnet32x4,resnet8x4 --workdir=DIR
--config.teacher.checkpoint=teachers/resnet32x4``.
"""

from __future__ import annotations

import ml_collections

from zkd_jax.configs import common

DATASET = "cifar100"
DEFAULT = "kd_ls,resnet32x4,resnet8x4"


def architectures() -> tuple[str, ...]:
    """The CIFAR architectures of the model zoo."""
    from zkd_jax import models  # lazy: config parsing should not pay for flax unless needed

    return tuple(models.names(DATASET))


def teacher_config(arch: str) -> ml_collections.ConfigDict:
    """Vanilla cross-entropy training of a CIFAR-100 teacher, the reference's recipe."""
    lr, epochs = common.cifar100_lr_and_epochs(common.TEACHER, None, arch)
    solver = dict(common.CIFAR100_SOLVER, lr=lr, epochs=epochs)
    settings, _ = common.method_settings(common.TEACHER, None, arch)
    return common.build_config(
        dataset=DATASET, variant=common.TEACHER, teacher=None, student=arch, solver=solver,
        method=settings, paper_keys=common.SOLVER_KEYS,
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of one CIFAR-100 run; ``arg`` defaults to ``"kd_ls,resnet32x4,resnet8x4"``.

    Raises:
      ValueError: unknown method or architecture (the message lists the valid ones).
    """
    variant, teacher, student = common.parse_argument(
        arg, valid_archs=architectures(), default=DEFAULT
    )
    if teacher is None:
        return teacher_config(student)
    lr, epochs = common.cifar100_lr_and_epochs(variant, teacher, student)
    solver = dict(common.CIFAR100_SOLVER, lr=lr, epochs=epochs)
    settings, in_table = common.method_settings(variant, teacher, student)
    method_keys = common.method_keys(settings)
    row = common.CIFAR100_PAIRS.get((teacher, student))
    per_pair = variant in ("kd_ls", "dkd", "dkd_ls", "mlkd_ls")
    defaulted = method_keys if (per_pair and not in_table) else ()
    paper_keys = common.SOLVER_KEYS + tuple(k for k in method_keys if k not in defaulted)
    paper_top1 = row.paper_top1.get(variant) if row is not None else None
    return common.build_config(
        dataset=DATASET, variant=variant, teacher=teacher, student=student, solver=solver,
        method=settings, paper_keys=paper_keys, defaulted=defaulted, paper_top1=paper_top1,
        teacher_recipe=teacher_config(teacher),
    )
