"""Groups of runs and their table: ``group_runs(runs)``, ``rows(groups)``, ``write_tables(...)``.

A group is every run with the same (dataset, method, teacher, student) and the same settings
except the seed (``runs.identity``). Per group, over its n runs (unfinished ones included and
counted in ``unfinished``):

* ``best_top1``: mean and sample std (``ddof=1``; None for n = 1) of each run's best test top-1;
* ``last_top1``: the same for the last evaluated epoch;
* ``best_epoch``: mean epoch of the best top-1; ``top5``: mean top-5 at that epoch;
* ``paper_top1`` (``config.paper.top1``) and ``diff = best_top1.mean - paper_top1``;
* ``wall_seconds``: mean per run (``summary.json``'s ``wall_seconds``, else the sum of the epochs'
  ``epoch_seconds``); ``images_per_sec``: mean over runs of each run's median epoch throughput.

Tables: Markdown, CSV and JSON; ``layout="paper"`` gives the paper's shape (rows: methods with and
without LS, columns: teacher -> student pairs, cells: best top-1 mean ± std).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from typing import Any

import numpy as np

from zkd_jax.report.discover import Run, identity

#: Row order of the paper's tables.
METHOD_ORDER = ("teacher", "kd", "kd_ls", "ctkd", "ctkd_ls", "dkd", "dkd_ls", "mlkd", "mlkd_ls")


def method_title(label: str) -> str:
    """``kd_ls -> KD+LS``, ``teacher -> teacher``."""
    if label == "teacher":
        return label
    return label[:-3].upper() + "+LS" if label.endswith("_ls") else label.upper()


@dataclasses.dataclass
class Group:
    """Runs that differ only in their seed. ``settings``: dotted config name -> value."""

    dataset: str | None
    method: str
    teacher: str | None
    student: str | None
    settings: dict[str, Any]
    runs: list[Run]
    varying: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def pair(self) -> str:
        return self.student or "?" if self.teacher is None else f"{self.teacher} -> {self.student}"


def group_runs(runs: list[Run]) -> list[Group]:
    """Groups the runs that have a config; ``Group.varying`` holds the settings that differ
    between groups of the same (dataset, method, pair): what names a sweep point."""
    groups: dict[Any, Group] = {}
    for run in runs:
        ident = identity(run)
        if ident is None:
            continue
        key = (ident["dataset"], ident["method"], ident["teacher"], ident["student"],
               tuple(sorted((k, repr(v)) for k, v in ident["settings"].items())))
        if key not in groups:
            groups[key] = Group(ident["dataset"], ident["method"], ident["teacher"],
                                ident["student"], ident["settings"], [])
        groups[key].runs.append(run)
    out = list(groups.values())
    families: dict[Any, list[Group]] = {}
    for g in out:
        families.setdefault((g.dataset, g.method, g.teacher, g.student), []).append(g)
    for family in families.values():
        if len(family) < 2:
            continue
        keys = sorted({k for g in family for k in g.settings})
        varying = [k for k in keys if len({repr(g.settings.get(k)) for g in family}) > 1]
        for g in family:
            g.varying = {k: g.settings.get(k) for k in varying}
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    out.sort(key=lambda g: (str(g.dataset), str(g.teacher or ""), str(g.student),
                            order.get(g.method, len(order)), g.method,
                            tuple(str(v) for v in g.varying.values())))
    return out


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    a = np.asarray(values, np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if a.size > 1 else None)


def _best_record(run: Run) -> dict | None:
    evaluated = [r for r in run.records if isinstance(r.get("top1"), (int, float))]
    return max(evaluated, key=lambda r: r["top1"]) if evaluated else None


def run_numbers(run: Run) -> dict[str, Any]:
    """best/last top-1, best epoch, top-5 at the best epoch, wall time and images/s of one run."""
    s = run.summary or {}
    best_rec = _best_record(run)
    best = s.get("best_top1", best_rec["top1"] if best_rec else None)
    best_epoch = s.get("best_epoch", best_rec["epoch"] if best_rec else None)
    last_rec = run.records[-1] if run.records else None
    last = s.get("last_top1", last_rec.get("top1") if last_rec else None)
    top5 = None
    for r in run.records:
        if r.get("epoch") == best_epoch and isinstance(r.get("top5"), (int, float)):
            top5 = float(r["top5"])
    wall = s.get("wall_seconds")
    if wall is None and run.records:
        wall = float(sum(r.get("epoch_seconds", 0.0) + r.get("eval_seconds", 0.0)
                         for r in run.records))
    rates = [r["images_per_sec"] for r in run.records
             if isinstance(r.get("images_per_sec"), (int, float))]
    rate = s.get("images_per_sec", float(np.median(rates)) if rates else None)
    return {"best_top1": best, "best_epoch": best_epoch, "last_top1": last, "top5": top5,
            "wall_seconds": wall, "images_per_sec": rate}


def _present(values: list[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float))]


def row(group: Group) -> dict[str, Any]:
    """The table row of one group (see the module docstring)."""
    numbers = [run_numbers(r) for r in group.runs]
    col = {k: _present([n[k] for n in numbers]) for k in numbers[0]}
    best_mean, best_std = _mean_std(col["best_top1"])
    last_mean, last_std = _mean_std(col["last_top1"])
    paper = next((r.config.get("paper", {}).get("top1") for r in group.runs
                  if r.config.get("paper", {}).get("top1") is not None), None)
    return {
        "dataset": group.dataset, "method": group.method, "teacher": group.teacher,
        "student": group.student, "settings": {k: v for k, v in group.varying.items()},
        "n": len(group.runs), "seeds": [r.seed for r in group.runs],
        "unfinished": [r.name for r in group.runs if not r.finished],
        "best_top1_mean": best_mean, "best_top1_std": best_std,
        "last_top1_mean": last_mean, "last_top1_std": last_std,
        "best_epoch_mean": _mean_std(col["best_epoch"])[0],
        "top5_mean": _mean_std(col["top5"])[0],
        "paper_top1": paper,
        "diff_to_paper": None if paper is None or best_mean is None else best_mean - paper,
        "wall_seconds_mean": _mean_std(col["wall_seconds"])[0],
        "images_per_sec_mean": _mean_std(col["images_per_sec"])[0],
        "runs": [r.name for r in group.runs],
    }


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _settings_text(settings: dict[str, Any]) -> str:
    return " ".join(f"{k.split('.')[-1]}={v}" for k, v in settings.items()) or "-"


COLUMNS = ("dataset", "method", "pair", "settings", "n", "best top-1", "last top-1", "best epoch",
           "top-5", "paper", "diff", "wall s", "images/s")


def _cells(r: dict[str, Any]) -> list[str]:
    pair = r["student"] if r["teacher"] is None else f"{r['teacher']} -> {r['student']}"
    n = str(r["n"]) + (f" ({len(r['unfinished'])} unfinished)" if r["unfinished"] else "")
    diff = "-" if r["diff_to_paper"] is None else f"{r['diff_to_paper']:+.2f}"
    return [str(r["dataset"]), method_title(r["method"]), str(pair),
            _settings_text(r["settings"]), n,
            _pm(r["best_top1_mean"], r["best_top1_std"]),
            _pm(r["last_top1_mean"], r["last_top1_std"]), _f(r["best_epoch_mean"], 1),
            _f(r["top5_mean"]), _f(r["paper_top1"]), diff, _f(r["wall_seconds_mean"], 0),
            _f(r["images_per_sec_mean"], 0)]


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in cells) + " |" for cells in body]
    return "\n".join(lines)


def runs_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    return list(COLUMNS), [_cells(r) for r in rows]


def paper_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Rows: methods in the paper's order (with a sweep point's settings); columns: pairs."""
    pairs: list[str] = []
    lines: dict[str, dict[str, str]] = {}
    for r in rows:
        pair = r["student"] if r["teacher"] is None else f"{r['teacher']} -> {r['student']}"
        if pair not in pairs:
            pairs.append(pair)
        name = method_title(r["method"])
        if r["settings"]:
            name += f" ({_settings_text(r['settings'])})"
        cell = _pm(r["best_top1_mean"], r["best_top1_std"]) + f" (n={r['n']})"
        if r["paper_top1"] is not None:
            cell += f" [paper {r['paper_top1']:.2f}]"
        lines.setdefault(name, {})[pair] = cell
    return ["method", *pairs], [[name, *(cells.get(p, "-") for p in pairs)]
                                for name, cells in lines.items()]


def footer(rows: list[dict[str, Any]], problems: list[str]) -> str:
    notes = ["best top-1 / last top-1: mean ± sample std (ddof=1) over the n seeds, test "
             "accuracy in %; top-5 at the best epoch; diff = best top-1 mean - paper; wall s: "
             "mean per run; images/s: median epoch throughput (a K-student program counts its "
             "shared batches once)."]
    unfinished = [name for r in rows for name in r["unfinished"]]
    if unfinished:
        notes.append("unfinished runs (their last evaluated epoch is used): "
                      + ", ".join(unfinished))
    if problems:
        notes.append("problems:\n" + "\n".join(f"- {p}" for p in problems))
    return "\n\n".join(notes)


def write_tables(rows: list[dict[str, Any]], out: str, *, layout: str = "runs",
                 problems: list[str] = (), note: str = "") -> dict[str, str]:
    """Writes ``table.md``, ``table.csv`` and ``table.json`` in ``out``; returns their paths.

    Raises:
      ValueError: an unknown ``layout``.
    """
    if layout not in ("runs", "paper"):
        raise ValueError(f"unknown layout {layout!r}; use 'runs' or 'paper'.")
    os.makedirs(out, exist_ok=True)
    header, body = paper_table(rows) if layout == "paper" else runs_table(rows)
    text = markdown(header, body) + "\n\n" + footer(rows, list(problems))
    if note:
        text += "\n\n" + note
    paths = {k: os.path.join(out, f"table.{k}") for k in ("md", "csv", "json")}
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(text + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(body)
    with open(paths["csv"], "w", encoding="utf-8", newline="") as f:
        f.write(buf.getvalue())
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump({"rows": rows, "problems": list(problems)}, f, indent=2, default=str)
        f.write("\n")
    return paths


def format_text(rows: list[dict[str, Any]], problems: list[str] = (), note: str = "") -> str:
    """The runs table as Markdown with its footer (what zkd-report prints)."""
    header, body = runs_table(rows)
    text = markdown(header, body) + "\n\n" + footer(rows, list(problems))
    return text + ("\n\n" + note if note else "")
