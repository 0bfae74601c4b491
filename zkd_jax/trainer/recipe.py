"""What a run's config says about its optimizer, its images and its teacher's view.

``trainer/setup.py`` asks this module; everything here reads the config and returns plain values.

* The optimizer, by ``config.optimizer.name`` (absent: ``"sgd"``):

  - ``"sgd"``: PyTorch SGD with coupled weight decay on every parameter and the step decay of
    ``lr``, ``milestones``, ``decay_rate`` (the CNN recipes), or with ``schedule="cosine"`` a
    linear warm-up of ``warmup_epochs`` then a cosine to ``min_lr`` over the run, update by
    update (``optim.warmup_cosine_schedule``; the offline demo's);
  - ``"adamw"``: AdamW with decoupled decay on the weight matrices only (``optim.adamw``,
    ``optim.vit_decay_mask``; ``weight_decay``, ``b1``, ``b2``, ``eps``), the ViT students;
  - ``"sgd_masked"``: SGD whose coupled decay skips 1-D tensors and biases
    (``optim.sgd_masked``; ``momentum``, ``nesterov``), their ResNet-56 teacher;

  the last two with pycls's per-epoch rate (``optim.cosine_warmup_lr``: ``lr``, ``min_lr``,
  ``warmup_epochs``, ``warmup_factor``, over ``config.epochs``) stepped at epoch ends.
* The images: without ``config.vit`` the dataset's own size and the CIFAR augmentation; with it
  (``configs/cifar100_vit.py``) the ViT augmentation at ``config.vit.image_size`` px
  (``zkd_jax.views``), the students built for that size (their ``img_size``) with
  ``config.student.model_overrides`` (module fields, e.g. a small width for tests), and the
  teacher, of the model family ``config.vit.teacher_model_dataset``, fed ``teacher_input`` at
  ``config.vit.teacher_image_size`` px in train mode when ``config.vit.teacher_train_mode``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections
import optax

from zkd_jax import optim
from zkd_jax.step import TeacherCall
from zkd_jax.views import CIFAR_AUGMENTATION, VIT_AUGMENTATION

OPTIMIZERS = optim.OPTIMIZERS
SGD_SCHEDULES = optim.SGD_SCHEDULES
#: The transform strings of ``config.vit`` the data pipeline implements.
VIT_TRAIN_TRANSFORM = "rrc_flip_randaug_m9_mstd0.5_inc1_erase0.25"
VIT_EVAL_TRANSFORM = "resize_bilinear"


def optimizer_name(optimizer: ml_collections.ConfigDict) -> str:
    """``config.optimizer.name`` (default ``"sgd"``).

    Raises:
      ValueError: a name not in :data:`OPTIMIZERS`.
    """
    name = optimizer.get("name") or "sgd"
    if name not in OPTIMIZERS:
        raise ValueError(f"config.optimizer.name={name!r} is unknown; use one of "
                         f"{', '.join(OPTIMIZERS)}.")
    return name


def sgd_schedule(optimizer: ml_collections.ConfigDict) -> str:
    """SGD's schedule, ``config.optimizer.schedule``: ``"step"`` (absent; the step decay of
    ``milestones``) or ``"cosine"`` (``optim.warmup_cosine_schedule``: ``warmup_epochs`` of linear
    warm-up, then a cosine to ``min_lr`` over the rest of ``config.epochs``, update by update).

    Raises:
      ValueError: another value.
    """
    name = optimizer.get("schedule") or "step"
    if name not in SGD_SCHEDULES:
        raise ValueError(f"config.optimizer.schedule={name!r} is unknown; use one of "
                         f"{', '.join(SGD_SCHEDULES)}.")
    return name


def epoch_rates(optimizer: ml_collections.ConfigDict, epochs: int) -> list[float] | None:
    """The per-epoch rates of ``"adamw"`` / ``"sgd_masked"`` (epoch ``e`` from 0 at index ``e``);
    None for ``"sgd"`` (its step decay)."""
    if optimizer_name(optimizer) == "sgd":
        return None
    return [optim.cosine_warmup_lr(
        e, base_lr=float(optimizer.lr), max_epoch=int(epochs),
        min_lr=float(optimizer.get("min_lr", 0.0)),
        warmup_epochs=int(optimizer.get("warmup_epochs", 0)),
        warmup_factor=float(optimizer.get("warmup_factor", 0.1)),
    ) for e in range(int(epochs))]


def make_optimizer(optimizer: ml_collections.ConfigDict, steps_per_epoch: int,
                   epochs: int = 1) -> tuple[optax.Schedule, optax.GradientTransformation]:
    """(schedule, tx) of ``config.optimizer`` (see the module docstring); ``epochs`` is the run's
    length, over which the cosine of ``"adamw"`` and ``"sgd_masked"`` runs."""
    rates = epoch_rates(optimizer, epochs)
    if rates is None and sgd_schedule(optimizer) == "cosine":
        schedule = optim.warmup_cosine_schedule(
            float(optimizer.lr), total_steps=int(epochs) * steps_per_epoch,
            warmup_steps=int(optimizer.get("warmup_epochs", 0)) * steps_per_epoch,
            min_lr=float(optimizer.get("min_lr", 0.0)))
    elif rates is None:
        schedule = optim.step_decay_schedule(
            float(optimizer.lr), steps_per_epoch=steps_per_epoch,
            milestones=tuple(int(m) for m in optimizer.milestones),
            decay_rate=float(optimizer.decay_rate),
        )
    if rates is None:
        tx = optim.sgd(schedule, momentum=float(optimizer.momentum),
                       weight_decay=float(optimizer.weight_decay),
                       nesterov=bool(optimizer.nesterov))
        return schedule, tx
    schedule = optim.per_epoch_schedule(rates, steps_per_epoch=steps_per_epoch)
    if optimizer_name(optimizer) == "adamw":
        tx = optim.adamw(schedule, weight_decay=float(optimizer.weight_decay),
                         b1=float(optimizer.get("b1", 0.9)), b2=float(optimizer.get("b2", 0.999)),
                         eps=float(optimizer.get("eps", 1e-8)))
    else:
        tx = optim.sgd_masked(schedule, momentum=float(optimizer.momentum),
                              weight_decay=float(optimizer.weight_decay),
                              nesterov=bool(optimizer.nesterov))
    return schedule, tx


def lr_for_epoch(optimizer: ml_collections.ConfigDict, epochs: int,
                 steps_per_epoch: int = 1) -> Callable[[int], float]:
    """The host-side rate of an epoch counted from 1 (what ``metrics.jsonl`` logs); for SGD's
    ``"cosine"`` schedule, which changes every update, the rate of the epoch's first update."""
    rates = epoch_rates(optimizer, epochs)
    if rates is not None:
        return lambda epoch: rates[min(epoch, len(rates)) - 1]
    if sgd_schedule(optimizer) == "cosine":
        return lambda epoch: optim.warmup_cosine_lr(
            (epoch - 1) * steps_per_epoch, lr=float(optimizer.lr),
            total_steps=int(epochs) * steps_per_epoch,
            warmup_steps=int(optimizer.get("warmup_epochs", 0)) * steps_per_epoch,
            min_lr=float(optimizer.get("min_lr", 0.0)))
    return lambda epoch: optim.lr_for_epoch(epoch, lr=optimizer.lr,
                                            milestones=optimizer.milestones,
                                            decay_rate=optimizer.decay_rate)


@dataclasses.dataclass(frozen=True)
class Images:
    """The images of a run: the students' ``[H, W, C]``, the teacher's, how they are made
    (``zkd_jax.views`` augmentation) and how the teacher sees the students' batch."""

    student_shape: tuple[int, int, int]
    teacher_shape: tuple[int, int, int]
    augmentation: str
    image_size: int | None
    teacher_call: TeacherCall


def _shape(size: Any) -> tuple[int, int, int]:
    if isinstance(size, int):
        return (size, size, 3)
    size = tuple(int(s) for s in size)
    return size if len(size) == 3 else (*size, 3)


def images(config: ml_collections.ConfigDict, dataset_image_size: Any) -> Images:
    """The :class:`Images` of ``config`` (``dataset_image_size``: ``zkd_jax.data.info``'s).

    Raises:
      ValueError: a ``config.vit`` transform the pipeline does not implement, or a student size
        that is not a multiple of the teacher's.
    """
    vit = config.get("vit")
    if vit is None:
        shape = _shape(dataset_image_size)
        return Images(shape, shape, CIFAR_AUGMENTATION, None, TeacherCall())
    for name, value, known in (("train_transform", vit.train_transform, VIT_TRAIN_TRANSFORM),
                               ("eval_transform", vit.eval_transform, VIT_EVAL_TRANSFORM)):
        if value != known:
            raise ValueError(f"config.vit.{name}={value!r} is not implemented; the ViT pipeline "
                             f"makes {known!r} (zkd_jax.data.vit_augment).")
    head = "mean" if config.student.arch == "deit_ti" else "cls"
    if vit.get("eval_head", head) != head:
        raise ValueError(f"config.vit.eval_head={vit.eval_head!r}: the trainer evaluates "
                         f"{config.student.arch}'s eval output, {head!r}; set it to {head!r}.")
    size, teacher_size = int(vit.image_size), int(vit.teacher_image_size)
    if size % teacher_size:
        raise ValueError(f"config.vit.image_size={size} is not a multiple of "
                         f"config.vit.teacher_image_size={teacher_size}; the teacher picks pixels "
                         "of the students' images (e.g. 224 and 32).")
    return Images(
        student_shape=(size, size, 3), teacher_shape=(teacher_size, teacher_size, 3),
        augmentation=VIT_AUGMENTATION, image_size=size,
        teacher_call=TeacherCall(image_size=teacher_size if teacher_size != size else None,
                                 batch_stats=bool(vit.teacher_train_mode)),
    )


def teacher_model_dataset(config: ml_collections.ConfigDict, student_family: str) -> str:
    """The teacher's model family: ``config.vit.teacher_model_dataset`` (the ViT students' 32-px
    CIFAR teacher) or the student's."""
    vit = config.get("vit")
    return (vit.get("teacher_model_dataset") if vit is not None else None) or student_family


def student_fields(config: ml_collections.ConfigDict, module, image_size: int | None) -> dict:
    """The module fields to replace in the student (``module.clone(**fields)``): its ``img_size``
    (a ViT student at ``image_size`` px) and ``config.student.model_overrides``.

    Raises:
      ValueError: an override the module does not have.
    """
    fields = dict(config.student.get("model_overrides") or {})
    names = {f.name for f in dataclasses.fields(module)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ValueError(f"config.student.model_overrides sets {', '.join(unknown)}, which "
                         f"{config.student.arch} does not have; remove them.")
    if image_size is not None and "img_size" in names:
        if fields.setdefault("img_size", image_size) != image_size:
            raise ValueError(f"config.student.model_overrides.img_size={fields['img_size']} "
                             f"differs from config.vit.image_size={image_size}; set "
                             "config.vit.image_size instead.")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


__all__ = ["Images", "OPTIMIZERS", "SGD_SCHEDULES", "epoch_rates", "images", "lr_for_epoch",
           "make_optimizer", "optimizer_name", "sgd_schedule", "student_fields",
           "teacher_model_dataset"]
