"""Solver and method defaults, and THE one table of per-pair settings.

Everything a benchmark config needs that comes from the paper lives in this file:

* ``METHOD_DEFAULTS``: the per-method defaults (baseline and "+LS", i.e. logit standardization).
* ``CIFAR100_PAIRS``: one row per teacher -> student pair of the paper with the per-pair settings
  read from the reference run logs (KD+LS, DKD+LS, MLKD+LS, baseline DKD beta) and the paper's
  reported CIFAR-100 top-1 per method.
* ``IMAGENET_PAIRS``: the two ImageNet pairs.
* the CIFAR-100 and ImageNet solvers, MLKD's epochs / learning-rate rules and the lower learning rate
  of MobileNet / ShuffleNet students.

``build_config`` turns (dataset, method variant, teacher, student, solver) into one
``ml_collections.ConfigDict``; ``config.paper`` records which values are the paper's and which are
defaults. ``zkd_jax.configs.cifar100`` / ``imagenet`` / ``demo`` call it.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping

import ml_collections
from ml_collections import config_dict

PAPER = ("Sun et al., CVPR 2024 (arXiv 2403.01427); settings: zkd_jax/configs/common.py, "
         "listed on the documentation's Configs page (docs/configs.md)")

# The method variants a config argument may name ("+LS" = with logit standardization).
METHODS: tuple[str, ...] = ("kd", "kd_ls", "dkd", "dkd_ls", "mlkd", "mlkd_ls", "ctkd", "ctkd_ls")
TEACHER = "teacher"

# Students whose CIFAR-100 learning rate is 0.01 instead of 0.05.
LOW_LR_STUDENTS: tuple[str, ...] = ("MobileNetV2", "ShuffleV1", "ShuffleV2")


@dataclasses.dataclass(frozen=True)
class PairSettings:
    """Per-pair settings of the paper (the "+LS" columns are read from the reference code's logs).

    Attributes:
        kd_ls: (base temperature, kd weight w) of KD+LS.
        dkd_ls: (base temperature, w, beta_pair) of DKD+LS: alpha = 1 * w, beta = beta_pair * w.
        mlkd_ls: (base temperature, kd weight) of MLKD+LS.
        dkd_beta: beta of the DKD baseline (alpha 1).
        paper_top1: the paper's CIFAR-100 top-1 (mean of 4 runs, best epoch) per method variant.
    """

    kd_ls: tuple[float, float] = (2.0, 9.0)
    dkd_ls: tuple[float, float, float] = (2.0, 9.0, 8.0)
    mlkd_ls: tuple[float, float] = (2.0, 9.0)
    dkd_beta: float = 8.0
    paper_top1: Mapping[str, float] = dataclasses.field(default_factory=dict)


def _top1(*values: float) -> dict[str, float]:
    """The paper's CIFAR-100 results, in the column order of its table."""
    order = ("kd", "kd_ls", "ctkd", "ctkd_ls", "dkd", "dkd_ls", "mlkd", "mlkd_ls")
    return dict(zip(order, values, strict=True))


# THE table: the paper's per-pair settings and its results.
CIFAR100_PAIRS: dict[tuple[str, str], PairSettings] = {
    ("resnet32x4", "resnet8x4"): PairSettings(
        (2, 9), (2, 9, 8), (2, 9), 8,
        _top1(73.33, 76.62, 73.39, 76.67, 76.32, 77.01, 77.08, 78.28)),
    ("vgg13", "vgg8"): PairSettings(
        (3, 9), (2, 15, 2), (2, 6), 6,
        _top1(72.98, 74.36, 73.52, 74.47, 74.68, 74.81, 75.18, 75.22)),
    ("wrn_40_2", "wrn_40_1"): PairSettings(
        (2, 9), (2, 12, 2), (2, 9), 6,
        _top1(73.54, 74.37, 73.93, 74.58, 74.81, 74.89, 75.35, 75.56)),
    ("wrn_40_2", "wrn_16_2"): PairSettings(
        (2, 9), (2, 12, 2), (2, 9), 6,
        _top1(74.92, 76.11, 75.45, 76.08, 76.24, 76.39, 76.63, 76.95)),
    ("resnet56", "resnet20"): PairSettings(
        (2, 9), (3, 18, 2), (2, 9), 2,
        _top1(70.66, 71.43, 71.19, 71.34, 71.97, 72.32, 72.19, 72.33)),
    ("resnet110", "resnet32"): PairSettings(
        (2, 9), (2, 15, 2), (2, 9), 2,
        _top1(73.08, 74.17, 73.52, 74.01, 74.11, 74.29, 74.11, 74.32)),
    ("resnet110", "resnet20"): PairSettings(
        (4, 12), (2, 15, 2), (2, 9), 8,
        _top1(70.67, 71.48, 70.99, 71.39, 71.06, 71.85, 71.89, 72.27)),
    ("resnet32x4", "ShuffleV2"): PairSettings(
        (2, 9), (2, 9, 8), (2, 6), 8,
        _top1(74.45, 75.56, 75.37, 76.18, 77.07, 77.37, 78.44, 78.76)),
    ("resnet32x4", "wrn_16_2"): PairSettings(
        (3, 9), (2, 9, 2), (2, 9), 8,
        _top1(74.90, 75.26, 74.57, 75.16, 75.70, 76.19, 76.52, 77.53)),
    ("resnet32x4", "wrn_40_2"): PairSettings(
        (3, 9), (2, 9, 8), (2, 9), 8,
        _top1(77.70, 77.92, 77.66, 77.99, 78.46, 78.95, 79.26, 79.66)),
    ("wrn_40_2", "resnet8x4"): PairSettings(
        (2, 9), (2, 18, 2), (2, 9), 8,
        _top1(73.97, 77.11, 74.61, 77.03, 75.56, 76.75, 77.33, 77.68)),
    ("wrn_40_2", "MobileNetV2"): PairSettings(
        (3, 9), (2, 15, 2), (2, 9), 8,
        _top1(68.36, 69.23, 68.34, 69.53, 69.28, 70.01, 70.78, 71.61)),
    ("vgg13", "MobileNetV2"): PairSettings(
        (3, 9), (3, 9, 2), (2, 6), 6,
        _top1(67.37, 68.61, 68.50, 68.98, 69.71, 69.98, 70.57, 70.94)),
    ("ResNet50", "MobileNetV2"): PairSettings(
        (3, 1), (2, 15, 2), (2, 9), 8,
        _top1(67.35, 69.02, 68.67, 69.36, 70.35, 70.45, 71.04, 71.19)),
    ("resnet32x4", "ShuffleV1"): PairSettings((2, 9), (2, 9, 8), (2, 9), 8),
    ("wrn_40_2", "ShuffleV1"): PairSettings((2, 9), (2, 9, 8), (2, 9), 8),
}


@dataclasses.dataclass(frozen=True)
class ImageNetPair:
    """ImageNet pair: KD baseline weights and reference results (section 6/7)."""

    kd_ce_weight: float
    reference_top1: Mapping[str, float]


IMAGENET_PAIRS: dict[tuple[str, str], ImageNetPair] = {
    ("ResNet34", "ResNet18"): ImageNetPair(1.0, {"kd": 71.03, "kd_ls": 71.42}),
    # The reference calls this student "MobileNetV2"; it is MobileNetV1.
    ("ResNet50", "MobileNetV1"): ImageNetPair(0.5, {"kd": 70.50}),
}

# Per-method defaults (the paper's baselines and +LS). "+LS" rows are the defaults for pairs outside
# the per-pair table. CTKD's temperature is learned; `temperature` is used only with learn=False.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "kd": dict(name="kd", standardize=False, temperature=4.0, ce_weight=0.1, kd_weight=0.9),
    "kd_ls": dict(name="kd", standardize=True, temperature=2.0, ce_weight=0.1, kd_weight=9.0),
    "dkd": dict(name="dkd", standardize=False, temperature=4.0, ce_weight=1.0, alpha=1.0, beta=8.0,
                warmup_epochs=20),
    "dkd_ls": dict(name="dkd", standardize=True, temperature=2.0, ce_weight=1.0, alpha=9.0,
                   beta=72.0, warmup_epochs=20),
    "mlkd": dict(name="mlkd", standardize=False, temperature=4.0, ce_weight=0.1, kd_weight=0.9),
    "mlkd_ls": dict(name="mlkd", standardize=True, temperature=2.0, ce_weight=0.1, kd_weight=9.0),
    "ctkd": dict(name="ctkd", standardize=False, temperature=4.0, ce_weight=0.1, kd_weight=0.9),
    "ctkd_ls": dict(name="ctkd", standardize=True, temperature=2.0, ce_weight=0.1, kd_weight=9.0),
    TEACHER: dict(name="ce", ce_weight=1.0),
}

# CTKD's global temperature module: T = t_start + t_end * sigmoid(GRL(g, lambda)).
CTKD_DEFAULTS: dict[str, Any] = dict(
    learn=True, init=1.0, t_start=1.0, t_end=20.0, lmax=0.0, lmin=-1.0, loops=10)

CIFAR100_SOLVER: dict[str, Any] = dict(
    batch_size=64, epochs=240, lr=0.05, momentum=0.9, nesterov=False, weight_decay=5e-4,
    milestones=(150, 180, 210), decay_rate=0.1)
IMAGENET_SOLVER: dict[str, Any] = dict(
    batch_size=512, epochs=100, lr=0.2, momentum=0.9, nesterov=False, weight_decay=1e-4,
    milestones=(30, 60, 90), decay_rate=0.1)



def cifar100_lr_and_epochs(variant: str, teacher: str | None, student: str) -> tuple[float, int]:
    """Learning rate and epochs of a CIFAR-100 run (the CIFAR-100 solver; MLKD's own)."""
    low_lr = student in LOW_LR_STUDENTS
    if variant.startswith("mlkd"):
        shuffle_from_r32x4 = teacher == "resnet32x4" and student in ("ShuffleV1", "ShuffleV2")
        epochs = 960 if shuffle_from_r32x4 else 480
        if (teacher, student) == ("wrn_40_2", "MobileNetV2"):
            return 0.005, epochs
        if low_lr or (teacher, student) == ("vgg13", "vgg8"):
            return 0.01, epochs
        return 0.025, epochs
    return (0.01 if low_lr else CIFAR100_SOLVER["lr"]), CIFAR100_SOLVER["epochs"]


def method_settings(
    variant: str,
    teacher: str | None,
    student: str,
    pairs: Mapping[tuple[str, str], PairSettings] | None = None,
) -> tuple[dict[str, Any], bool]:
    """Method hyper-parameters of ``variant`` for one pair.

    Returns ``(settings, from_pair_table)``; a pair outside ``pairs`` (``CIFAR100_PAIRS`` by
    default) gets the method's defaults and ``from_pair_table=False``.
    """
    if variant not in METHOD_DEFAULTS:
        raise ValueError(
            f"unknown method {variant!r}; use one of {', '.join(METHODS + (TEACHER,))}."
        )
    settings = dict(METHOD_DEFAULTS[variant])
    if variant.startswith("ctkd"):
        settings["ctkd"] = dict(CTKD_DEFAULTS)
    pairs = CIFAR100_PAIRS if pairs is None else pairs
    row = pairs.get((teacher, student)) if teacher is not None else None
    if row is None:
        return settings, False
    if variant == "kd_ls":
        settings["temperature"], settings["kd_weight"] = map(float, row.kd_ls)
    elif variant == "dkd":
        settings["beta"] = float(row.dkd_beta)
    elif variant == "dkd_ls":
        tau, w, beta_pair = map(float, row.dkd_ls)
        settings.update(temperature=tau, alpha=1.0 * w, beta=beta_pair * w)
    elif variant == "mlkd_ls":
        settings["temperature"], settings["kd_weight"] = map(float, row.mlkd_ls)
    # kd, mlkd, ctkd and ctkd_ls use the method defaults for every pair of the table.
    return settings, True


def optional(kind: type) -> Any:
    """A field that is None by default and accepts a ``--config.x=...`` override of ``kind``."""
    return config_dict.placeholder(kind)


def base_config() -> ml_collections.ConfigDict:
    """Fields every run has (teacher runs and students alike); builders fill in the rest.

    Field meanings are documented inline; ``paper.settings`` lists the dotted names of the values
    that are the paper's for this run, ``paper.defaulted`` those that fell back to the method's
    defaults because the pair is outside the per-pair table.
    """
    c = ml_collections.ConfigDict()
    c.dataset = "cifar100"  # zkd_jax.data's name: cifar100, imagenet2012, digits, synthetic_cifar100
    c.model_dataset = "cifar100"  # zkd_jax.models' family: "cifar100" (32x32) or "imagenet"
    c.data_dir = optional(str)  # TFDS data directory (local or gs://); None: the TFDS default.
    c.seed = 0
    c.variant = TEACHER  # the METHOD part of the config argument ("teacher" for a teacher run)
    c.student = ml_collections.ConfigDict(dict(arch=""))
    # allow_unverified: load a teacher directory without zkd_manifest.json (variables written by
    # other tools); zkd-convert's and the runs' exports carry one and are always verified.
    c.teacher = ml_collections.ConfigDict(
        dict(arch=optional(str), checkpoint=optional(str), train_if_missing=False,
             allow_unverified=False)
    )
    c.method = ml_collections.ConfigDict(METHOD_DEFAULTS[TEACHER])
    # > 0: train on the first N examples of the train split only (short runs, data-budget
    # studies; the datasets held in memory): an epoch is N // batch_size steps. -1: all of them.
    c.train_examples = -1
    c.batch_size = CIFAR100_SOLVER["batch_size"]  # global: over all processes and devices
    c.eval_batch_size = 256  # global; must divide by the device count too
    c.epochs = CIFAR100_SOLVER["epochs"]
    c.optimizer = ml_collections.ConfigDict(
        {k: v for k, v in CIFAR100_SOLVER.items() if k not in ("batch_size", "epochs")}
    )
    c.mixed_precision = False  # params/optimizer state float32, compute bfloat16, losses float32
    # "tfdata": batches from tf.data on the host (every dataset and view); "device": the split held
    # on the devices, augmented in jitted JAX (CIFAR-100 and digits, weak view only): zkd_jax.data.feeds.
    c.input_pipeline = "tfdata"
    # > 1 (input_pipeline "device" only): that many steps per jitted call, batches built inside
    # (jax.lax.scan; zkd_jax.step.scan): one host dispatch per call instead of two per step.
    c.steps_per_call = 1
    c.eval_every_epochs = 1  # the last epoch is always evaluated
    c.checkpoint_every_epochs = 1  # the last epoch is always checkpointed
    c.checkpoint_every_steps = 0  # > 0: also checkpoint every this many global steps
    c.keep_checkpoints = 3  # the last few are kept; the best is kept apart in checkpoints_best/
    c.keep_damaged_checkpoints = 1  # damaged checkpoints kept in checkpoints_damaged/ (0: deleted)
    c.max_steps = -1  # > 0: stop after this many global steps (checkpointing there)
    c.log_every_steps = 50  # host sync: progress bar, NaN/inf check
    c.progress_bar = True
    # > 0: a jax.profiler trace of that many steps, starting profile_start_step steps into the
    # run (after compilation), written to {workdir}/profile (TensorBoard profile plugin, Perfetto).
    c.profile_steps = 0
    c.profile_start_step = 2
    c.export = True  # at the end, write {workdir}/export in the load_variables format
    c.distributed = ml_collections.ConfigDict(
        dict(enabled="auto", coordinator_address=optional(str), num_processes=optional(int),
             process_id=optional(int))
    )
    c.suite = ml_collections.ConfigDict()  # name -> method settings: several students (the demo)
    # Several students of config.student.arch trained in ONE program (zkd_jax.step.multi): a
    # tuple of dicts {"seed": int, optional method settings such as "temperature", "kd_weight"};
    # empty: one student. Outputs go to WORKDIR/student_<k>/.
    c.students = ()
    # A grid of students instead of listing them (zkd_jax.configs.sweep), e.g.
    # "temperature=2,3 kd_weight=3,6,9,12,15 seed=0,1"; "" for none.
    c.sweep = ""
    c.students_form = "loop"  # how K students are mapped: loop, vmap, vmap_matmul (multi_student)
    c.paper = ml_collections.ConfigDict(
        dict(source=PAPER, settings=(), defaulted=(), top1=optional(float))
    )
    return c


SOLVER_KEYS: tuple[str, ...] = (
    "batch_size", "epochs", "optimizer.lr", "optimizer.momentum", "optimizer.nesterov",
    "optimizer.weight_decay", "optimizer.milestones", "optimizer.decay_rate",
)


def method_keys(settings: Mapping[str, Any]) -> tuple[str, ...]:
    """Dotted config names of a method's settings (``method.temperature``, ...)."""
    keys = tuple(f"method.{k}" for k in settings if k not in ("name", "ctkd"))
    return keys + tuple(f"method.ctkd.{k}" for k in settings.get("ctkd", {}))


def _did_you_mean(name: str, valid: tuple[str, ...]) -> str:
    """`` (did you mean 'x'?)`` for the closest valid name, or ``""``."""
    near = difflib.get_close_matches(name, valid, n=1, cutoff=0.7)
    return f" (did you mean {near[0]!r}?)" if near else ""


def parse_argument(
    arg: str | None, *, valid_archs: tuple[str, ...], default: str
) -> tuple[str, str | None, str]:
    """Parses ``"METHOD,TEACHER,STUDENT"`` or ``"teacher,ARCH"`` into (variant, teacher, student).

    Raises:
      ValueError: unknown method or architecture, or a wrong number of fields.
    """
    arg = default if arg is None or not arg.strip() else arg
    parts = [p.strip() for p in arg.split(",")]
    variant = parts[0]
    if variant not in METHODS + (TEACHER,):
        raise ValueError(
            f"unknown method {variant!r} in config argument {arg!r}"
            f"{_did_you_mean(variant, METHODS + (TEACHER,))}; use one of "
            f"{', '.join(METHODS + (TEACHER,))}."
        )
    expected = 2 if variant == TEACHER else 3
    if len(parts) != expected:
        form = "teacher,ARCH" if variant == TEACHER else "METHOD,TEACHER,STUDENT"
        raise ValueError(f"config argument {arg!r} must have the form {form!r}.")
    for arch in parts[1:]:
        if arch not in valid_archs:
            raise ValueError(
                f"unknown architecture {arch!r} in config argument {arg!r}"
                f"{_did_you_mean(arch, valid_archs)}; use one of {', '.join(valid_archs)}."
            )
    if variant == TEACHER:
        return variant, None, parts[1]
    return variant, parts[1], parts[2]


def method_config(settings: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A ``ConfigDict`` of method settings (nested dicts become nested ConfigDicts)."""
    return ml_collections.ConfigDict(
        {k: (ml_collections.ConfigDict(v) if isinstance(v, dict) else v)
         for k, v in settings.items()}
    )


def build_config(
    *,
    dataset: str,
    model_dataset: str = "cifar100",
    variant: str,
    teacher: str | None,
    student: str,
    solver: Mapping[str, Any],
    method: Mapping[str, Any],
    paper_keys: tuple[str, ...],
    defaulted: tuple[str, ...] = (),
    paper_top1: float | None = None,
    teacher_recipe: ml_collections.ConfigDict | None = None,
) -> ml_collections.ConfigDict:
    """One run's config.

    Args:
      dataset: "cifar100", "imagenet2012" or "digits" (the data module's names).
      model_dataset: the model zoo's family of ``dataset`` ("cifar100" or "imagenet").
      variant: a name of ``METHODS`` or ``TEACHER``.
      teacher, student: architecture names (teacher None for a teacher run).
      solver: batch_size, epochs, lr, momentum, nesterov, weight_decay, milestones, decay_rate.
      method: the method settings (``method_settings``).
      paper_keys: dotted names of the values that are the paper's.
      defaulted: dotted names that fell back to method defaults (pair outside the table).
      paper_top1: the paper's reported top-1 for this run, when there is one.
      teacher_recipe: the config that trains the teacher when ``teacher.train_if_missing``.
    """
    c = base_config()
    c.dataset = dataset
    c.model_dataset = model_dataset
    c.variant = variant
    c.student.arch = student
    c.teacher.arch = teacher
    c.method = method_config(method)
    c.batch_size = int(solver["batch_size"])
    c.epochs = int(solver["epochs"])
    for key in ("lr", "momentum", "nesterov", "weight_decay", "milestones", "decay_rate"):
        c.optimizer[key] = solver[key]
    c.optimizer.milestones = tuple(int(m) for m in solver["milestones"])
    c.paper.settings = tuple(paper_keys)
    c.paper.defaulted = tuple(defaulted)
    c.paper.top1 = paper_top1
    if teacher_recipe is not None:
        c.teacher.recipe = teacher_recipe
    return c
