"""Verified checkpoints with fallback; epoch means after a resume; damaged metrics and exports.

A run stopped at step 6 (inside epoch 2; checkpoints 2, 4, 5, 6) is damaged three ways in its newest
checkpoint (a truncated file, a deleted file, 400 bytes flipped at equal size); each next start names
checkpoint 6 as damaged, resumes from 5 and ends bit-identical to an uninterrupted run. Undamaged,
the resumed run's epoch-2 means equal the uninterrupted run's. A damaged teacher export is refused.
A cut last line of metrics.jsonl is named and its epoch trained again from a checkpoint inside it; a
finished run's rerun rewrites a damaged export; an export without manifest is refused.
"""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest

import tiny_runs
from zkd_jax.io import torch_weights as convert
from zkd_jax.io import checkpoint, manifest
from zkd_jax.io import metrics as metrics_io
from zkd_jax.trainer import train_and_evaluate


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return tiny_runs.save_teacher(tmp_path_factory.mktemp("teacher") / "resnet8")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, teacher_dir):
    root = tmp_path_factory.mktemp("runs")
    train_and_evaluate(tiny_runs.config(teacher_dir), root / "straight")
    first = train_and_evaluate(tiny_runs.config(teacher_dir, max_steps=6), root / "stopped")
    assert first["step"] == 6
    return root


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 400] = bytes(b ^ 0xFF for b in data[mid:mid + 400])
    path.write_bytes(bytes(data))


DAMAGES = {"truncated": _truncate, "deleted": lambda p: p.unlink(), "flipped": _flip}


def test_checkpoints_carry_verified_manifests(runs):
    steps = sorted(int(p.name) for p in (runs / "stopped" / "checkpoints").iterdir())
    assert steps == [4, 5, 6]
    for step in steps:
        assert manifest.verify(runs / "stopped" / "checkpoints" / str(step)) is None
    best = next((runs / "straight" / "checkpoints_best").iterdir())
    assert manifest.verify(best) is None


def test_resume_from_intact_checkpoint_keeps_epoch_means(runs, teacher_dir, capsys):
    workdir = runs / "resumed"
    shutil.copytree(runs / "stopped", workdir)
    train_and_evaluate(tiny_runs.config(teacher_dir), workdir)
    assert "resuming" in capsys.readouterr().out
    tiny_runs.assert_same_state(runs / "straight", workdir)
    straight, resumed = metrics_io.read_metrics(runs / "straight"), metrics_io.read_metrics(workdir)
    assert [r["epoch"] for r in straight] == [r["epoch"] for r in resumed] == [1, 2]
    for a, b in zip(straight, resumed):  # epoch 2 was interrupted at its first step
        for key in ("train_loss", "train_ce", "train_kd", "train_grad_norm", "top1"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=0), key


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_newest_checkpoint_is_passed_over(runs, teacher_dir, tmp_path, capsys, damage):
    workdir = tmp_path / damage
    shutil.copytree(runs / "stopped", workdir)
    DAMAGES[damage](tiny_runs.largest_file(workdir / "checkpoints" / "6"))
    train_and_evaluate(tiny_runs.config(teacher_dir), workdir)
    out = capsys.readouterr().out
    assert "checkpoint 6 in " in out and "is damaged (file " in out, out
    assert f"resuming {workdir} from step 5" in out
    assert (workdir / checkpoint.DAMAGED / "checkpoints-6").is_dir()
    tiny_runs.assert_same_state(runs / "straight", workdir)
    summary = metrics_io.read_summary(workdir)
    assert summary["finished"] and summary["step"] == tiny_runs.TOTAL_STEPS


def test_damaged_best_checkpoint_is_named(runs, tmp_path, capsys):
    workdir = tmp_path / "best"
    shutil.copytree(runs / "straight", workdir)
    best = next((workdir / "checkpoints_best").iterdir())
    _flip(tiny_runs.largest_file(best))
    ckpt = checkpoint.Checkpointer(workdir)
    assert ckpt.latest_step() == tiny_runs.TOTAL_STEPS
    ckpt.close()
    assert f"best checkpoint {best.name} in " in capsys.readouterr().out
    assert not best.exists()


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_teacher_export_is_refused(teacher_dir, tmp_path, damage):
    copy = tmp_path / "teacher"
    shutil.copytree(teacher_dir, copy)
    DAMAGES[damage](tiny_runs.largest_file(copy))
    with pytest.raises(ValueError, match=r"is damaged \(file .*; convert or export it again"):
        convert.load_variables(copy)
    variables, meta = convert.load_variables(teacher_dir)  # the intact one still loads
    assert meta["arch"] == "resnet8" and "params" in variables


def test_cut_last_metrics_line_is_named_and_its_epoch_computed_again(runs, teacher_dir, tmp_path,
                                                                     capsys):
    """A ``metrics.jsonl`` whose last line (epoch 2's record) was cut: the rerun names the file and
    line, goes back to checkpoint 8 (inside epoch 2) and writes the record an uninterrupted run
    writes; the final state is the same."""
    workdir = tmp_path / "cut"
    shutil.copytree(runs / "straight", workdir)
    path = workdir / metrics_io.METRICS
    lines = path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 2
    path.write_bytes(lines[0] + lines[1][: len(lines[1]) // 2])
    summary = train_and_evaluate(tiny_runs.config(teacher_dir), workdir)
    out = capsys.readouterr().out
    assert f"{path} line 2 is damaged (not JSON: " in out, out
    assert f"{path}: the record of epoch 2 is missing; resuming from checkpoint 8" in out, out
    assert summary["finished"] and summary["step"] == tiny_runs.TOTAL_STEPS
    tiny_runs.assert_same_state(runs / "straight", workdir)
    straight, resumed = metrics_io.read_metrics(runs / "straight"), metrics_io.read_metrics(workdir)
    assert [r["epoch"] for r in resumed] == [1, 2]
    for a, b in zip(straight, resumed):
        for key in ("train_loss", "train_ce", "train_kd", "train_grad_norm", "top1", "top5",
                    "test_loss", "lr", "step"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=0), key
    assert metrics_io.read_records(path)[1] == []  # rewritten whole, without the cut line


def test_binary_garbage_in_metrics_is_skipped_and_named(tmp_path):
    path = tmp_path / metrics_io.METRICS
    path.write_bytes(b'{"epoch": 1, "step": 5}\n\x00\xff\xfe garbage \x81\n'
                     b'{"epoch": 2, "step": 10}\n')
    records, problems = metrics_io.read_records(path)
    assert [r["epoch"] for r in records] == [1, 2]
    assert problems == [f"{path} line 2 is damaged (not UTF-8 text)"]
    assert metrics_io.read_metrics(tmp_path) == records
    (tmp_path / metrics_io.SUMMARY).write_bytes(b'{"best_top1": 1')
    with pytest.raises(ValueError, match=rf"{tmp_path / metrics_io.SUMMARY} is damaged"):
        metrics_io.read_summary(tmp_path)


def test_export_verified_refused_without_manifest_and_rebuilt_when_damaged(runs, teacher_dir,
                                                                           tmp_path, capsys):
    """A finished run's rerun writes a missing ``export/``, and writes a damaged one again from
    the last checkpoint; an export without its manifest is refused unless allowed."""
    workdir = tmp_path / "exported"
    shutil.copytree(runs / "straight", workdir)
    config = tiny_runs.config(teacher_dir)
    config.export = True
    train_and_evaluate(config, workdir)  # finished: only the export is written
    export = workdir / checkpoint.EXPORT
    assert manifest.verify(export) is None
    good, _ = convert.load_variables(export)
    _flip(tiny_runs.largest_file(export))
    train_and_evaluate(config, workdir)
    out = capsys.readouterr().out
    assert f"{export} is damaged (file " in out and "writing it again from checkpoint 10" in out
    again, meta = convert.load_variables(export)
    assert meta["arch"] == "resnet8"
    for a, b in zip(jax.tree.leaves(good), jax.tree.leaves(again)):
        assert np.array_equal(a, b)
    assert sorted(p.name for p in workdir.iterdir() if ".zkd-" in p.name) == []  # no temporaries
    (export / manifest.MANIFEST).unlink()
    _flip(tiny_runs.largest_file(export))
    with pytest.raises(ValueError, match=r"has no zkd_manifest\.json, so it cannot be verified; .*"
                                         r"--config\.teacher\.allow_unverified=True"):
        convert.load_variables(export)
    variables, _ = convert.load_variables(export, allow_unverified=True)  # explicitly allowed
    assert "params" in variables
