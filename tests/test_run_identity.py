"""A run's identity on resume: a changed config stops (one line, old and new values) unless it is
accepted with ``--allow_config_change`` (recorded); ``epochs`` extends a finished run, whose
``export/`` is then the one a fresh run of as many epochs writes; another architecture is named,
not dumped as an orbax tree; TensorBoard holds each point once after a fallback across an epoch.

Tiny real runs (tests/tiny_runs.py): 5 steps per epoch, a checkpoint every 2 steps.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import tiny_runs
from zkd_jax.io import torch_weights as convert
from zkd_jax.io import metrics as metrics_io
from zkd_jax.trainer import train_and_evaluate
from zkd_jax.trainer import identity


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return tiny_runs.save_teacher(tmp_path_factory.mktemp("teacher") / "resnet8")


def _config(teacher_dir, epochs: int):
    config = tiny_runs.config(teacher_dir)
    config.epochs = epochs
    config.export = True
    config.input_pipeline = "device"  # quicker to set up than tf.data
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory, teacher_dir):
    """A fresh 2-epoch run, and a 1-epoch run that finished (extended by the tests)."""
    root = tmp_path_factory.mktemp("identity")
    train_and_evaluate(_config(teacher_dir, 2), root / "two")
    train_and_evaluate(_config(teacher_dir, 1), root / "one")
    return root


def _copy(runs, tmp_path, name="one"):
    shutil.copytree(runs / name, tmp_path / name)
    return tmp_path / name


def test_extending_epochs_refreshes_export_and_summary(runs, tmp_path, teacher_dir):
    workdir = _copy(runs, tmp_path)
    before = convert.load_variables(workdir / "export")[0]
    summary = train_and_evaluate(_config(teacher_dir, 2), workdir)
    assert summary["finished"] and summary["step"] == 10 and summary["last_epoch"] == 2
    assert summary["config_history"] == [
        {"step": 5, "changes": {"epochs": [1, 2]}, "accepted": "resumable"}]
    fresh, _ = convert.load_variables(runs / "two" / "export")
    extended, _ = convert.load_variables(workdir / "export")
    leaves = list(zip(*(tiny_runs.jax.tree.leaves(v) for v in (fresh, extended, before))))
    assert len(leaves) > 10
    assert all(np.array_equal(a, b) for a, b, _ in leaves)
    assert not all(np.array_equal(a, c) for a, _, c in leaves)  # the export was refreshed
    assert metrics_io.read_metrics(workdir) == [
        {**r, **{k: r2[k] for k in ("epoch_seconds", "eval_seconds", "images_per_sec")}}
        for r, r2 in zip(metrics_io.read_metrics(runs / "two"), metrics_io.read_metrics(workdir))]


def test_changed_temperature_stops_with_one_line(runs, tmp_path, teacher_dir):
    workdir = _copy(runs, tmp_path)
    config = _config(teacher_dir, 2)
    config.method.temperature = 8.0
    with pytest.raises(identity.ConfigChangedError) as info:
        train_and_evaluate(config, workdir)
    message = str(info.value)
    assert "\n" not in message and len(message) < 500, message
    assert "method.temperature 4.0 -> 8.0" in message and "epochs" not in message
    assert "--allow_config_change" in message and "another --workdir" in message
    assert metrics_io.read_summary(workdir)["step"] == 5  # nothing ran
    summary = train_and_evaluate(config, workdir, allow_config_change=True)
    assert summary["finished"] and summary["config"]["method"]["temperature"] == 8.0
    assert summary["config_history"] == [{
        "step": 5, "changes": {"epochs": [1, 2], "method.temperature": [4.0, 8.0]},
        "accepted": "--allow_config_change"}]


def test_another_architecture_is_named_not_dumped(runs, tmp_path, teacher_dir):
    workdir = _copy(runs, tmp_path)
    config = _config(teacher_dir, 2)
    config.student.arch = "resnet14"
    with pytest.raises(identity.ConfigChangedError, match=r"student\.arch 'resnet8' -> "
                                                          r"'resnet14'"):
        train_and_evaluate(config, workdir)
    with pytest.raises(ValueError) as info:
        train_and_evaluate(config, workdir, allow_config_change=True)
    message = str(info.value)
    assert "\n" not in message and len(message) < 500, message
    assert "does not fit the model of this config" in message


def test_tensorboard_holds_each_point_once_after_a_fallback(runs, tmp_path, teacher_dir):
    """The newest checkpoints lost (step 10 and 8): the run falls back to step 6, in epoch 2,
    across the end of epoch 1... and re-runs epoch 2's evaluation: TensorBoard has it once."""
    workdir = _copy(runs, tmp_path, "two")
    for step in (10, 8):
        shutil.rmtree(workdir / "checkpoints" / str(step))
    shutil.rmtree(workdir / "checkpoints_best")
    train_and_evaluate(_config(teacher_dir, 2), workdir)
    assert _scalar_steps(workdir / "tensorboard", "top1") == [5, 10]


def _scalar_steps(directory, tag: str) -> list[int]:
    """The steps of ``tag``'s points in every event file below ``directory`` (TFRecord framing:
    8-byte length, 4-byte CRC, the Event proto, 4-byte CRC)."""
    from tensorboardX.proto import event_pb2

    steps = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            length = int.from_bytes(data[pos:pos + 8], "little")
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 16 + length
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return sorted(steps)


def test_a_checkpoint_from_before_a_config_field_existed_resumes_with_its_old_value():
    """An identity stored before ``optimizer.schedule`` (and its two numbers) existed compares as
    the step schedule: the same run resumes, a cosine is a change that is refused."""
    stored = tiny_runs.config("/teachers/t").to_dict()
    for name in identity.ADDED_FIELDS:
        group, field = name.split(".")
        stored[group].pop(field, None)
    meta = {identity.CONFIG_KEY: stored}
    now = tiny_runs.config("/teachers/t").to_dict()
    assert {k: now["optimizer"][k.split(".")[1]] for k in identity.ADDED_FIELDS} == (
        identity.ADDED_FIELDS)  # the config's defaults are the old behaviour
    kept = identity.resume_identity(meta, now, step=7, workdir="w", allow_change=False)
    assert kept[identity.HISTORY_KEY] == []
    now["optimizer"]["schedule"] = "cosine"
    with pytest.raises(identity.ConfigChangedError, match="optimizer.schedule 'step' -> 'cosine'"):
        identity.resume_identity(meta, now, step=7, workdir="w", allow_change=False)
