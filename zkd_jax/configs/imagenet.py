"""ImageNet configs: ``get_config("METHOD,TEACHER,STUDENT")`` or ``get_config("teacher,ARCH")``.

The paper's pairs are ResNet34 -> ResNet18 and ResNet50 -> MobileNetV1 (``common.IMAGENET_PAIRS``).
Solver: SGD momentum 0.9, weight decay 1e-4, batch 512, 100 epochs, lr 0.2, x0.1 after epochs 30,
60 and 90. KD baseline: tau 1, ce 1 (0.5 for ResNet50 -> MobileNetV1), kd 0.5. The paper gives no
ImageNet-specific setting for the other variants (+LS included): they get the method defaults,
listed in ``config.paper.defaulted``. Teachers are torchvision's weights converted with zkd-convert.
"""

from __future__ import annotations

import ml_collections

from zkd_jax.configs import common

DATASET = "imagenet2012"  # zkd_jax.data's name
MODEL_DATASET = "imagenet"  # zkd_jax.models' name
DEFAULT = "kd_ls,ResNet34,ResNet18"


def architectures() -> tuple[str, ...]:
    """The ImageNet architectures of the model zoo."""
    from zkd_jax import models

    return tuple(models.names(MODEL_DATASET))


def teacher_config(arch: str) -> ml_collections.ConfigDict:
    """Cross-entropy training of an ImageNet model with the ImageNet solver."""
    settings, _ = common.method_settings(common.TEACHER, None, arch)
    config = common.build_config(
        dataset=DATASET, model_dataset=MODEL_DATASET, variant=common.TEACHER, teacher=None,
        student=arch, solver=common.IMAGENET_SOLVER, method=settings, paper_keys=(),
    )
    config.eval_batch_size = 512
    config.log_every_steps = 100
    return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of one ImageNet run; ``arg`` defaults to ``"kd_ls,ResNet34,ResNet18"``.

    Raises:
      ValueError: unknown method or architecture (the message lists the valid ones).
    """
    variant, teacher, student = common.parse_argument(
        arg, valid_archs=architectures(), default=DEFAULT
    )
    if teacher is None:
        return teacher_config(student)
    settings, _ = common.method_settings(variant, teacher, student, pairs={})
    method_keys = common.method_keys(settings)
    pair = common.IMAGENET_PAIRS.get((teacher, student))
    if variant == "kd":
        settings.update(temperature=1.0, ce_weight=1.0, kd_weight=0.5)
        if pair is not None:
            settings["ce_weight"] = pair.kd_ce_weight
        defaulted = ()
    else:
        defaulted = method_keys
    paper_keys = common.SOLVER_KEYS + tuple(k for k in method_keys if k not in defaulted)
    config = common.build_config(
        dataset=DATASET, model_dataset=MODEL_DATASET, variant=variant, teacher=teacher,
        student=student, solver=common.IMAGENET_SOLVER, method=settings, paper_keys=paper_keys,
        defaulted=defaulted,
        paper_top1=pair.reference_top1.get(variant) if pair is not None else None,
        teacher_recipe=teacher_config(teacher),
    )
    config.eval_batch_size = 512
    config.log_every_steps = 100
    return config
