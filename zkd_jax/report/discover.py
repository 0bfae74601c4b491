"""Finding and reading the runs under some directories: ``find_runs(paths) -> (runs, problems)``.

A run directory holds ``summary.json`` and/or ``metrics.jsonl`` (``zkd_jax.io.metrics``). Three
layouts are recognised, at any depth under the given paths:

* a single run (``zkd-train`` of one config);
* a K-student program: ``WORKDIR/student_<k>/`` are the runs (``WORKDIR/summary.json`` lists them);
* the demo suite: ``WORKDIR/teacher/`` and one directory per student, each a single run.

``checkpoints*/``, ``export/`` and ``tensorboard/`` are not searched. A run that lacks a file is
read as far as it goes and named in ``problems``; nothing here raises for a broken run. Files only:
no TensorFlow, no JAX, no network.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

from zkd_jax.io import metrics as metrics_io

SUMMARY = "summary.json"
METRICS = metrics_io.METRICS
_SKIP = ("checkpoints", "checkpoints_best", "checkpoints_damaged", "export", "tensorboard")
_STUDENT = re.compile(r"^student_\d+$")

#: Config fields that are not settings of the experiment (where and how a run executes).
RUNTIME_KEYS = frozenset({
    "data_dir", "distributed", "progress_bar", "log_every_steps", "checkpoint_every_epochs",
    "checkpoint_every_steps", "keep_checkpoints", "export", "students", "students_form",
    "suite", "sweep", "paper", "teacher.checkpoint", "teacher.train_if_missing", "teacher.recipe",
    "eval_batch_size", "input_pipeline", "steps_per_call", "variant", "seed", "max_steps",
    "eval_every_epochs",
})


@dataclasses.dataclass
class Run:
    """One run as read from its directory.

    Attributes:
      path: the run directory.
      name: its path relative to the directory the search started from (the run's name in tables).
      summary: ``summary.json`` (None when missing or unreadable).
      records: the ``metrics.jsonl`` records, in file order.
      problems: what is missing or broken, in words.
    """

    path: str
    name: str
    summary: dict[str, Any] | None
    records: list[dict[str, Any]]
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def config(self) -> dict[str, Any]:
        return dict((self.summary or {}).get("config") or {})

    @property
    def finished(self) -> bool:
        return bool((self.summary or {}).get("finished"))

    @property
    def seed(self) -> int | None:
        s = self.summary or {}
        for value in (s.get("seed"), s.get("student_seed"), self.config.get("seed")):
            if value is not None:
                return int(value)
        return None


def method_label(method: dict[str, Any]) -> str:
    """``kd``, ``kd_ls``, ``dkd_ls``, ... of a method config (``teacher`` for cross-entropy)."""
    name = str(method.get("name") or "?")
    if name == "ce":
        return "teacher"
    return f"{name}_ls" if method.get("standardize") else name


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``; lists become tuples (hashable)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out


def identity(run: Run) -> dict[str, Any] | None:
    """(dataset, method, teacher, student) of a run and its settings except the seed; None
    without a config. ``settings`` maps dotted config names to values (``method.temperature``)."""
    config = run.config
    if not config:
        return None
    flat = flatten(config)
    settings = {k: v for k, v in flat.items()
                if not any(k == r or k.startswith(r + ".") for r in RUNTIME_KEYS)
                and k not in ("dataset", "model_dataset", "student.arch", "teacher.arch")}
    method = config.get("method") or {}
    teacher = (config.get("teacher") or {}).get("arch")
    if method.get("name") == "ce":
        teacher = None
    return {"dataset": config.get("dataset"), "method": method_label(method), "teacher": teacher,
            "student": (config.get("student") or {}).get("arch"), "settings": settings}


def _read_json(path: str, problems: list[str], name: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        problems.append(f"{name}: {os.path.basename(path)} is unreadable ({err})")
        return None


def _read_records(path: str, problems: list[str], name: str) -> list[dict]:
    """The good records of a ``metrics.jsonl``; each damaged line (cut, not JSON, not UTF-8) is
    skipped and named in ``problems`` with the file's path."""
    try:
        records, damaged = metrics_io.read_records(path)
    except OSError as err:
        problems.append(f"{name}: {METRICS} is unreadable ({err})")
        return []
    problems.extend(f"{name}: {line}; skipped" for line in damaged)
    return records


def read_run(path: str, name: str) -> Run:
    """Reads one run directory; missing files are noted in ``Run.problems``."""
    problems: list[str] = []
    summary_path, metrics_path = os.path.join(path, SUMMARY), os.path.join(path, METRICS)
    summary = _read_json(summary_path, problems, name) if os.path.isfile(summary_path) else None
    if not os.path.isfile(summary_path):
        problems.append(f"{name}: no {SUMMARY} (its method and settings are unknown; "
                        "not in the table)")
    records = _read_records(metrics_path, problems, name) if os.path.isfile(metrics_path) else []
    if not os.path.isfile(metrics_path):
        problems.append(f"{name}: no {METRICS} (no curves; the table uses {SUMMARY})")
    run = Run(path=path, name=name, summary=summary, records=records, problems=problems)
    if summary is not None and not run.finished:
        problems.append(f"{name}: unfinished (epoch {summary.get('last_epoch')} of "
                        f"{run.config.get('epochs')}); marked in the table")
    return run


def _is_run_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, SUMMARY)) or os.path.isfile(
        os.path.join(path, METRICS))


def find_runs(paths: list[str]) -> tuple[list[Run], list[str]]:
    """Every run under ``paths`` (see the module docstring); returns (runs, problems).

    A path that does not exist or holds no run is named in ``problems``.
    """
    runs: list[Run] = []
    problems: list[str] = []
    for top in paths:
        top = os.path.abspath(top)
        if not os.path.isdir(top):
            problems.append(f"{top}: not a directory")
            continue
        base = os.path.dirname(top)
        found = 0
        for root, dirs, _ in os.walk(top):
            dirs[:] = sorted(d for d in dirs if d not in _SKIP)
            students = [d for d in dirs if _STUDENT.match(d)]
            if students:  # a K-student program: its students are the runs
                dirs[:] = [d for d in dirs if d not in students]
                students.sort(key=lambda d: int(d.split("_")[1]))
                for d in students:
                    runs.append(read_run(os.path.join(root, d),
                                         os.path.relpath(os.path.join(root, d), base)))
                    found += 1
                continue
            if _is_run_dir(root):
                runs.append(read_run(root, os.path.relpath(root, base)))
                found += 1
        if not found:
            problems.append(f"{top}: no run found (no {SUMMARY} or {METRICS} below it)")
    for run in runs:
        problems.extend(run.problems)
    return runs, problems
