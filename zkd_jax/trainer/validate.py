"""``check_config(config)``: every field a user can set, checked before any training starts.

The door, ``zkd_jax.trainer.train_and_evaluate``, calls it first (in a suite, for each of its runs
too), so a value that makes no sense (``epochs=0``, a learning rate <= 0, a batch size that is not
a positive integer, larger than the training split or not divisible by the device count, a
temperature <= 0) ends in one ``ValueError`` naming the field and what to pass instead, before a
teacher trains or anything is written. A config with ``teacher.train_if_missing`` also has its
``teacher.recipe`` checked, and every ``suite`` entry is checked as a method config: the demo's
teacher, too, is refused before its epochs run. ``optimizer.name`` must be one of
``optim.OPTIMIZERS``, and a ViT config's ``vit`` fields are checked by
``zkd_jax.trainer.recipe.images`` (the transforms the pipeline makes, image sizes, the eval head).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from zkd_jax.optim import OPTIMIZERS, SGD_SCHEDULES

__all__ = ["check_config"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
        float(value))


def _fail(name: str, value: Any, need: str) -> None:
    raise ValueError(f"config.{name}={value!r} is invalid: it must be {need}; pass "
                     f"--config.{name}=... with such a value.")


def _int_at_least(config, name: str, low: int, prefix: str) -> None:
    if name not in config:
        return
    value = config[name]
    if not _is_int(value) or value < low:
        _fail(prefix + name, value, f"an integer >= {low}")


def _positive(config, name: str, prefix: str, *, zero_ok: bool = False) -> None:
    if name not in config or config[name] is None:
        return
    value = config[name]
    if not _is_number(value) or value < 0 or (value == 0 and not zero_ok):
        _fail(prefix + name, value, "a finite number >= 0" if zero_ok else "a finite number > 0")


def check_method(method: Mapping[str, Any], prefix: str = "method.") -> None:
    """A method config: temperature > 0, loss weights finite and >= 0, warm-up epochs >= 0."""
    _positive(method, "temperature", prefix)
    for weight in ("ce_weight", "kd_weight", "alpha", "beta"):
        _positive(method, weight, prefix, zero_ok=True)
    _int_at_least(method, "warmup_epochs", 0, prefix)


def _check_optimizer(opt: Mapping[str, Any], prefix: str) -> None:
    name = opt.get("name") or "sgd"
    if name not in OPTIMIZERS:
        _fail(prefix + "name", name, f"one of {', '.join(OPTIMIZERS)}")
    if opt.get("schedule") not in (None, "", *SGD_SCHEDULES):
        _fail(prefix + "schedule", opt["schedule"], f"one of {', '.join(SGD_SCHEDULES)}")
    _positive(opt, "lr", prefix)
    _positive(opt, "min_lr", prefix, zero_ok=True)
    _int_at_least(opt, "warmup_epochs", 0, prefix)
    _positive(opt, "weight_decay", prefix, zero_ok=True)
    _positive(opt, "decay_rate", prefix)
    if "momentum" in opt and not (_is_number(opt["momentum"]) and 0 <= opt["momentum"] < 1):
        _fail(prefix + "momentum", opt["momentum"], "a number in [0, 1)")
    milestones = opt.get("milestones", ())
    if not all(_is_int(m) and m >= 0 for m in milestones) or list(milestones) != sorted(
            milestones):
        _fail(prefix + "milestones", tuple(milestones),
              "a tuple of ascending integers >= 0 (epochs), e.g. (150, 180, 210)")


def _check_batch(config, name: str, prefix: str, num_train: int | None, devices: int | None):
    if name not in config:
        return
    value = config[name]
    if not _is_int(value) or value < 1:
        _fail(prefix + name, value, "a positive integer")
    if num_train is not None and name == "batch_size" and value > num_train:
        _fail(prefix + name, value, f"at most the {num_train} training examples of "
              f"{config['dataset']}")
    if devices and value % devices:
        nearest = max(devices, round(value / devices) * devices)
        raise ValueError(  # the wording of zkd_jax.parallel.check_batch_size, said earlier
            f"config.{prefix + name}={value!r} is not divisible by the {devices} devices of the "
            f"mesh; set config.{prefix + name} to a multiple of {devices} (e.g. {nearest}).")


def check_config(config, *, prefix: str = "", devices: int | None = None) -> None:
    """Raises one ``ValueError`` naming the first field of ``config`` that makes no sense.

    Args:
      config: a run's ``ml_collections.ConfigDict`` (or a mapping with the same fields).
      prefix: the dotted path of ``config`` inside the user's config (for the message).
      devices: the device count batch sizes must divide by; None: ``jax.device_count()`` when JAX
        is imported already (divisibility is checked again where the batch is sharded).
    """
    if devices is None:
        import sys  # noqa: PLC0415

        jax = sys.modules.get("jax")
        devices = jax.device_count() if jax is not None else None
    num_train = None
    if isinstance(config.get("dataset"), str):
        try:
            from zkd_jax import data  # noqa: PLC0415  (no TensorFlow: a static table)

            num_train = data.info(config["dataset"]).num_train
        except (ValueError, KeyError):
            num_train = None  # an unknown dataset is refused where the data is built
    if "train_examples" in config and num_train is not None:
        cap = config["train_examples"]
        if not _is_int(cap) or not (cap == -1 or 1 <= cap <= num_train):
            _fail(prefix + "train_examples", cap, f"-1 (the whole split) or in [1, {num_train}]")
        if cap > 0 and config["dataset"] == "imagenet2012":
            _fail(prefix + "train_examples", cap, "-1: imagenet2012 is read whole")
        num_train = num_train if cap == -1 else cap
    _int_at_least(config, "epochs", 1, prefix)
    for name in ("eval_every_epochs", "checkpoint_every_epochs", "keep_checkpoints",
                 "log_every_steps", "steps_per_call"):
        _int_at_least(config, name, 1, prefix)
    _int_at_least(config, "checkpoint_every_steps", 0, prefix)
    _int_at_least(config, "keep_damaged_checkpoints", 0, prefix)
    if "max_steps" in config and not _is_int(config["max_steps"]):
        _fail(prefix + "max_steps", config["max_steps"], "an integer (<= 0: no limit)")
    if "seed" in config and not _is_int(config["seed"]):
        _fail(prefix + "seed", config["seed"], "an integer")
    _check_batch(config, "batch_size", prefix, num_train, devices)
    _check_batch(config, "eval_batch_size", prefix, None, devices)
    if "optimizer" in config:
        _check_optimizer(config["optimizer"], prefix + "optimizer.")
        opt = config["optimizer"]
        if (opt.get("schedule") == "cosine" and "epochs" in config
                and int(opt.get("warmup_epochs") or 0) >= config["epochs"]):
            _fail(prefix + "optimizer.warmup_epochs", opt.get("warmup_epochs"),
                  f"fewer than the run's {config['epochs']} epochs (a cosine follows it)")
    if "method" in config:
        check_method(config["method"], prefix + "method.")
    for name, method in (config.get("suite") or {}).items():
        check_method(method, f"{prefix}suite.{name}.")
    if config.get("vit") is not None and num_train is not None:
        from zkd_jax.trainer import recipe  # noqa: PLC0415

        recipe.images(config, data.info(config["dataset"]).image_size)  # the ViT fields
    teacher = config.get("teacher") or {}
    if teacher.get("train_if_missing") and teacher.get("recipe") is not None:
        check_config(teacher["recipe"], prefix=prefix + "teacher.recipe.", devices=devices)
