"""The README's demo command, offline, end to end, shortened: ``--config.epochs=3
--config.sweep='seed=0,1'`` (the teacher: 4 epochs), on all 1,500 training images.

Runs ``zkd-train --config=configs/demo.py --workdir=...`` (as ``python -m zkd_jax.cli.train``, the
same entry point) in a subprocess twice: one teacher trained once, KD and KD+LS students for 2 seeds
each (one K-student program per method). Fewer images instead of fewer seeds would leave the
models near chance (640 images, 3 epochs: students at 26-43 %), where "no collapse" means nothing.
Checks the table (mean ± std over seeds, per-seed values, a footer computed from the run), that no
student collapses, that the second run reuses the teacher (verified, nothing retrained), the
report's side-by-side figure against the metrics, and
zkd-analyze's statistics and figures. Wall times are printed (``pytest -s``), never asserted.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

from cpu_devices import TEST_XLA_FLAGS

ROOT = pathlib.Path(__file__).resolve().parents[1]
METHODS = ("kd", "kd_ls")
SEEDS = (0, 1)
EPOCHS = 3
# The demo's schedule (a cosine over the run) follows the shortened epochs by itself.
SHORT = (f"--config.epochs={EPOCHS}", "--config.teacher.recipe.epochs=4",
         f"--config.sweep=seed={','.join(map(str, SEEDS))}", "--config.progress_bar=False")


def _env() -> dict:
    # Every XLA optimization and XLA's default emitters, as users run it (tests/conftest.py).
    xla_flags = os.environ.get("XLA_FLAGS", "").replace(TEST_XLA_FLAGS, "").strip()
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="0",
                XLA_FLAGS=xla_flags)


def _demo(cwd, *args, timeout=900):
    start = time.perf_counter()
    # A relative --workdir, as the README's command passes it (orbax itself needs absolute paths).
    proc = subprocess.run(
        [sys.executable, "-m", "zkd_jax.cli.train", f"--config={ROOT / 'configs' / 'demo.py'}",
         "--workdir=demo", *args], cwd=cwd, env=_env(), capture_output=True, text=True,
        timeout=timeout)
    print(f"\ndemo {' '.join(args)}: {time.perf_counter() - start:.1f} s\n{proc.stdout[-2500:]}")
    return proc


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(workdir, first run, second run) of the shortened demo run twice in one workdir."""
    cwd = tmp_path_factory.mktemp("demo")
    first = _demo(cwd, *SHORT)
    assert first.returncode == 0, first.stderr[-4000:]
    (teacher,) = (cwd / "demo").glob("teacher_*")
    manifest = (teacher / "export" / "zkd_manifest.json").read_bytes()
    second = _demo(cwd, *SHORT)
    assert second.returncode == 0, second.stderr[-4000:]
    assert (teacher / "export" / "zkd_manifest.json").read_bytes() == manifest
    return cwd / "demo", teacher, first.stdout, second.stdout


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]


def test_teacher_trained_once_then_reused(demo):
    workdir, teacher, first, second = demo
    assert first.count("teacher: training resnet14 (seed 0, 4 epochs)") == 1
    assert len([ln for ln in first.splitlines() if ln.startswith(f"{teacher.name} epoch ")]) == 4
    assert f"teacher: reusing {teacher}" in second and "export verified" in second
    assert " epoch " not in second  # nothing trained the second time: every run had finished
    summary = json.loads((teacher / "summary.json").read_text())
    assert summary["finished"] and summary["config"]["seed"] == 0 and summary["last_top1"] > 50
    for method in METHODS:  # every student distilled from that one teacher
        for k in range(len(SEEDS)):
            s = json.loads((workdir / method / f"student_{k}" / "summary.json").read_text())
            assert s["config"]["teacher"]["checkpoint"] == str(teacher)


def test_students_over_seeds_and_the_table(demo):
    workdir, _, first, second = demo
    table = first[first.index("digits test top-1 (%)"):]
    assert table in second  # the second run prints the same numbers
    for method in METHODS:
        finals, bests = [], []
        for k, seed in enumerate(SEEDS):
            run = workdir / method / f"student_{k}"
            s = json.loads((run / "summary.json").read_text())
            records = _records(run)
            assert s["finished"] and s["seed"] == seed
            assert s["last_epoch"] == records[-1]["epoch"] == EPOCHS
            assert s["last_top1"] == records[-1]["top1"]
            assert s["best_top1"] == max(r["top1"] for r in records)
            finals.append(s["last_top1"])
            bests.append(s["best_top1"])
            assert f"seed {seed} {s['last_top1']:.2f}/{s['best_top1']:.2f}" in table
        line = next(ln for ln in table.splitlines() if ln.startswith(method + " "))
        assert (f"{np.mean(finals):.2f} ± {np.std(finals, ddof=1):.2f}" in line
                and f"{np.mean(bests):.2f} ± {np.std(bests, ddof=1):.2f}" in line), line
    # The footer is computed from the run, not fixed text.
    assert (f"{EPOCHS} epochs on 1,500 digits training images (297 test images), "
            f"{len(SEEDS)} seeds per method") in table and "(resnet14, 4 epochs, seed 0)" in table


def test_no_student_collapses(demo):
    """No collapse, of any student of either method nor of the teacher: after the first epoch the
    test top-1 is never below half of the run's final accuracy; and every run learned."""
    workdir, teacher = demo[0], demo[1]
    runs = [("teacher", 0, teacher)] + [(m, seed, workdir / m / f"student_{k}")
                                        for m in METHODS for k, seed in enumerate(SEEDS)]
    low = []
    for name, seed, run in runs:
        records = _records(run)
        final = records[-1]["top1"]
        assert final > 50, (name, seed, [r["top1"] for r in records])  # far above chance (10 %)
        low += [(name, seed, r["epoch"], r["top1"], final) for r in records[1:]
                if r["top1"] < 0.5 * final]
    assert not low, low


def test_report_draws_the_methods_side_by_side(demo):
    from zkd_jax.report import compare, find_runs, group_runs

    workdir, teacher, _, _ = demo
    assert list((workdir / "report").glob("compare_*.png"))
    (family,) = compare.compare_families(group_runs(find_runs([str(workdir)])[0]))
    students, teachers = family
    assert [g.method for g in students] == list(METHODS) and len(teachers) == 1
    fig = compare.compare_figure(students, teachers)
    top1, ce, kd = fig.axes
    title = fig._suptitle.get_text()  # pylint: disable=protected-access
    assert f"{EPOCHS} epochs, {len(SEEDS)} seeds per method" in title
    legend = [t.get_text() for t in top1.get_legend().get_texts()]
    assert any(t.startswith("KD (") for t in legend) and any(t.startswith("KD+LS (") for t in legend)
    lines = {ln.get_label(): ln for ln in top1.get_lines()}
    for g, method in zip(students, METHODS):
        line = lines[compare.group_label(g)]
        expected = np.mean([[r["top1"] for r in _records(workdir / method / f"student_{k}")]
                            for k in range(len(SEEDS))], axis=0)
        np.testing.assert_allclose(line.get_ydata(), expected, rtol=1e-12)
        np.testing.assert_array_equal(line.get_xdata(), np.arange(1, EPOCHS + 1))
        assert len(top1.collections) >= 2  # the ± std bands
        for ax, key in ((ce, "train_ce"), (kd, "train_kd")):
            (loss,) = [ln for ln in ax.get_lines() if ln.get_label() == compare.group_label(g)]
            expected = np.mean([[r[key] for r in _records(workdir / method / f"student_{k}")]
                                for k in range(len(SEEDS))], axis=0)
            np.testing.assert_allclose(loss.get_ydata(), expected, rtol=1e-12)
    (teacher_line,) = [ln for ln in top1.get_lines() if ln.get_label().startswith("teacher")]
    final = json.loads((teacher / "summary.json").read_text())["last_top1"]
    assert np.all(np.asarray(teacher_line.get_ydata()) == final)


def test_analysis_of_the_demo(demo, tmp_path):
    """zkd-analyze on the teacher and the seed-0 students; its statistics against NumPy on the
    logits it saved, one colour scale for the correlation maps, no standardized-moments panel."""
    from zkd_jax.report.analysis import write_analysis

    workdir, teacher, _, _ = demo
    out = tmp_path / "analysis"
    students = [str(workdir / m / "student_0") for m in METHODS]
    stats = write_analysis(str(teacher), students, str(out), tsne_samples=60)
    files = set(stats["files"])
    assert {"analysis.json", "logits.npz", "logit_moments.png", "tsne.png"} <= files
    assert len([f for f in files if f.startswith("corr_diff_")]) == 2
    data = np.load(out / "logits.npz")
    t = data["logits/teacher"].astype(np.float64)

    def corr(a):
        return np.corrcoef(a, rowvar=False)

    diffs = {}
    for name in stats["students"]:
        x = data[f"logits/{name}"].astype(np.float64)
        got = stats["students"][name]
        assert got["agreement"] == pytest.approx(100 * np.mean(t.argmax(1) == x.argmax(1)))
        diff = np.abs(corr(t) - corr(x))
        diffs[name] = diff
        assert got["correlation_difference_mean"] == pytest.approx(
            diff[~np.eye(diff.shape[0], dtype=bool)].mean(), rel=1e-9)
    assert stats["correlation_difference_vmax"] == pytest.approx(
        max(float(d.max()) for d in diffs.values()), rel=1e-9)
    assert "digits test split, 297 images" in stats["caption"]
    assert "kd_ls, T=" in stats["caption"] and f"{EPOCHS} epochs" in stats["caption"]


def test_overrides_a_suite_entry_replaces_are_refused(tmp_path):
    for flag, use in (("--config.method.temperature=8", "--config.suite.kd.temperature or "
                       "--config.suite.kd_ls.temperature"),
                      ("--config.optimizer.lr=0.05", "--config.suite.kd.lr or "
                       "--config.suite.kd_ls.lr")):
        proc = _demo(tmp_path, flag, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("zkd-train: error")]
        assert use in line and "Traceback" not in proc.stderr
    assert not (tmp_path / "demo").exists()


def test_teacher_directory_follows_the_teacher_config():
    from zkd_jax.trainer.teacher_runs import teacher_key, teacher_recipe
    from zkd_jax.configs import demo as demo_config

    config = demo_config.get_config()
    key = teacher_key(teacher_recipe(config))
    config.seed = 7  # a student seed: the same teacher
    config.progress_bar = False
    assert teacher_key(teacher_recipe(config)) == key
    for field, value in (("seed", 1), ("epochs", 8)):
        changed = demo_config.get_config()
        changed.teacher.recipe[field] = value
        assert teacher_key(teacher_recipe(changed)) != key
    changed = demo_config.get_config()
    changed.dataset = "digits_val"  # the teacher reads the students' data
    assert teacher_key(teacher_recipe(changed)) != key


def test_run_demo_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(ROOT / "run_demo.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = (ROOT / "run_demo.sh").read_text()
    assert "--config=configs/demo.py" in text and "workdir/demo" in text
