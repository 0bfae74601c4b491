"""Issue 16, acceptance 3 and 4: failed checkpoint writes and non-finite values stop the run.

A full disk (the write raises ``OSError(ENOSPC)`` at once) and an unwritable directory (the
background write fails, noticed at the next save) are simulated by patching orbax's
``CheckpointManager``: as root, ``chmod`` would not stop the writes. Each stops the run in the step
that notices it with one ``CheckpointSaveError`` line; ``summary.json`` names a checkpointed step
only; the rerun completes bit-identical to an uninterrupted run. A NaN teacher logit stops the run
naming it, before any parameter is saved.
"""

from __future__ import annotations

import errno

import numpy as np
import orbax.checkpoint as ocp
import pytest

import tiny_runs
from zkd_jax.io import metrics as metrics_io
from zkd_jax.io.manifest import CheckpointSaveError
from zkd_jax.trainer import NonFiniteLossError, train_and_evaluate


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return tiny_runs.save_teacher(tmp_path_factory.mktemp("teacher") / "resnet8")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, teacher_dir):
    workdir = tmp_path_factory.mktemp("straight") / "run"
    train_and_evaluate(tiny_runs.config(teacher_dir), workdir)
    return workdir


def _checkpointed(workdir) -> set[int]:
    return {int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()}


def _rerun_completes(workdir, teacher_dir, straight) -> None:
    summary = train_and_evaluate(tiny_runs.config(teacher_dir), workdir)
    assert summary["finished"] and summary["step"] == tiny_runs.TOTAL_STEPS
    tiny_runs.assert_same_state(straight, workdir)


def test_full_disk_stops_the_run(monkeypatch, tmp_path, teacher_dir, straight):
    real_save = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == 6:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.directory))
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    workdir = tmp_path / "full"
    with pytest.raises(CheckpointSaveError) as info:
        train_and_evaluate(tiny_runs.config(teacher_dir), workdir)
    message = str(info.value)
    assert "\n" not in message and "saving checkpoint 6 in " in message
    assert "No space left on device" in message and "rerun to resume" in message
    summary = metrics_io.read_summary(workdir)
    assert summary["step"] == 5 and summary["step"] in _checkpointed(workdir)
    assert all(r["step"] in _checkpointed(workdir) for r in metrics_io.read_metrics(workdir))
    monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
    _rerun_completes(workdir, teacher_dir, straight)


def test_failed_background_write_stops_the_run(monkeypatch, tmp_path, teacher_dir, straight):
    real_save, real_wait = ocp.CheckpointManager.save, ocp.CheckpointManager.wait_until_finished
    failed = []

    def save(self, step, *args, **kwargs):
        out = real_save(self, step, *args, **kwargs)
        if step == 6:  # its background write "fails": noticed by the next wait
            failed.append(str(self.directory))
        return out

    def wait(self):
        real_wait(self)
        if failed and str(self.directory) == failed[0]:
            raise PermissionError(errno.EACCES, "Permission denied", failed[0])

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", wait)
    workdir = tmp_path / "unwritable"
    with pytest.raises(CheckpointSaveError, match=r"saving a checkpoint in .*checkpoints failed "
                                                  r"\(PermissionError: .*Permission denied"):
        train_and_evaluate(tiny_runs.config(teacher_dir), workdir)
    summary = metrics_io.read_summary(workdir)
    assert summary["step"] == 5 and summary["step"] in _checkpointed(workdir)
    monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", real_wait)
    _rerun_completes(workdir, teacher_dir, straight)  # checkpoint 6 has no manifest: passed over


def _nan_classifier_bias(variables):
    """One NaN in the bias of the classifier (the only bias of 10 entries): every logit of
    class 0 is NaN."""
    def walk(node):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value)
            elif key == "bias" and value.shape == (10,):
                value[0] = np.nan
                found.append(key)
    found = []
    walk(variables["params"])
    assert found == ["bias"]


def test_nan_teacher_logit_stops_before_any_save(tmp_path):
    teacher = tiny_runs.save_teacher(tmp_path / "nan_teacher", poison=_nan_classifier_bias)
    workdir = tmp_path / "run"
    with pytest.raises(NonFiniteLossError,
                       match=r"a teacher logit is NaN or inf .* at step 1 \(epoch 1\); stopped\. "
                             r"No checkpoint was written yet"):
        train_and_evaluate(tiny_runs.config(teacher), workdir)
    assert not _checkpointed(workdir)
