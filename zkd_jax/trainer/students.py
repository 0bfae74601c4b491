"""The students of a run: ``config.students`` parsed into specs, their configs and directories.

No ``config.students`` means one student: the run's own seed and method, its outputs in the workdir
itself. ``config.students`` lists K students of ``config.student.arch``; each entry is a dict with a
``seed`` (its initialization and in-step randomness, exactly as a single run of that seed) and
optionally any setting of ``config.method`` to override for that student (``temperature``,
``kd_weight``, DKD's ``alpha``/``beta``, ...). All students see the same batches (the data order
follows ``config.seed``). Each of K > 1 students writes to ``workdir/student_<k>/``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from zkd_jax import methods as methods_lib
from zkd_jax.configs import sweep
from zkd_jax.methods import Method

STUDENT_DIR = "student_{}"

@dataclasses.dataclass(frozen=True)
class StudentSpec:
    """One student of ``config.students``: its seed and its full method settings."""

    seed: int
    method: dict


def student_specs(config) -> list[StudentSpec]:
    """Parses ``config.students`` into K specs (empty list: no ``config.students``).

    Each entry is a dict ``{"seed": int, **method overrides}`` (a bare int is a seed).

    Raises:
      ValueError: an entry without a seed, an override the method does not have, or ``name``.
    """
    entries = config.get("students") or ()
    if config.get("sweep"):
        if entries:
            raise ValueError("set config.students or config.sweep, not both.")
        entries = sweep.expand(config.sweep, default_seed=int(config.get("seed", 0)))
    base = dict(config.method.to_dict() if hasattr(config.method, "to_dict") else config.method)
    specs = []
    for k, entry in enumerate(entries):
        entry = {"seed": entry} if isinstance(entry, (int, np.integer)) else dict(entry)
        if "seed" not in entry:
            raise ValueError(f"config.students[{k}] has no 'seed'; give every student a seed, "
                             "e.g. {'seed': 1, 'temperature': 3.0}.")
        seed = int(entry.pop("seed"))
        if "name" in entry:
            raise ValueError(f"config.students[{k}] sets the method name; all students share "
                             "config.method.name, so remove 'name' from the entry.")
        settings = dict(base)
        ctkd = dict(settings.get("ctkd") or {})
        for key, value in entry.items():
            if key in ctkd:
                ctkd[key] = value
            else:
                settings[key] = value
        if ctkd:
            settings["ctkd"] = ctkd
        methods_lib.from_config(settings)  # raises the ValueError of an unknown setting
        specs.append(StudentSpec(seed=seed, method=settings))
    return specs


def build_methods(specs: Sequence[StudentSpec]) -> list[Method]:
    """The K methods; they must share class, views and parameter structure.

    Raises:
      ValueError: two students' methods differ in parameter structure (e.g. CTKD ``learn``).
    """
    built = [methods_lib.from_config(s.method) for s in specs]
    first = jax.tree.structure(built[0].init_params())
    for k, m in enumerate(built[1:], 1):
        if jax.tree.structure(m.init_params()) != first or m.views != built[0].views:
            raise ValueError(f"config.students[{k}] changes the method's parameters or views; "
                             "students may differ only in numeric settings such as temperature.")
    return built


def student_config(config: ml_collections.ConfigDict, spec) -> ml_collections.ConfigDict:
    """The single-run config of one student: its seed and method settings, no ``students``."""
    c = copy.deepcopy(config)
    with c.unlocked():
        c.seed = spec.seed
        c.method = ml_collections.ConfigDict(spec.method)
        c.students = ()
        if "sweep" in c:
            c.sweep = ""
    return c


def run_students(config) -> tuple[list[StudentSpec], bool]:
    """``(specs, single)``: the K >= 1 students of a run; ``single`` when ``config.students`` is
    empty (one student of ``config.seed`` and ``config.method``, outputs in the workdir)."""
    specs = student_specs(config)
    if specs:
        return specs, False
    method = config.method.to_dict() if hasattr(config.method, "to_dict") else dict(config.method)
    return [StudentSpec(seed=int(config.seed), method=method)], True


def resume_step(checkpointers) -> int | None:
    """The newest step every student has a checkpoint of (None: a fresh start).

    Raises:
      ValueError: the students' checkpoints share no step.
    """
    latest = [c.latest_step() for c in checkpointers]
    if all(s is None for s in latest):
        return None
    if len(checkpointers) == 1:
        return latest[0]
    common = set.intersection(*(set(c.last.all_steps()) for c in checkpointers))
    if not common:
        raise ValueError(
            "the students' checkpoints share no step (a run stopped while saving); delete the "
            "newest checkpoints/<step> folders until every student_<k> has the same newest step."
        )
    return max(common)


__all__ = ["STUDENT_DIR", "StudentSpec", "build_methods", "resume_step", "run_students",
           "student_config", "student_specs"]
