"""Acceptance 3 (issue 5): the README's demo command, offline, end to end.

Runs ``zkd-train --config=configs/demo.py --workdir=...`` (as ``python -m zkd_jax.cli.train``, the same
entry point) in a subprocess: a resnet14 teacher, then resnet8 students with KD and KD+LS on the
digits. Checks the accuracies, the printed table and that summary.json and metrics.jsonl agree;
then zkd-report and zkd-analyze over that workdir (issue 15).
The wall time is printed (``pytest -s``) rather than asserted.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

from cpu_devices import TEST_XLA_FLAGS

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNS = ("teacher", "kd", "kd_ls")


def test_demo_command(tmp_path):
    workdir = tmp_path / "demo"
    # Hundreds of steps: every XLA optimization and XLA's default emitters, as users run it
    # (tests/conftest.py).
    xla_flags = os.environ.get("XLA_FLAGS", "").replace(TEST_XLA_FLAGS, "").strip()
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="0",
               XLA_FLAGS=xla_flags)
    start = time.perf_counter()
    # A relative --workdir, as the README's command passes it (orbax itself needs absolute paths).
    proc = subprocess.run(
        [sys.executable, "-m", "zkd_jax.cli.train", f"--config={ROOT / 'configs' / 'demo.py'}",
         "--workdir=demo"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    seconds = time.perf_counter() - start
    print(f"\ndemo wall time: {seconds:.1f} s\n{proc.stdout[-1200:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]

    summaries = {}
    for run in RUNS:
        summary = json.loads((workdir / run / "summary.json").read_text())
        records = [json.loads(line) for line in (workdir / run / "metrics.jsonl").read_text()
                   .splitlines() if line.strip()]
        # summary.json and metrics.jsonl agree.
        assert records and summary["finished"]
        assert summary["last_epoch"] == records[-1]["epoch"] == summary["config"]["epochs"]
        assert summary["last_top1"] == records[-1]["top1"]
        best = max(records, key=lambda r: r["top1"])
        assert summary["best_top1"] == best["top1"] and summary["best_epoch"] == best["epoch"]
        assert [r["epoch"] for r in records] == list(range(1, len(records) + 1))
        assert all(r["images_per_sec"] > 0 and 0 <= r["top5"] <= 100 for r in records)
        assert list((workdir / run / "tensorboard").glob("events.out.tfevents.*"))
        assert (workdir / run / "export").is_dir()
        summaries[run] = summary

    assert summaries["teacher"]["best_top1"] > 90.0, summaries["teacher"]["best_top1"]
    assert summaries["kd"]["best_top1"] > 80.0, summaries["kd"]["best_top1"]
    assert summaries["kd_ls"]["best_top1"] > 80.0, summaries["kd_ls"]["best_top1"]
    assert summaries["kd_ls"]["config"]["method"]["standardize"] is True
    assert summaries["kd"]["config"]["method"]["standardize"] is False
    # The table at the end names the three runs with their best accuracy.
    table = proc.stdout[proc.stdout.index("digits test accuracy"):]
    for run in RUNS:
        line = next(ln for ln in table.splitlines() if ln.startswith(run + " "))
        assert f"{summaries[run]['best_top1']:.2f}" in line
    assert "not which method is better" in table  # the footer says what 5 epochs can show
    _check_report(workdir, tmp_path / "report")
    _check_analysis(workdir, tmp_path / "analysis")


def _check_report(workdir, out):
    """zkd-report over the demo's workdir (issue 15, acceptance 3)."""
    from zkd_jax.report import curves, find_runs, group_runs, make_report

    result = make_report([str(workdir)], str(out))
    assert [r["method"] for r in result["rows"]] == ["teacher", "kd", "kd_ls"]
    assert result["problems"] == []
    for r in result["rows"]:
        summary = json.loads((workdir / r["runs"][0].split("/", 1)[1] / "summary.json")
                             .read_text())
        assert r["n"] == 1 and r["best_top1_mean"] == summary["best_top1"]
        assert r["wall_seconds_mean"] == summary["wall_seconds"] > 0
    pngs = [p for p in result["files"] if p.endswith(".png")]
    assert len(pngs) == 3 and all(pathlib.Path(p).stat().st_size > 5000 for p in pngs)
    for group in group_runs(find_runs([str(workdir)])[0]):
        for ax in curves.group_figure(group).axes:
            assert ax.get_xlabel() == "epoch" and ax.get_ylabel() and ax.get_legend()


def _check_analysis(workdir, out):
    """zkd-analyze on the demo's teacher and students; its statistics against NumPy on the
    logits it saved (issue 15, acceptance 4)."""
    import numpy as np
    import pytest

    from zkd_jax.report.analysis import write_analysis

    stats = write_analysis(str(workdir / "teacher"), [str(workdir / "kd"), str(workdir / "kd_ls")],
                           str(out), tsne_samples=60)
    expected = {"analysis.json", "logits.npz", "logit_moments.png", "hist2d_kd.png",
                "hist2d_kd_ls.png", "corr_diff_kd.png", "corr_diff_kd_ls.png", "tsne.png"}
    assert set(p.name for p in out.iterdir()) == expected == set(stats["files"])
    assert all((out / name).stat().st_size > 0 for name in expected)
    saved = json.loads((out / "analysis.json").read_text())
    data = np.load(out / "logits.npz")
    assert data["labels"].shape == (297,) and data["features/teacher"].shape[0] == 297
    t = data["logits/teacher"].astype(np.float64)

    def z(a):
        return (a - a.mean(1, keepdims=True)) / (a.std(1, ddof=1, keepdims=True) + 1e-7)

    def kl(a, b):
        pa = np.exp(a) / np.exp(a).sum(1, keepdims=True)
        pb = np.exp(b) / np.exp(b).sum(1, keepdims=True)
        return np.mean(np.sum(pa * np.log(pa / pb), 1))

    def corr(a):
        c = a.shape[1]
        return np.array([[np.corrcoef(a[:, i], a[:, j])[0, 1] for j in range(c)]
                         for i in range(c)])

    for name in RUNS:
        x = data[f"logits/{name}"].astype(np.float64)
        # The forward pass is the trainer's: the accuracy equals the run's last evaluation.
        summary = json.loads((workdir / name / "summary.json").read_text())
        assert saved["models"][name]["top1"] == pytest.approx(summary["last_top1"], abs=1e-9)
        raw = saved["models"][name]["moments"]["raw"]
        per_std = np.sqrt(((x - x.mean(1, keepdims=True)) ** 2).sum(1) / (x.shape[1] - 1))
        assert raw["mean_of_mean"] == pytest.approx(np.mean(x.mean(1)))
        assert raw["mean_of_std"] == pytest.approx(per_std.mean())
        assert saved["models"][name]["moments"]["standardized"]["mean_of_std"] == pytest.approx(
            1.0, abs=1e-6)
        if name == "teacher":
            continue
        got = saved["students"][name]
        assert got["agreement"] == pytest.approx(100 * np.mean(t.argmax(1) == x.argmax(1)))
        assert got["kl_raw"] == pytest.approx(kl(t, x), rel=1e-9)
        assert got["kl_standardized"] == pytest.approx(kl(z(t), z(x)), rel=1e-9)
        diff = np.abs(corr(t) - corr(x))
        assert got["correlation_difference_mean"] == pytest.approx(
            diff[~np.eye(diff.shape[0], dtype=bool)].mean(), rel=1e-9)


def test_run_demo_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(ROOT / "run_demo.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = (ROOT / "run_demo.sh").read_text()
    assert "--config=configs/demo.py" in text and "workdir/demo" in text
