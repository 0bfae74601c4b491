"""zkd-report from made-up runs and reference logs (issue 15, acceptance 1, 2, 3 (figures) and 6).

Run directories are written here as the trainer writes them (``summary.json`` with the config,
``metrics.jsonl`` one record per epoch) from made-up accuracies, and every number of the table is
checked against NumPy; reference logs in both formats are written from made-up numbers and read
back with ``read_worklog``.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from zkd_jax.configs import sweep
from zkd_jax.report import curves, make_report, read_worklog, table
from zkd_jax.report.discover import find_runs

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAPER = {"kd": 73.33, "kd_ls": 76.62}
RNG = np.random.default_rng(15)


def _config(method: str, seed: int, epochs: int, **settings) -> dict:
    m = {"name": "kd", "standardize": method == "kd_ls", "temperature": 4.0 if method == "kd" else
         2.0, "ce_weight": 0.1, "kd_weight": 0.9 if method == "kd" else 9.0, **settings}
    return {"dataset": "cifar100", "variant": method, "seed": seed, "epochs": epochs,
            "batch_size": 64, "student": {"arch": "resnet8x4"},
            "teacher": {"arch": "resnet32x4", "checkpoint": f"/t/{seed}"},
            "method": m, "optimizer": {"lr": 0.05, "milestones": [150, 180, 210]},
            "progress_bar": seed % 2 == 0, "paper": {"top1": PAPER.get(method)}}


def write_run(directory: pathlib.Path, config: dict, top1: list[float], *, finished=True,
              summary=True, metrics=True) -> None:
    directory.mkdir(parents=True)
    records = [{"epoch": e, "step": 10 * e, "top1": a, "top5": min(100.0, a + 20),
                "train_loss": 5.0 / e, "images_per_sec": 100.0 + e, "epoch_seconds": 2.0,
                "eval_seconds": 0.5} for e, a in enumerate(top1, 1)]
    if metrics:
        (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary:
        best = int(np.argmax(top1))
        (directory / "summary.json").write_text(json.dumps({
            "best_top1": top1[best], "best_epoch": best + 1, "last_top1": top1[-1],
            "last_epoch": len(top1), "finished": finished, "config": config}))


@pytest.fixture()
def runs_dir(tmp_path):
    """3 seeds x (KD, KD+LS) of 4 epochs; KD seed 2 stopped after epoch 2; one run without
    summary.json. Returns (root, {method: [top-1 lists]})."""
    root = tmp_path / "runs"
    curves_by_method = {}
    for method in ("kd", "kd_ls"):
        curves_by_method[method] = []
        for seed in range(3):
            epochs = 2 if (method, seed) == ("kd", 2) else 4
            acc = list(np.round(RNG.uniform(40, 80, size=epochs), 3))
            write_run(root / f"{method}_s{seed}", _config(method, seed, 4), acc,
                      finished=epochs == 4)
            curves_by_method[method].append(acc)
    write_run(root / "kd_s3", _config("kd", 3, 4), [50.0, 60.0], summary=False)
    return root, curves_by_method


def test_table_numbers_match_numpy(runs_dir, tmp_path):
    root, accs = runs_dir
    out = tmp_path / "report"
    result = make_report([str(root)], str(out))
    rows = {r["method"]: r for r in result["rows"]}
    assert sorted(rows) == ["kd", "kd_ls"]  # seeds, checkpoints and progress bars do not split
    for method, runs in accs.items():
        r = rows[method]
        best = np.array([max(a) for a in runs])
        last = np.array([a[-1] for a in runs])
        assert r["n"] == 3 and sorted(r["seeds"]) == [0, 1, 2]
        np.testing.assert_allclose(r["best_top1_mean"], best.mean(), rtol=1e-12)
        np.testing.assert_allclose(r["best_top1_std"], best.std(ddof=1), rtol=1e-12)
        np.testing.assert_allclose(r["last_top1_mean"], last.mean(), rtol=1e-12)
        np.testing.assert_allclose(r["last_top1_std"], last.std(ddof=1), rtol=1e-12)
        np.testing.assert_allclose(r["best_epoch_mean"],
                                   np.mean([np.argmax(a) + 1 for a in runs]), rtol=1e-12)
        np.testing.assert_allclose(r["top5_mean"], np.mean([min(100, max(a) + 20) for a in runs]))
        assert r["paper_top1"] == PAPER[method]
        np.testing.assert_allclose(r["diff_to_paper"], best.mean() - PAPER[method], rtol=1e-12)
        np.testing.assert_allclose(r["wall_seconds_mean"],
                                   np.mean([2.5 * len(a) for a in runs]), rtol=1e-12)
    assert rows["kd"]["unfinished"] == ["runs/kd_s2"] and rows["kd_ls"]["unfinished"] == []
    md = (out / "table.md").read_text()
    kd_best = np.array([max(a) for a in accs["kd"]])
    assert f"{kd_best.mean():.2f} ± {kd_best.std(ddof=1):.2f}" in md
    assert "3 (1 unfinished)" in md and "runs/kd_s2" in md
    # The run without summary.json is named, not a crash; it is not in any group.
    assert any("runs/kd_s3" in p and "summary.json" in p for p in result["problems"])
    assert "runs/kd_s3: no summary.json" in md
    saved = json.loads((out / "table.json").read_text())
    assert saved["rows"][0]["best_top1_mean"] == result["rows"][0]["best_top1_mean"]
    csv_lines = (out / "table.csv").read_text().splitlines()
    assert csv_lines[0].startswith("dataset,method,pair") and len(csv_lines) == 3
    paper = make_report([str(root)], str(tmp_path / "paper"), layout="paper", figures=False)
    text = (tmp_path / "paper" / "table.md").read_text()
    assert "| method | resnet32x4 -> resnet8x4 |" in text and "| KD+LS |" in text
    assert paper["rows"] == result["rows"]


def test_broken_runs_never_crash(tmp_path):
    root = tmp_path / "r"
    write_run(root / "a", _config("kd", 0, 2), [10.0, 20.0], metrics=False)
    (root / "b").mkdir()
    (root / "b" / "summary.json").write_text("{not json")
    runs, problems = find_runs([str(root), str(tmp_path / "missing")])
    assert {r.name for r in runs} == {"r/a", "r/b"}
    assert any("r/a: no metrics.jsonl" in p for p in problems)
    assert any("r/b: summary.json is unreadable" in p for p in problems)
    assert any("missing: not a directory" in p for p in problems)
    result = make_report([str(root)], str(tmp_path / "out"))
    assert result["rows"][0]["best_top1_mean"] == 20.0  # the summary alone
    with pytest.raises(ValueError, match="no run with a summary.json"):
        make_report([str(tmp_path / "missing")], str(tmp_path / "out2"))


def _mdistiller_text(runs: list[list[tuple[float, float]]], best_line: bool) -> str:
    text = ""
    for run in runs:
        for e, (acc, loss) in enumerate(run, 1):
            text += ("-" * 25 + "\n" + f"epoch: {e}\nlr: 0.05\ntrain_acc: {acc - 5:.2f}\n"
                     f"train_loss: {loss:.2f}\ntest_acc: {acc:.2f}\ntest_acc_top5: "
                     f"{acc + 20:.2f}\ntest_loss: 1.00\n" + "-" * 25 + "\n")
        if best_line:  # written without a newline, as mdistiller does
            text += f"best_acc\t{max(a for a, _ in run):.2f}"
    return text


def test_read_worklog_both_formats(tmp_path):
    runs = [[(30.0, 4.0), (50.0, 3.0), (45.0, 2.5)], [(35.0, 4.1), (55.5, 2.9)]]
    path = tmp_path / "logs" / "KD" / "kd,res32x4,res8x4,2,9.txt"
    path.parent.mkdir(parents=True)
    path.write_text(_mdistiller_text(runs, best_line=True))
    logs = read_worklog(path)
    assert len(logs) == 2
    for log, run in zip(logs, runs):
        assert (log.method, log.teacher, log.student) == ("kd", "res32x4", "res8x4")
        assert log.settings == {"temperature": 2.0, "kd_weight": 9.0}
        assert [e["epoch"] for e in log.epochs] == list(range(1, len(run) + 1))
        assert [e["test_acc"] for e in log.epochs] == [a for a, _ in run]
        assert [e["train_loss"] for e in log.epochs] == [b for _, b in run]
        assert log.best_acc == max(a for a, _ in run) and log.finished
    # Two runs without best_acc lines: split where the epoch restarts at 1.
    path2 = tmp_path / "dkd,res56,res20,3,18,2.txt"
    path2.write_text(_mdistiller_text(runs, best_line=False))
    logs2 = read_worklog(path2)
    assert [len(w.epochs) for w in logs2] == [3, 2] and logs2[0].best_acc == 50.0
    assert logs2[0].settings == {"temperature": 3.0, "kd_weight": 18.0, "beta": 2.0}
    assert not logs2[0].finished
    # The CTKD tree's JSON stream: one object per epoch, one spread over several lines.
    objs = [{"epoch": e, "test_acc": a, "test_acc_top5": a + 20, "best_acc": b, "temp": 4 + e}
            for e, a, b in ((1, 20.0, 20.0), (2, 40.0, 40.0), (1, 25.0, 25.0), (2, 24.0, 25.0))]
    path3 = tmp_path / "ctkd,res32x4,res8x4,2,9.txt"
    path3.write_text("\n".join(json.dumps(o, indent=2 if i == 1 else None)
                               for i, o in enumerate(objs)) + "\n")
    logs3 = read_worklog(path3)
    assert len(logs3) == 2 and [w.best_acc for w in logs3] == [40.0, 25.0]
    assert logs3[1].epochs[1]["temp"] == 6 and logs3[0].series("test_acc") == ([1, 2], [20., 40.])
    with pytest.raises(ValueError, match="holds no epoch"):
        (tmp_path / "x.txt").write_text("nothing\n")
        read_worklog(tmp_path / "x.txt")


def test_report_overlays_reference_logs_and_labels_figures(runs_dir, tmp_path):
    root, _ = runs_dir
    refs = tmp_path / "logs"
    (refs / "KD").mkdir(parents=True)
    (refs / "KD" / "kd,res32x4,res8x4,2,9.txt").write_text(
        _mdistiller_text([[(30.0, 4.0), (50.0, 3.0)], [(31.0, 4.0), (52.0, 3.0)]], True))
    (refs / "KD" / "kd,vgg13,vgg8,3,9.txt").write_text(_mdistiller_text([[(1.0, 1.0)]], True))
    out = tmp_path / "report"
    result = make_report([str(root)], str(out), reference_logs=str(refs))
    pngs = sorted(p for p in result["files"] if os.path.basename(p).startswith("curves_"))
    assert len(pngs) == 2
    # KD and KD+LS of one pair: one figure with both (zkd_jax.report.compare).
    assert len([p for p in result["files"] if os.path.basename(p).startswith("compare_")]) == 1
    for p in pngs:
        data = pathlib.Path(p).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        # Both of the file's runs of the same method family and pair, not the other pair's.
        assert result["overlays"][os.path.basename(p)] == ["kd,res32x4,res8x4,2,9",
                                                           "kd,res32x4,res8x4,2,9#2"]
    runs, _ = find_runs([str(root)])
    group = table.group_runs(runs)[0]
    logs = read_worklog(refs / "KD" / "kd,res32x4,res8x4,2,9.txt")
    fig = curves.group_figure(group, logs)
    for ax, ylabel in zip(fig.axes, ("test top-1 (%)", "train loss")):
        assert ax.get_xlabel() == "epoch" and ax.get_ylabel() == ylabel
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels[:2] == ["zkd_jax mean of 3", "min-max"]
        assert "reference kd,res32x4,res8x4,2,9#2" in labels
    epochs, values = curves.epoch_matrix(group, "top1")
    assert list(epochs) == [1, 2, 3, 4] and np.isnan(values).sum() == 2  # the unfinished run


def test_sweep_expansion_and_heat_map(tmp_path):
    entries = sweep.expand("temperature=2,3 kd_weight=3,6 seed=0,1")
    assert len(entries) == 8 and entries[0] == {"temperature": 2, "kd_weight": 3, "seed": 0}
    assert entries[-1] == {"temperature": 3, "kd_weight": 6, "seed": 1}
    assert sweep.expand("ce_weight=0.5", default_seed=7) == ({"ce_weight": 0.5, "seed": 7},)
    assert sweep.expand("") == ()
    for bad, match in (("temperature", "KEY=V1"), ("t=1 t=2", "twice"), ("name=dkd", "name"),
                       ("t=a", "not a number")):
        with pytest.raises(ValueError, match=match):
            sweep.expand(bad)
    root = tmp_path / "sweep"
    acc = {}
    for k, e in enumerate(entries):
        top1 = [40.0 + e["temperature"] + e["kd_weight"] + e["seed"], 10.0]
        acc.setdefault((e["temperature"], e["kd_weight"]), []).append(max(top1))
        cfg = _config("kd_ls", e["seed"], 2, temperature=float(e["temperature"]),
                      kd_weight=float(e["kd_weight"]))
        write_run(root / f"student_{k}", cfg, top1)
    result = make_report([str(root)], str(tmp_path / "out"))
    assert len(result["rows"]) == 4 and all(r["n"] == 2 for r in result["rows"])
    sweeps = [p for p in result["files"] if os.path.basename(p).startswith("sweep_")]
    assert len(sweeps) == 1 and os.path.getsize(sweeps[0]) > 2000
    runs, _ = find_runs([str(root)])
    (family,) = curves.sweep_families(table.group_runs(runs))
    keys, xs, ys, grid = curves.sweep_grid(family)
    assert keys == ["method.kd_weight", "method.temperature"] and xs == [3.0, 6.0]
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            assert grid[i, j] == pytest.approx(np.mean(acc[(y, x)]))
    fig = curves.sweep_figure(family)
    assert fig.axes[0].get_xlabel() == "kd_weight" and fig.axes[0].get_ylabel() == "temperature"


def test_report_needs_neither_tensorflow_nor_network(runs_dir, tmp_path):
    root, _ = runs_dir
    code = (
        "import socket, sys\n"
        "def no_network(*a, **k): raise OSError('network used')\n"
        "socket.socket.connect = no_network\n"
        "socket.create_connection = no_network\n"
        "from zkd_jax.cli import report\n"
        f"sys.argv = ['zkd-report', {str(root)!r}, '--out', {str(tmp_path / 'o')!r}]\n"
        "try:\n    report.run()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
        "print('OK')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT)),
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
    assert "| KD+LS |" in proc.stdout and (tmp_path / "o" / "table.md").exists()
    pyproject = (ROOT / "pyproject.toml").read_text()
    core = pyproject.split("dependencies = [", 1)[1].split("]", 1)[0]
    report_extra = next(ln for ln in pyproject.splitlines() if ln.startswith("report = ["))
    assert '"matplotlib' not in core and '"matplotlib' in report_extra
    assert 'zkd-report = "zkd_jax.cli.report:run"' in pyproject


def test_damaged_metrics_and_out_that_is_a_file(tmp_path):
    """A binary line in a metrics.jsonl: the run's good lines are used and the damaged line is
    named (file and line) under the table; ``--out=<a file>``: one line, exit status 2."""
    root = tmp_path / "r"
    write_run(root / "a", _config("kd", 0, 2), [10.0, 20.0])
    metrics = root / "a" / "metrics.jsonl"
    good = metrics.read_bytes()
    metrics.write_bytes(good + b"\x00\xff\x81 binary\n")
    runs, problems = find_runs([str(root)])
    assert [r["epoch"] for r in runs[0].records] == [1, 2]
    assert problems == [f"r/a: {metrics} line 3 is damaged (not UTF-8 text); skipped"]
    (tmp_path / "file").write_text("")
    code = (
        "import sys\n"
        "from zkd_jax.cli import report\n"
        f"sys.argv = ['zkd-report', {str(root)!r}, '--out', {str(tmp_path / 'o')!r}]\n"
        "try:\n    report.run()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        f"sys.argv = ['zkd-report', {str(root)!r}, '--out={tmp_path / 'file'}']\n"
        "report.run()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT)),
                          timeout=300)
    assert f"{metrics} line 3 is damaged (not UTF-8 text); skipped" in proc.stdout
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"zkd-report: error: --out={tmp_path / 'file'} is a file, not a directory; give a "
        "directory (it is created if missing)."]
