"""``write_analysis(teacher_dir, student_dirs, out)``: what ``zkd-analyze`` writes, as a function.

On the split of the runs' dataset it computes the logits and pooled features of the teacher and
of every student (``zkd_jax.report.logits``) and writes into ``out``:

* ``analysis.json``: per model its accuracy and logit moments (raw and Z-scored); per student the
  top-1 agreement with the teacher, KL(teacher || student) at T = 1 on raw and on standardized
  logits and the mean class-correlation difference (``zkd_jax.report.logit_stats``);
* ``logit_moments.png`` (raw logits' per-sample mean and std of every model, one panel); per
  student ``hist2d_<name>.png`` and ``corr_diff_<name>.png`` (every student's map on one colour
  scale, ``correlation_difference_vmax``); ``tsne.png`` (pooled features of every model); each
  figure captioned with what was run (``caption``: split, models, settings, seeds, epochs);
* ``logits.npz``: the logits, labels and features the numbers were computed from.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

from zkd_jax.report import logit_stats
from zkd_jax.report.logits import forward, load_model, load_split, model_dirs


def _unique_names(paths: list[str]) -> list[str]:
    names = [os.path.basename(os.path.normpath(p)) for p in paths]
    if len(set(names)) < len(names):  # e.g. student_0 of two K-student runs
        names = ["/".join(os.path.normpath(p).split(os.sep)[-2:]) for p in paths]
    return names


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)


def statistics(teacher: np.ndarray, students: dict[str, np.ndarray],
               labels: np.ndarray | None = None) -> dict[str, Any]:
    """The numbers of ``analysis.json`` from logits alone (``[N, C]`` each)."""
    models = {"teacher": teacher, **students}
    out: dict[str, Any] = {"models": {}, "students": {}}
    for name, x in models.items():
        entry = {"moments": logit_stats.moments_summary(x)}
        if labels is not None:
            entry["top1"] = logit_stats.accuracy(x, labels)
        out["models"][name] = entry
    for name, s in students.items():
        out["students"][name] = logit_stats.compare(teacher, s)
    return out


def _run_text(path: str) -> str:
    """``kd_ls, T=2.0, kd weight 9.0, seed 1, 5 epochs`` from the run's summary.json ('' without)."""
    for candidate in (path, os.path.dirname(os.path.normpath(path))):
        summary = os.path.join(candidate, "summary.json")
        if os.path.isfile(summary):
            with open(summary, encoding="utf-8") as f:
                s = json.load(f)
            config = s.get("config") or {}
            m = config.get("method") or {}
            parts = [str((s.get("run") or {}).get("method") or m.get("name"))]
            if m.get("name") != "ce":
                parts += [f"T={m.get('temperature')}", f"kd weight {m.get('kd_weight')}"]
            parts += [f"seed {s.get('seed', config.get('seed'))}", f"{config.get('epochs')} epochs"]
            return ", ".join(parts)
    return ""


def describe(teacher, students, dataset: str, split: str, n: int) -> str:
    """What was run: the split and, per model, its name, architecture and settings."""
    models = [teacher, *students]
    parts = []
    for m in models:
        text = _run_text(m.path) if getattr(m, "path", None) else ""
        parts.append(f"{m.name} = {m.arch}" + (f" ({text})" if text else ""))
    return f"{dataset} {split} split, {n} images. " + "; ".join(parts)


def write_analysis(teacher_dir: str, student_dirs: list[str], out: str, *, split: str = "test",
                   dataset: str | None = None, tsne_samples: int = 2000, limit: int = 0,
                   figures: bool = True) -> dict[str, Any]:
    """Writes the analysis files (module docstring) into ``out``; returns the statistics.

    Raises:
      ValueError: a directory without ``export/``, or no dataset known (pass ``dataset``).
    """
    teacher = load_model(model_dirs(teacher_dir)[0], "teacher")
    paths = [p for d in student_dirs for p in model_dirs(d)]
    if not paths:
        raise ValueError("pass at least one --student DIR (a finished student run).")
    names = _unique_names(paths)
    students = [load_model(p, n) for p, n in zip(paths, names)]
    dataset = dataset or teacher.dataset or next((s.dataset for s in students if s.dataset), None)
    if dataset is None:
        raise ValueError("the runs' summary.json is missing, so their dataset is unknown; pass "
                         "--dataset (digits, cifar100, imagenet2012).")
    images, labels = load_split(dataset, split, limit)
    logits, features = {}, {}
    for m in [teacher, *students]:
        logits[m.name], features[m.name] = forward(m, images)
    stats = statistics(logits["teacher"], {s.name: logits[s.name] for s in students}, labels)
    stats.update(dataset=dataset, split=split, examples=int(labels.shape[0]),
                 teacher_dir=teacher_dir, student_dirs=dict(zip(names, paths)))
    os.makedirs(out, exist_ok=True)
    files = [os.path.join(out, "analysis.json"), os.path.join(out, "logits.npz")]
    np.savez_compressed(files[1], labels=labels,
                        **{f"logits/{k}": v for k, v in logits.items()},
                        **{f"features/{k}": v for k, v in features.items()})
    caption = describe(teacher, students, dataset, split, int(labels.shape[0]))
    vmax = max(float(logit_stats.correlation_difference(logits["teacher"], logits[s.name])[0].max())
               for s in students)  # one colour scale for every student's correlation map
    stats.update(caption=caption, correlation_difference_vmax=vmax)
    if figures:
        files.append(logit_stats.plot_moments(logits, os.path.join(out, "logit_moments.png"),
                                          caption=caption))
        for s in students:
            files.append(logit_stats.plot_histogram2d(
                logits["teacher"], logits[s.name], s.name,
                os.path.join(out, f"hist2d_{_slug(s.name)}.png"), caption=caption))
            files.append(logit_stats.plot_correlation_difference(
                logits["teacher"], logits[s.name], s.name,
                os.path.join(out, f"corr_diff_{_slug(s.name)}.png"), vmax=vmax, caption=caption))
        rng = np.random.default_rng(0)
        n = labels.shape[0]
        pick = np.sort(rng.choice(n, tsne_samples, replace=False)) if 0 < tsne_samples < n \
            else np.arange(n)
        embeddings = {k: logit_stats.tsne(v[pick]) for k, v in features.items()}
        files.append(logit_stats.plot_tsne(embeddings, labels[pick], os.path.join(out, "tsne.png"),
                                       caption=caption + f"; t-SNE of {pick.size} images"))
    stats["files"] = [os.path.basename(f) for f in files]
    with open(files[0], "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2)
        f.write("\n")
    return stats
