"""Figures of zkd-report (matplotlib, Agg backend, PNG).

* ``plot_group(group, path, references)``: test top-1 and train loss per epoch; the mean over the
  group's seeds as a line with a band from the min to the max, and the reference's curves of the
  same method and pair (``Worklog`` runs) drawn beside it.
* ``plot_sweep(groups, path)``: a heat map of best top-1 (mean over seeds) over the two settings a
  sweep varies (one setting: a single row).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from zkd_jax.report.table import Group, method_title, row
from zkd_jax.report.worklog import Worklog


def _pyplot():
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    return plt


def epoch_matrix(group: Group, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(epochs [E], values [runs, E]) of ``key`` per epoch; NaN where a run lacks that epoch."""
    epochs = sorted({int(r["epoch"]) for run in group.runs for r in run.records
                     if isinstance(r.get(key), (int, float)) and "epoch" in r})
    index = {e: i for i, e in enumerate(epochs)}
    values = np.full((len(group.runs), len(epochs)), np.nan)
    for k, run in enumerate(group.runs):
        for r in run.records:
            if isinstance(r.get(key), (int, float)) and r.get("epoch") in index:
                values[k, index[int(r["epoch"])]] = float(r[key])
    return np.asarray(epochs), values


def _norm_arch(name: str | None) -> str:
    """Architecture names of the reference's file names vs zkd_jax's (``res32x4`` = ``resnet32x4``)."""
    text = str(name or "").lower().replace("-", "_")
    return re.sub(r"^res(?=\d)", "resnet", text)


def matching_logs(group: Group, logs: list[Worklog]) -> list[Worklog]:
    """The reference logs of the group's method (LS or not alike) and pair."""
    base = group.method[:-3] if group.method.endswith("_ls") else group.method
    out = []
    for log in logs:
        if log.method is None:
            continue
        name = log.method.lower().replace("+", "_")
        name = name[:-3] if name.endswith("_ls") else name
        if (name == base and _norm_arch(log.teacher) == _norm_arch(group.teacher)
                and _norm_arch(log.student) == _norm_arch(group.student)):
            out.append(log)
    return out


def group_title(group: Group) -> str:
    settings = " ".join(f"{k.split('.')[-1]}={v}" for k, v in group.varying.items())
    return (f"{group.dataset}: {method_title(group.method)} {group.pair}"
            + (f" ({settings})" if settings else "") + f", n={len(group.runs)}")


def plot_group(group: Group, path: str, references: list[Worklog] = ()) -> str:
    """Writes the curves of one group to ``path`` (PNG); returns ``path``."""
    return _save(group_figure(group, references), path)


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=80)
    _pyplot().close(fig)
    return path


def group_figure(group: Group, references: list[Worklog] = ()):
    """The matplotlib figure of ``plot_group`` (two axes: test top-1, train loss per epoch)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    panels = ((axes[0], "top1", "test_acc", "test top-1 (%)"),
              (axes[1], "train_loss", "train_loss", "train loss"))
    for ax, key, ref_key, ylabel in panels:
        epochs, values = epoch_matrix(group, key)
        if epochs.size:
            with np.errstate(all="ignore"):
                import warnings  # pylint: disable=import-outside-toplevel

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    mean = np.nanmean(values, axis=0)
                    low, high = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
            label = f"zkd_jax mean of {values.shape[0]}" if values.shape[0] > 1 else "zkd_jax"
            ax.plot(epochs, mean, marker="o", markersize=3, label=label, color="C0")
            if values.shape[0] > 1:
                ax.fill_between(epochs, low, high, alpha=0.25, color="C0", label="min-max")
        for i, log in enumerate(references):
            x, y = log.series(ref_key)
            if x:
                ax.plot(x, y, linewidth=1, color=f"C{i + 1}", label=f"reference {log.label}")
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(group_title(group), fontsize=9)
    fig.tight_layout()
    return fig


def sweep_families(groups: list[Group]) -> list[list[Group]]:
    """Groups of the same (dataset, method, pair) that differ in one or two settings."""
    families: dict[Any, list[Group]] = {}
    for g in groups:
        if 1 <= len(g.varying) <= 2:
            families.setdefault((g.dataset, g.method, g.teacher, g.student,
                                 tuple(g.varying)), []).append(g)
    return [f for f in families.values() if len(f) > 1]


def _sort_key(value: Any) -> tuple:
    return (0, float(value), "") if isinstance(value, (int, float)) else (1, 0.0, str(value))


def sweep_grid(family: list[Group]) -> tuple[list[str], list[Any], list[Any], np.ndarray]:
    """(setting names, x values, y values, best top-1 means [len(y), len(x)], NaN where absent)."""
    keys = list(family[0].varying)
    xs = sorted({g.varying[keys[0]] for g in family}, key=_sort_key)
    ys = sorted({g.varying[keys[1]] for g in family}, key=_sort_key) if len(keys) > 1 else [None]
    grid = np.full((len(ys), len(xs)), np.nan)
    for g in family:
        y = g.varying[keys[1]] if len(keys) > 1 else None
        mean = row(g)["best_top1_mean"]
        if mean is not None:
            grid[ys.index(y), xs.index(g.varying[keys[0]])] = mean
    return keys, xs, ys, grid


def plot_sweep(family: list[Group], path: str) -> str:
    """Heat map of best top-1 (mean over seeds) over the swept settings; returns ``path``."""
    return _save(sweep_figure(family), path)


def sweep_figure(family: list[Group]):
    """The matplotlib figure of ``plot_sweep`` (one axes and its colour bar)."""
    plt = _pyplot()
    keys, xs, ys, grid = sweep_grid(family)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(xs), 1.6 + 0.6 * len(ys)))
    image = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set_xlabel(keys[0].split(".")[-1])
    ax.set_yticks(range(len(ys)), ["-" if y is None else str(y) for y in ys])
    ax.set_ylabel(keys[1].split(".")[-1] if len(keys) > 1 else "")
    g = family[0]
    n = sorted({len(x.runs) for x in family})
    ax.set_title(f"{method_title(g.method)} {g.pair}: best top-1 (%), mean of "
                 f"{'/'.join(map(str, n))} seeds", fontsize=8)
    fig.colorbar(image, ax=ax, label="best top-1 (%)")
    fig.tight_layout()
    return fig
