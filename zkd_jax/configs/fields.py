"""One line of help for every config field, and the resolved config as a table.

``zkd-train --config=... --print_config`` prints :func:`describe` of the resolved config; the
documentation's configs page and the "did you mean" of an unknown ``--config.FIELD`` read the same
names. Fields of a suite entry (``suite.kd_ls.temperature``) and of the teacher's own recipe
(``teacher.recipe.epochs``) have the help of the field they repeat (``method.temperature``,
``epochs``).

>>> help_for("optimizer.lr")
'peak learning rate (SGD: before the step decays; AdamW: after the warm-up)'
>>> help_for("suite.kd_ls.temperature") == help_for("method.temperature")
True
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

#: Dotted field name -> one line of help. Every field of every benchmark config is here
#: (``tests/test_configs.py`` checks it).
FIELDS: dict[str, str] = {
    # what runs
    "dataset": "data set: cifar100, imagenet2012, digits (offline) or synthetic_cifar100",
    "model_dataset": "model family of the architectures: cifar100 (32 px), imagenet, cifar100_224",
    "data_dir": "TFDS data directory (local or gs://); None: the TFDS default",
    "seed": "random seed of initialization, data order and augmentation (the paper: 4 seeds)",
    "variant": "the METHOD of the config argument (kd, kd_ls, ...; 'teacher' for a teacher run)",
    "student.arch": "the student's architecture (zkd_jax.models.names(model_dataset))",
    "student.model_overrides": "module fields replaced in the student (ViT: a smaller test model)",
    "teacher.arch": "the teacher's architecture; None for a teacher run",
    "teacher.checkpoint": "directory of the teacher's variables (zkd-convert or a run's export/)",
    "teacher.train_if_missing": "train the teacher with teacher.recipe first when no checkpoint",
    "teacher.allow_unverified": "load a teacher export that has no zkd_manifest.json (made elsewhere)",
    "train_examples": "> 0: train on the first N examples only (smoke runs); -1: the whole split",
    # the solver
    "batch_size": "global batch size, over all processes and devices (divisible by their count)",
    "eval_batch_size": "global evaluation batch size (divisible by the device count)",
    "epochs": "number of training epochs",
    "optimizer.name": "sgd (CNN recipes), adamw (ViT students) or sgd_masked (the ViT teacher)",
    "optimizer.lr": "peak learning rate (SGD: before the step decays; AdamW: after the warm-up)",
    "optimizer.momentum": "SGD momentum",
    "optimizer.nesterov": "Nesterov momentum",
    "optimizer.weight_decay": "weight decay (SGD: coupled, on every parameter; AdamW: decoupled)",
    "optimizer.milestones": "epochs at which the SGD learning rate is multiplied by decay_rate",
    "optimizer.decay_rate": "factor of the learning rate at each milestone",
    "optimizer.schedule": "sgd: step (decay at milestones) or cosine (warm-up, cosine per update)",
    "optimizer.min_lr": "learning rate at the end of the cosine schedule",
    "optimizer.warmup_epochs": "epochs of linear learning-rate warm-up before the cosine",
    "optimizer.warmup_factor": "learning rate at the warm-up's start, as a fraction of lr",
    "optimizer.b1": "AdamW beta1",
    "optimizer.b2": "AdamW beta2",
    "optimizer.eps": "AdamW epsilon",
    "mixed_precision": "bfloat16 compute; parameters, optimizer state and losses stay float32",
    # the method
    "method.name": "objective: ce, kd, dkd, mlkd, ctkd or vit_kd",
    "method.standardize": "logit standardization (Z-score both logits before the softmax)",
    "method.temperature": "base temperature tau of the softened softmax",
    "method.ce_weight": "weight of the cross-entropy with the labels",
    "method.kd_weight": "weight of the distillation term",
    "method.alpha": "DKD: weight of the target-class term (TCKD)",
    "method.beta": "DKD: weight of the non-target-class term (NCKD)",
    "method.warmup_epochs": "DKD: epochs over which the distillation weight ramps up linearly",
    "method.logit_weight": "ViT KD: weight of the logit term (multiplies extra_weight)",
    "method.extra_weight": "ViT KD: weight w of the standardized KL term",
    "method.kd_head": "ViT KD: which student head is distilled, cls or dist (DeiT)",
    "method.ctkd.learn": "CTKD: learn the temperature (False: use method.temperature)",
    "method.ctkd.init": "CTKD: initial value of the temperature parameter",
    "method.ctkd.t_start": "CTKD: lowest temperature (T = t_start + t_end * sigmoid(g))",
    "method.ctkd.t_end": "CTKD: temperature range above t_start",
    "method.ctkd.lmax": "CTKD: gradient-reversal weight at the curriculum's start",
    "method.ctkd.lmin": "CTKD: gradient-reversal weight at the curriculum's end",
    "method.ctkd.loops": "CTKD: epochs of the cosine curriculum of the reversal weight",
    # input
    "input_pipeline": "tfdata (host, every data set and view) or device (split held on devices)",
    "steps_per_call": "> 1 with input_pipeline=device: that many steps per jitted call",
    "vit.image_size": "ViT: the students' image size in pixels",
    "vit.train_transform": "ViT: the training augmentation (crop, flip, RandAugment, erasing)",
    "vit.eval_transform": "ViT: the evaluation resize",
    "vit.mean": "ViT: per-channel normalization mean",
    "vit.std": "ViT: per-channel normalization standard deviation",
    "vit.teacher_image_size": "ViT: the teacher's image size (a pixel pick of the student's)",
    "vit.teacher_model_dataset": "ViT: the teacher's model family",
    "vit.teacher_train_mode": "ViT: run the teacher with batch statistics (BatchNorm train mode)",
    "vit.eval_head": "ViT: the head evaluated: cls, or mean of both heads (DeiT)",
    # evaluation, checkpoints, logging
    "eval_every_epochs": "evaluate every this many epochs (the last epoch always)",
    "checkpoint_every_epochs": "checkpoint every this many epochs (the last epoch always)",
    "checkpoint_every_steps": "> 0: also checkpoint every this many global steps",
    "keep_checkpoints": "how many recent checkpoints are kept (the best is kept apart)",
    "keep_damaged_checkpoints": "how many damaged checkpoints checkpoints_damaged/ keeps (0: none)",
    "max_steps": "> 0: stop after this many global steps, with a checkpoint there",
    "log_every_steps": "steps between host syncs: progress bar and NaN/inf check",
    "progress_bar": "show a progress bar per epoch",
    "profile_steps": "> 0: write a jax.profiler trace of that many steps to WORKDIR/profile",
    "profile_start_step": "the step at which the profile starts (after compilation)",
    "export": "write the final student variables to WORKDIR/export (a teacher for later runs)",
    "distributed.enabled": "multi-process start: auto (from the environment), True or False",
    "distributed.coordinator_address": "multi-process: host:port of process 0",
    "distributed.num_processes": "multi-process: number of processes",
    "distributed.process_id": "multi-process: this process's index",
    # several students
    "suite": "name -> method settings: separate runs one after another (the demo)",
    "students": "tuple of {seed, method settings}: K students of one program",
    "sweep": "a grid of students, e.g. 'temperature=2,3 kd_weight=3,9 seed=0,1'",
    "students_form": "how K students are mapped: loop, vmap or vmap_matmul",
    # provenance
    "paper.source": "where the settings come from (the paper and this config module)",
    "paper.settings": "fields whose values are the paper's for this run",
    "paper.defaulted": "fields that fell back to the method's defaults (pair outside the table)",
    "paper.top1": "the paper's reported top-1 (%) for this run, when there is one",
}

_REPEATED = re.compile(r"^(teacher\.recipe\.|suite\.\w+\.)")


def help_for(name: str) -> str | None:
    """The one-line help of a dotted field name, or None when the field has none."""
    if name in FIELDS:
        return FIELDS[name]
    if name.startswith("suite."):
        rest = _REPEATED.sub("", name)
        if rest == "lr":  # a suite entry's own learning rate replaces optimizer.lr
            return FIELDS["optimizer.lr"] + " (this suite entry's; replaces optimizer.lr)"
        return FIELDS.get(rest) or FIELDS.get(f"method.{rest}")
    stripped = _REPEATED.sub("", name)
    return FIELDS.get(stripped) if stripped != name else None


def _is_mapping(value: Any) -> bool:
    """A dict or a ``ConfigDict`` (which is not a ``Mapping``)."""
    return isinstance(value, Mapping) or (hasattr(value, "items") and hasattr(value, "keys"))


def flatten(config: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted name, value)`` of every leaf of a (nested) config; an empty mapping is a leaf."""
    for key, value in config.items():
        name = f"{prefix}{key}"
        if _is_mapping(value) and len(value):
            yield from flatten(value, f"{name}.")
        else:
            yield name, value.to_dict() if hasattr(value, "to_dict") else value


def names(config: Mapping[str, Any]) -> list[str]:
    """Every dotted name of ``config``: its leaves and the nodes above them."""
    out: list[str] = []
    for name, _ in flatten(config):
        parts = name.split(".")
        out.extend(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return list(dict.fromkeys(out))


def describe(config: Mapping[str, Any]) -> str:
    """The resolved config as ``name = value  # help`` lines, one per field."""
    rows = [(name, repr(value), help_for(name) or "") for name, value in flatten(config)]
    width = min(max(len(f"{n} = {v}") for n, v, _ in rows), 60)
    lines = []
    for name, value, text in rows:
        left = f"{name} = {value}"
        lines.append(f"{left:<{width}}  # {text}" if text else left)
    return "\n".join(lines)
