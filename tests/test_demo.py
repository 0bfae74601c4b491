"""Acceptance 3 (issue 5): the README's demo command, offline, end to end.

Runs ``zkd-train --config=configs/demo.py --workdir=...`` (as ``python -m zkd_jax.cli.train``, the same
entry point) in a subprocess: a resnet14 teacher, then resnet8 students with KD and KD+LS on the
digits. Checks the accuracies, the printed table and that summary.json and metrics.jsonl agree.
The wall time is printed (``pytest -s``) rather than asserted.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNS = ("teacher", "kd", "kd_ls")


def test_demo_command(tmp_path):
    workdir = tmp_path / "demo"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
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


def test_run_demo_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(ROOT / "run_demo.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = (ROOT / "run_demo.sh").read_text()
    assert "--config=configs/demo.py" in text and "workdir/demo" in text
