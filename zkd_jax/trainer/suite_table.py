"""The table a suite prints at its end (``zkd_jax.trainer.suite.report``): per method, the final
and the best test top-1 over seeds.

Rows are the suite's entries (split by the settings a ``config.sweep`` varies besides ``seed``);
each gives the mean ± sample std (``ddof=1``) over its students of the final (last epoch) and of
the best test top-1, and below the table the per-seed values. The footer is computed from the run:
epochs, training and test images, seeds per method, the teacher's architecture, epochs and seed.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from zkd_jax import data
from zkd_jax.configs import sweep as sweep_lib
from zkd_jax.trainer.teacher_runs import TEACHER_SUBDIR

_SHORT = {"temperature": "T", "kd_weight": "kd", "ce_weight": "ce"}


def sweeps_settings(config: ml_collections.ConfigDict) -> list[str]:
    """The keys ``config.sweep`` varies besides ``seed`` (empty: a sweep over seeds, or none)."""
    return [k for k, _ in sweep_lib.parse(config.get("sweep") or "") if k != "seed"]


def _students(result: dict) -> list[dict]:
    return list(result["students"]) if result.get("students") else [result]


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def method_rows(config: ml_collections.ConfigDict, results: dict[str, dict]) -> list[dict[str, Any]]:
    """One dict per (entry, swept settings): ``name``, ``label``, ``seeds``, ``final``, ``best``."""
    keys = sweeps_settings(config)
    rows: list[dict[str, Any]] = []
    for name, result in results.items():
        if name == TEACHER_SUBDIR:
            continue
        by_setting: dict[tuple, list[dict]] = {}
        for s in _students(result):
            method = (s.get("config") or {}).get("method") or {}
            by_setting.setdefault(tuple(method.get(k) for k in keys), []).append(s)
        for values, students in by_setting.items():
            setting = " ".join(f"{_SHORT.get(k, k)}={v}" for k, v in zip(keys, values))
            done = [s for s in students if s.get("last_top1") is not None]
            rows.append({
                "name": name, "label": name + (f" ({setting})" if setting else ""),
                "seeds": [int(s.get("seed", 0)) for s in done],
                "final": [float(s["last_top1"]) for s in done],
                "best": [float(s["best_top1"]) for s in done],
                "best_epoch": [int(s["best_epoch"]) for s in done],
            })
    return rows


def footer(config: ml_collections.ConfigDict, results: dict[str, dict],
           rows: list[dict[str, Any]]) -> str:
    """What the numbers are, every number taken from ``config`` and the results."""
    seeds = sorted({len(r["seeds"]) for r in rows}) or [0]
    n_seeds = "/".join(map(str, seeds))
    teacher = results.get(TEACHER_SUBDIR) or {}
    t_config = teacher.get("config") or {}
    n_train = data.num_train_examples(config.dataset, config.get("train_examples", -1))
    n_test = data.info(config.dataset).num_test
    held_out = "validation" if config.dataset.endswith("_val") else "test"
    text = (f"{config.epochs} epoch{'s' if config.epochs != 1 else ''} on {n_train:,} {config.dataset} training images ({n_test} "
            f"{held_out} images), {n_seeds} seed{'s' if seeds != [1] else ''} per method, every "
            f"student distilled from one teacher ({config.teacher.arch}")
    if t_config:
        e = t_config.get("epochs")
        text += f", {e} epoch{'s' if e != 1 else ''}, seed {t_config.get('seed')}"
    text += "). Mean ± sample std over seeds."
    if seeds == [1]:
        text += " With one seed per method a gap between methods is not a result."
    if config.dataset.startswith("digits"):
        text += (" A small task: this measures the methods here, with the same protocol for each "
                 "(docs/demo.md), not the paper's claim about CIFAR-100 and ImageNet after 240 / "
                 "100 epochs.")
    return text


def format_table(config: ml_collections.ConfigDict, results: dict[str, dict]) -> str:
    """The text table (module docstring) with its footer."""
    rows = method_rows(config, results)
    teacher = results.get(TEACHER_SUBDIR) or {}
    head = ("run", "model", "final top-1", "best top-1", "n")
    split = "validation" if config.dataset.endswith("_val") else "test"
    lines = [head]
    if teacher.get("last_top1") is not None:
        lines.append((TEACHER_SUBDIR, str(config.teacher.arch), f"{teacher['last_top1']:.2f}",
                      f"{teacher['best_top1']:.2f}", "1"))
    model = f"{config.student.arch} <- {config.teacher.arch}"
    for r in rows:
        lines.append((r["label"], model, _mean_std(r["final"]), _mean_std(r["best"]),
                      str(len(r["final"]))))
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip() for x in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    per_seed = [f"{r['label']}: " + ", ".join(
        f"seed {s} {f:.2f}/{b:.2f}" for s, f, b in zip(r["seeds"], r["final"], r["best"]))
        for r in rows if len(r["final"]) > 1]
    if per_seed:
        text += ["", "per seed (final/best):"] + ["  " + p for p in per_seed]
    return (f"{config.dataset} {split} top-1 (%)\n" + "\n".join(text) + "\n\n"
            + footer(config, results, rows))
