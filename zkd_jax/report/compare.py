"""Methods side by side (zkd-report's ``compare_<i>.png``): the groups of one dataset and pair.

``compare_families(groups)`` finds the student groups of one (dataset, teacher, student) that differ
in their method or settings (KD and KD+LS of the demo) with the teacher run(s) they distilled from;
``compare_figure(students, teachers)`` draws them on shared axes:

* test top-1 per epoch: per group the mean over its seeds as a line and a band of ± one sample
  std (``ddof=1``), the teacher's final test top-1 as a horizontal line;
* the train loss per term: cross-entropy (``train_ce``) and the distillation term without its
  weight (``train_kd``, the ``kd`` of ``zkd_jax.methods``), so methods of different weights compare.

Every number in the title and legend comes from the runs (epochs, seeds, settings).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np

from zkd_jax.report.curves import _pyplot, epoch_matrix
from zkd_jax.report.table import Group, method_title

#: (metrics key, y label) of the panels after test top-1.
LOSS_PANELS = (("train_ce", "train cross-entropy"),
               ("train_kd", "train KD term (÷ its weight)"))
MAX_GROUPS = 8


def _mean_std(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-epoch mean and sample std over runs (std 0 for one run); NaN-aware."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(values, axis=0)
        if values.shape[0] > 1:
            std = np.nanstd(values, axis=0, ddof=1)
        else:
            std = np.zeros_like(mean)
    return mean, np.nan_to_num(std)


def _teacher_path(group: Group) -> str | None:
    for run in group.runs:
        path = (run.config.get("teacher") or {}).get("checkpoint")
        if path:
            return os.path.normpath(str(path))
    return None


def compare_families(groups: list[Group]) -> list[tuple[list[Group], list[Group]]]:
    """``[(student groups, teacher groups)]``: per (dataset, teacher, student) with at least two
    student groups (at most ``MAX_GROUPS``), and the teacher runs their configs name (else every
    teacher group of that dataset and architecture)."""
    families: dict[Any, list[Group]] = {}
    for g in groups:
        if g.method != "teacher":
            families.setdefault((g.dataset, g.teacher, g.student), []).append(g)
    out = []
    for (dataset, teacher_arch, _), members in families.items():
        if not 2 <= len(members) <= MAX_GROUPS:
            continue
        teachers = [g for g in groups if g.method == "teacher" and g.dataset == dataset
                    and g.student == teacher_arch]
        used = {_teacher_path(g) for g in members}
        named = [g for g in teachers
                 if any(os.path.normpath(r.path) in used for r in g.runs)]
        out.append((members, named or teachers))
    return out


#: Settings named in the legend (short name, dotted config name), when a group has them.
LEGEND_SETTINGS = (("T", "method.temperature"), ("kd", "method.kd_weight"),
                   ("lr", "optimizer.lr"))


def group_label(group: Group) -> str:
    """``KD (T=4.0 kd=0.9 lr=0.1), n=3``: the method, its main settings and its number of seeds."""
    shown = [f"{short}={group.settings[key]}" for short, key in LEGEND_SETTINGS
             if key in group.settings]
    shown += [f"{k.split('.')[-1]}={v}" for k, v in group.varying.items()
              if k not in dict((key, 0) for _, key in LEGEND_SETTINGS)]
    return (f"{method_title(group.method)}" + (f" ({' '.join(shown)})" if shown else "")
            + f", n={len(group.runs)}")


def figure_title(students: list[Group]) -> str:
    """``digits: resnet8 <- resnet14, 5 epochs, 3 seeds per method (mean ± 1 std)``."""
    g = students[0]
    epochs = sorted({int(r.config.get("epochs", 0)) for s in students for r in s.runs})
    seeds = sorted({len(s.runs) for s in students})
    n = "/".join(map(str, seeds))
    return (f"{g.dataset}: {g.student} <- {g.teacher}, {'/'.join(map(str, epochs))} epochs, "
            f"{n} seed{'s' if seeds != [1] else ''} per method (mean ± 1 std)")


def compare_figure(students: list[Group], teachers: list[Group] = ()):
    """The matplotlib figure (module docstring): axes 0 test top-1, then ``LOSS_PANELS``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 1 + len(LOSS_PANELS), figsize=(13, 3.9))
    for ax, key, ylabel in ((axes[0], "top1", "test top-1 (%)"),
                            *((a, k, y) for a, (k, y) in zip(axes[1:], LOSS_PANELS))):
        for i, g in enumerate(students):
            epochs, values = epoch_matrix(g, key)
            if not epochs.size:
                continue
            mean, std = _mean_std(values)
            ax.plot(epochs, mean, marker="o", markersize=3, color=f"C{i}", label=group_label(g))
            if values.shape[0] > 1:
                ax.fill_between(epochs, mean - std, mean + std, alpha=0.2, color=f"C{i}",
                                linewidth=0)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for j, t in enumerate(teachers):
        finals = [r.summary.get("last_top1") for r in t.runs if r.summary]
        finals = [float(v) for v in finals if isinstance(v, (int, float))]
        if finals:
            axes[0].axhline(float(np.mean(finals)), color="k", linestyle="--" if j == 0 else ":",
                            linewidth=1, label=f"teacher {t.student} ({np.mean(finals):.2f})")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(figure_title(students), fontsize=9)
    fig.tight_layout()
    return fig


def plot_compare(students: list[Group], teachers: list[Group], path: str) -> str:
    """Writes ``compare_figure`` to ``path`` (PNG, written to a temporary name, then renamed)."""
    fig = compare_figure(students, teachers)
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=80)
    _pyplot().close(fig)
    os.replace(tmp, path)
    return path
