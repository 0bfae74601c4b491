"""Distillation methods: one objective per method, on logits, as the train step calls it.

A method is a frozen dataclass with

* ``views``: the image views it trains on (``("weak",)``; MLKD ``("weak", "strong")``);
* ``needs_teacher``: whether the step runs the teacher;
* ``student_heads`` (optional, default False): whether the step calls the student with
  ``return_heads=True`` and hands the objective every head (:func:`head_logits`: DeiT's
  distillation head at ``DIST_VIEW``);
* ``init_params()``: its own trainable parameters (CTKD's global temperature ``{"global_t": 1.0}``,
  ``{}`` for the others); the trainer stores them at ``params["method"]`` beside
  ``params["student"]`` so that the same optimizer (momentum, coupled weight decay) trains them;
* ``objective(method_params, student, teacher, labels, epoch) -> (loss, terms)``: ``student`` and
  ``teacher`` map a view name to ``[B, C]`` logits (``teacher`` is None without a teacher),
  ``labels`` is int ``[B]``, ``epoch`` the current epoch counted from 1 (a traced int32 scalar, so
  schedules by epoch do not recompile). ``loss`` is a float32 scalar; ``terms`` a dict of float32
  scalars for logging (``ce``, ``kd``, ... and schedule values such as ``warmup`` or
  ``temperature``).

Objectives:

* ``CrossEntropy``: ``ce_weight * CE(s, y)`` (teacher training).
* ``KD``: ``ce_weight * CE(s, y) + kd_weight * kd_loss(s, t, tau, standardize)``.
* ``DKD``: ``ce_weight * CE + min(epoch / warmup_epochs, 1) * dkd_loss(...)``.
* ``MLKD``: ``mlkd_loss(...)["total"]`` over the weak and strong views.
* ``CTKD``: KD with ``T = ctkd_temperature(g, ctkd_lambda(epoch))``, ``g`` learned (global variant).
* ``ViTKD``: the ViT students' objective, :func:`vit_kd_objective`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from zkd_jax import losses
from zkd_jax.views import STRONG, WEAK

Array = jax.Array
Logits = Mapping[str, Array]


class Method(Protocol):
    """What the train step needs from a method (see the module docstring)."""

    views: tuple[str, ...]
    needs_teacher: bool

    def init_params(self) -> dict[str, Array]: ...

    def objective(
        self,
        method_params: Mapping[str, Array],
        student: Logits,
        teacher: Logits | None,
        labels: Array,
        epoch: Array,
    ) -> tuple[Array, dict[str, Array]]: ...


def _f32(x: Any) -> Array:
    return jnp.asarray(x, dtype=jnp.float32)


@dataclasses.dataclass(frozen=True)
class CrossEntropy:
    """Plain cross-entropy training (the teacher recipe)."""

    ce_weight: float = 1.0
    views: tuple[str, ...] = (WEAK,)
    needs_teacher: bool = False

    def init_params(self) -> dict[str, Array]:
        return {}

    def objective(self, method_params, student, teacher, labels, epoch):
        del method_params, teacher, epoch
        ce = losses.cross_entropy(student["weak"], labels)
        loss = self.ce_weight * ce
        return _f32(loss), {"ce": _f32(ce)}


@dataclasses.dataclass(frozen=True)
class KD:
    """Hinton's KD, with or without logit standardization."""

    temperature: float = 4.0
    ce_weight: float = 0.1
    kd_weight: float = 0.9
    standardize: bool = False
    views: tuple[str, ...] = (WEAK,)
    needs_teacher: bool = True

    def init_params(self) -> dict[str, Array]:
        return {}

    def objective(self, method_params, student, teacher, labels, epoch):
        del method_params, epoch
        s, t = student["weak"], teacher["weak"]
        ce = losses.cross_entropy(s, labels)
        kd = losses.kd_loss(s, t, self.temperature, standardize=self.standardize)
        loss = self.ce_weight * ce + self.kd_weight * kd
        return _f32(loss), {"ce": _f32(ce), "kd": _f32(kd)}


@dataclasses.dataclass(frozen=True)
class DKD:
    """Decoupled KD with the linear warm-up ``min(epoch / warmup_epochs, 1)`` (epoch from 1)."""

    temperature: float = 4.0
    ce_weight: float = 1.0
    alpha: float = 1.0
    beta: float = 8.0
    warmup_epochs: int = 20
    standardize: bool = False
    views: tuple[str, ...] = (WEAK,)
    needs_teacher: bool = True

    def init_params(self) -> dict[str, Array]:
        return {}

    def warmup(self, epoch: Array) -> Array:
        """``min(epoch / warmup_epochs, 1)`` as float32."""
        return jnp.minimum(_f32(epoch) / float(self.warmup_epochs), 1.0)

    def objective(self, method_params, student, teacher, labels, epoch):
        del method_params
        s, t = student["weak"], teacher["weak"]
        ce = losses.cross_entropy(s, labels)
        dkd = losses.dkd_loss(
            s, t, labels, alpha=self.alpha, beta=self.beta, temperature=self.temperature,
            standardize=self.standardize,
        )
        warmup = self.warmup(epoch)
        loss = self.ce_weight * ce + warmup * dkd
        return _f32(loss), {"ce": _f32(ce), "dkd": _f32(dkd), "warmup": warmup}


@dataclasses.dataclass(frozen=True)
class MLKD:
    """Multi-level logit distillation on a weak and a strong view (reference quirks kept)."""

    temperature: float = 4.0
    ce_weight: float = 0.1
    kd_weight: float = 0.9
    standardize: bool = False
    views: tuple[str, ...] = (WEAK, STRONG)
    needs_teacher: bool = True

    def init_params(self) -> dict[str, Array]:
        return {}

    def objective(self, method_params, student, teacher, labels, epoch):
        del method_params, epoch
        out = losses.mlkd_loss(
            student["weak"], student["strong"], teacher["weak"], teacher["strong"], labels,
            temperature=self.temperature, ce_weight=self.ce_weight, kd_weight=self.kd_weight,
            standardize=self.standardize,
        )
        terms = {k: _f32(out[k]) for k in ("ce", "kd", "cc", "bc")}
        return _f32(out["total"]), terms


@dataclasses.dataclass(frozen=True)
class CTKD:
    """Curriculum temperature KD, global variant.

    The learnable scalar ``g`` (``method_params["global_t"]``, initialised to ``init``) gives
    ``T = t_start + t_end * sigmoid(GRL(g, lambda(epoch)))``; the KD term uses ``T`` (on
    standardized logits when ``standardize``). With ``learn=False`` the fixed ``temperature`` is
    used instead (CTKD's ``kd_T``).
    """

    temperature: float = 4.0
    ce_weight: float = 0.1
    kd_weight: float = 0.9
    standardize: bool = False
    learn: bool = True
    init: float = 1.0
    t_start: float = 1.0
    t_end: float = 20.0
    lmax: float = 0.0
    lmin: float = -1.0
    loops: int = 10
    views: tuple[str, ...] = (WEAK,)
    needs_teacher: bool = True

    def init_params(self) -> dict[str, Array]:
        return {"global_t": jnp.full((), self.init, jnp.float32)} if self.learn else {}

    def temperature_and_lambda(self, method_params, epoch) -> tuple[Array, Array]:
        lam = losses.ctkd_lambda(epoch, lmax=self.lmax, lmin=self.lmin, loops=self.loops)
        if not self.learn:
            return _f32(self.temperature), _f32(lam)
        temp = losses.ctkd_temperature(
            method_params["global_t"], lam, t_start=self.t_start, t_end=self.t_end
        )
        return _f32(temp), _f32(lam)

    def objective(self, method_params, student, teacher, labels, epoch):
        s, t = student["weak"], teacher["weak"]
        temp, lam = self.temperature_and_lambda(method_params, epoch)
        ce = losses.cross_entropy(s, labels)
        kd = losses.kd_loss(s, t, temp, standardize=self.standardize)
        loss = self.ce_weight * ce + self.kd_weight * kd
        terms = {"ce": _f32(ce), "kd": _f32(kd), "temperature": jax.lax.stop_gradient(temp),
                 "lambda": lam}
        return _f32(loss), terms


#: The key of a student's distillation head in the ``student`` logits (DeiT's second head).
DIST_VIEW = f"{WEAK}_dist"


def head_logits(view: str, heads: Mapping[str, Array]) -> dict[str, Array]:
    """A student's ``return_heads=True`` output as objective logits: the class head at ``view``,
    a distillation head (DeiT) at ``view + "_dist"`` (:data:`DIST_VIEW` for the weak view)."""
    out = {view: heads["cls"]}
    if "dist" in heads:
        out[f"{view}_dist"] = heads["dist"]
    return out


def wants_heads(method: Method) -> bool:
    """Whether the step calls the student with ``return_heads=True`` for ``method``."""
    return bool(getattr(method, "student_heads", False))


def vit_kd_objective(
    cls_logits: Array,
    kd_logits: Array,
    teacher_logits: Array,
    labels: Array,
    *,
    temperature: float = 2.0,
    ce_weight: float = 0.5,
    logit_weight: float = 1.0,
    extra_weight: float = 10.0,
    standardize: bool = True,
) -> tuple[Array, dict[str, Array]]:
    """The ViT reference's loss: ``ce_weight CE(cls, y) + logit_weight w T^2 KL(Z(t)/T || Z(s)/T)``.

    ``cls_logits``, ``kd_logits`` (DeiT: the class and the distillation head; one head for the other
    students), ``teacher_logits`` ``[B, C]``, int ``labels [B]``. ``KL`` is the batch mean of
    ``sum_c p_t (log p_t - log p_s)`` with ``p = softmax(Z(l) / T)`` (``Z``: standardization with
    the unbiased std + 1e-7); without ``standardize`` no ``Z`` and ``w = 1`` (the reference's
    LOGIT_STANDARD false). ``w = extra_weight`` (EXTRA_WEIGHT_IN: DeiT 10, default 9).

    Returns ``(loss, terms)``: ``ce`` (unscaled CE), ``cls_loss = ce_weight CE`` and
    ``logit_distill_loss = logit_weight w KD`` as the reference logs them. At a constant row the
    std gets a zero gradient, as in PyTorch (finite gradients ``(g - mean g) / 1e-7``).
    """
    ce = losses.cross_entropy(cls_logits, labels)
    w = extra_weight if standardize else 1.0
    kd = losses.kd_loss(kd_logits, teacher_logits, temperature, standardize=standardize)
    cls_loss = ce_weight * ce
    distill = logit_weight * w * kd
    return cls_loss + distill, {"ce": ce, "cls_loss": cls_loss, "logit_distill_loss": distill}


@dataclasses.dataclass(frozen=True)
class ViTKD:
    """The ViT students' objective (:func:`vit_kd_objective`) with the reference's settings.

    ``student["weak"]`` is the class head (CE); KD is on ``student[DIST_VIEW]`` (DeiT's
    distillation head) when ``kd_head == "dist"``, on the class head when ``kd_head == "cls"``
    (T2T, PiT, PVT: which head the reference distilled is unknown).
    """

    temperature: float = 2.0
    ce_weight: float = 0.5
    logit_weight: float = 1.0
    extra_weight: float = 10.0
    standardize: bool = True
    kd_head: str = "dist"
    views: tuple[str, ...] = ("weak",)
    needs_teacher: bool = True

    def __post_init__(self):
        if self.kd_head not in ("dist", "cls"):
            raise ValueError(f"kd_head must be 'dist' or 'cls' (got {self.kd_head!r}).")

    @property
    def student_heads(self) -> bool:
        """KD on the distillation head needs the student's heads (``return_heads=True``)."""
        return self.kd_head == "dist"

    def init_params(self) -> dict[str, Array]:
        return {}

    def objective(self, method_params, student, teacher, labels, epoch):
        del method_params, epoch
        if self.kd_head == "dist" and DIST_VIEW not in student:
            raise ValueError(
                f"kd_head='dist' needs the student's distillation head ({DIST_VIEW!r}: DeiT's "
                "return_heads=True); use kd_head='cls' for a single-head student."
            )
        s_kd = student[DIST_VIEW] if self.kd_head == "dist" else student["weak"]
        loss, terms = vit_kd_objective(
            student["weak"], s_kd, teacher["weak"], labels, temperature=self.temperature,
            ce_weight=self.ce_weight, logit_weight=self.logit_weight,
            extra_weight=self.extra_weight, standardize=self.standardize,
        )
        return _f32(loss), {k: _f32(v) for k, v in terms.items()}


_BY_NAME: dict[str, type] = {"ce": CrossEntropy, "kd": KD, "dkd": DKD, "mlkd": MLKD, "ctkd": CTKD,
                             "vit_kd": ViTKD}


def from_config(method: Mapping[str, Any]) -> Method:
    """Builds a method from ``config.method`` (``name`` picks the class; other keys are fields).

    Raises:
      ValueError: unknown ``name`` or a setting the method does not have.
    """
    settings = dict(method)
    name = settings.pop("name", None)
    if name not in _BY_NAME:
        raise ValueError(f"unknown method name {name!r}; use one of {', '.join(_BY_NAME)}.")
    cls = _BY_NAME[name]
    nested = settings.pop("ctkd", None)
    if nested is not None:
        settings.update(dict(nested))
    fields = {f.name for f in dataclasses.fields(cls) if f.name not in ("views", "needs_teacher")}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise ValueError(
            f"method {name!r} has no setting {', '.join(unknown)}; valid: {', '.join(sorted(fields))}."
        )
    return cls(**settings)
