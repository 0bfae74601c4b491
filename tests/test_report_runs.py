"""A sweep as one program, and zkd-report over it (issue 15, acceptance 3 and 5).

One module fixture runs the documented sweep command (``zkd-train --config=configs/demo.py:kd_ls
--config.sweep='temperature=2,3 kd_weight=3,6 seed=0,1'``, as ``python -m zkd_jax.cli.train``) on the
offline digits with the smallest settings (1 epoch of the first 160 digits at batch 32: 5 steps) and a fixed random resnet8
teacher (``--config.teacher.checkpoint``): 2 x 2 settings x 2 seeds as ONE K = 8 program in the
demo's suite layout (``WORKDIR/kd_ls/student_<k>``). XLA's backend optimization is turned off in
that subprocess: compiling the K = 8 step dominates on a CPU, and 5 steps do not need a fast
program. The report over it has a row per sweep point (mean ± std over the seeds) and the heat map.
The demo's own workdir is reported and analyzed in ``tests/test_demo.py``.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from zkd_jax import models
from zkd_jax.io import torch_weights as convert
from zkd_jax.io import metrics as metrics_io
from zkd_jax.configs import sweep
from zkd_jax.report import curves, find_runs, group_runs, make_report
from zkd_jax.step.state import init_variables

ROOT = pathlib.Path(__file__).resolve().parents[1]
SWEEP = "temperature=2,3 kd_weight=3,6 seed=0,1"


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_runs")
    model = models.create("resnet8", num_classes=10, dataset="cifar100")
    convert.save_variables(root / "teacher" / "export", jax.device_get(init_variables(
        model, jax.random.PRNGKey(3), (1, 32, 32, 3))), arch="resnet8", dataset="cifar100",
        num_classes=10)
    flags_ = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags_.strip())
    proc = subprocess.run(
        [sys.executable, "-m", "zkd_jax.cli.train", f"--config={ROOT / 'configs' / 'demo.py'}:kd_ls",
         f"--workdir={root / 'demo'}", "--config.teacher.arch=resnet8",
         f"--config.teacher.checkpoint={root / 'teacher'}", "--config.epochs=1",
         "--config.batch_size=32", "--config.train_examples=160", "--config.progress_bar=False", "--config.log_every_steps=5",
         f"--config.sweep={SWEEP}", "--config.export=False"],
        env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| KD+LS | resnet8 -> resnet8 | kd_weight=3 temperature=2 | 2 |" in proc.stdout
    return root / "demo" / "kd_ls"


def test_sweep_is_one_program_of_k_students(sweep_dir):
    top = metrics_io.read_summary(sweep_dir)
    assert top["finished"] and len(top["students"]) == 8
    for k, entry in enumerate(sweep.expand(SWEEP)):
        s = metrics_io.read_summary(sweep_dir / f"student_{k}")
        assert s["seed"] == s["student_seed"] == entry["seed"]
        assert s["config"]["method"]["temperature"] == entry["temperature"]
        assert s["config"]["method"]["kd_weight"] == entry["kd_weight"]
        assert s["run"] == {"dataset": "digits", "method": "kd_ls", "teacher": "resnet8",
                            "student": "resnet8", "seed": entry["seed"]}
        assert s["wall_seconds"] > 0 and s["images_per_sec"] > 0
        record = metrics_io.read_metrics(sweep_dir / f"student_{k}")[-1]
        assert record["run"] == s["run"] and record["eval_seconds"] > 0


def test_report_over_a_k_student_sweep(sweep_dir, tmp_path):
    out = tmp_path / "report"
    result = make_report([str(sweep_dir)], str(out))
    rows = result["rows"]
    assert len(rows) == 4 and all(r["n"] == 2 and sorted(r["seeds"]) == [0, 1] for r in rows)
    for r in rows:
        best = [metrics_io.read_summary(sweep_dir.parent / name)["best_top1"]
                for name in r["runs"]]
        assert r["best_top1_mean"] == pytest.approx(np.mean(best))
        assert r["best_top1_std"] == pytest.approx(np.std(best, ddof=1))
        assert set(r["settings"]) == {"method.kd_weight", "method.temperature"}
    assert result["problems"] == []
    pngs = [p for p in result["files"] if p.endswith(".png")]
    assert len([p for p in pngs if "curves_" in p]) == 4
    assert len([p for p in pngs if "sweep_" in p]) == 1
    for p in pngs:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(p) > 2000
    for name in ("table.md", "table.csv", "table.json"):
        assert (out / name).stat().st_size > 0
    runs, _ = find_runs([str(sweep_dir)])
    (family,) = curves.sweep_families(group_runs(runs))
    fig = curves.sweep_figure(family)
    assert fig.axes[0].get_xlabel() == "kd_weight" and fig.axes[0].get_ylabel() == "temperature"
    for ax in curves.group_figure(family[0]).axes:
        assert ax.get_xlabel() == "epoch" and ax.get_ylabel() and ax.get_legend() is not None
