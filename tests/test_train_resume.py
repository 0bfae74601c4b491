"""Acceptance 4 (resume is bit-identical), the NaN stop, and teacher-checkpoint errors (issue 5).

Real ``train_and_evaluate`` runs on the offline digits: a resnet8 student distilled with CTKD + LS
(learned temperature, curriculum by epoch: the most state a method has) from a resnet8 teacher whose
random variables are written with ``zkd_jax.io.torch_weights.save_variables`` (the format
zkd-convert and teacher runs write).
"""

from __future__ import annotations

import re
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from zkd_jax import models
from zkd_jax.io import torch_weights as convert
from zkd_jax.io import checkpoint
from zkd_jax.io import metrics as metrics_io
from zkd_jax.configs import common, demo
from zkd_jax.trainer import NonFiniteLossError, train_and_evaluate
from zkd_jax.step.state import init_variables

STEPS_PER_EPOCH = 23  # config.train_examples = 23 * 16


def _save_teacher(directory, *, arch="resnet8", claimed_arch=None, seed=5):
    model = models.create(arch, num_classes=10, dataset="cifar100")
    variables = init_variables(model, jax.random.PRNGKey(seed), (1, 32, 32, 3))
    convert.save_variables(directory, jax.device_get(variables), arch=claimed_arch or arch,
                           dataset="cifar100", num_classes=10)
    return str(directory)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return _save_teacher(tmp_path_factory.mktemp("teacher") / "resnet8")


def _config(teacher_checkpoint, *, max_steps, arch="resnet8"):
    config = demo.get_config("ctkd_ls")
    config.suite = ml_collections.ConfigDict()
    settings, _ = common.method_settings("ctkd_ls", arch, "resnet8")
    config.method = common.method_config(settings)
    config.student.arch = "resnet8"
    config.teacher.arch = arch
    config.teacher.checkpoint = teacher_checkpoint
    config.teacher.train_if_missing = False
    config.batch_size = 16
    config.train_examples = STEPS_PER_EPOCH * 16
    config.epochs = 2
    config.optimizer.milestones = (1,)
    config.max_steps = max_steps
    config.log_every_steps = 5
    config.progress_bar = False
    config.export = False
    return config


def _final_state(workdir) -> tuple[int, list[np.ndarray]]:
    ckpt = checkpoint.Checkpointer(workdir)
    step = ckpt.latest_step()
    restored = ckpt.last.restore(step)  # raw restore: numpy/jax arrays as saved
    ckpt.close()
    return step, [np.asarray(x) for x in jax.tree.leaves(restored["state"])]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, teacher_dir):
    root = tmp_path_factory.mktemp("resume")
    straight, resumed = root / "straight", root / "resumed"
    train_and_evaluate(_config(teacher_dir, max_steps=30), straight)
    first = train_and_evaluate(_config(teacher_dir, max_steps=10), resumed)
    assert first["step"] == 10 and first["last_epoch"] == 0  # stopped inside epoch 1
    second = train_and_evaluate(_config(teacher_dir, max_steps=30), resumed)
    return straight, resumed, second


def test_resumed_run_is_bit_identical(runs):
    straight, resumed, second = runs
    assert second["step"] == 30 and second["last_epoch"] == 1
    step_a, leaves_a = _final_state(straight)
    step_b, leaves_b = _final_state(resumed)
    assert step_a == step_b == 30
    assert len(leaves_a) == len(leaves_b) > 10
    for a, b in zip(leaves_a, leaves_b):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    # The evaluation after epoch 1 is the same too (metrics.jsonl of both workdirs).
    rec_a, rec_b = metrics_io.read_metrics(straight), metrics_io.read_metrics(resumed)
    assert [r["step"] for r in rec_a] == [r["step"] for r in rec_b] == [STEPS_PER_EPOCH]
    assert rec_a[0]["top1"] == rec_b[0]["top1"] and rec_a[0]["top5"] == rec_b[0]["top5"]


def test_outputs_of_a_run(runs):
    straight, _, _ = runs
    summary = metrics_io.read_summary(straight)
    records = metrics_io.read_metrics(straight)
    assert summary["best_top1"] == max(r["top1"] for r in records)
    assert summary["last_top1"] == records[-1]["top1"] and summary["last_epoch"] == 1
    assert summary["config"]["method"]["name"] == "ctkd" and not summary["finished"]
    for key in ("epoch", "step", "lr", "train_loss", "train_ce", "train_kd", "train_temperature",
                "top1", "top5", "images_per_sec"):
        assert key in records[0], key
    assert list((straight / "tensorboard").glob("events.out.tfevents.*"))
    assert (straight / "checkpoints_best").is_dir()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(runs, tmp_path, teacher_dir):
    _, resumed, _ = runs
    workdir = tmp_path / "nan"
    shutil.copytree(resumed, workdir)
    config = _config(teacher_dir, max_steps=40)
    config.optimizer.lr = 1e30  # blows the parameters up at the first update
    with pytest.raises(ValueError, match=r"optimizer\.lr \S+ -> 1e\+30"):
        train_and_evaluate(config, workdir)  # another learning rate: a resume refuses it
    with pytest.raises(NonFiniteLossError,
                       match=r"(training loss is (nan|inf)|the gradient norm is (nan|inf)|a "
                             r"parameter became NaN or inf after the update) at step 3\d .*last "
                             r"good checkpoint \(step 30\) is kept"):
        train_and_evaluate(config, workdir, allow_config_change=True)
    step, leaves = _final_state(workdir)
    assert step == 30 and all(np.isfinite(x).all() for x in leaves if x.dtype.kind == "f")


def test_teacher_checkpoint_of_another_architecture(tmp_path, teacher_dir):
    config = _config(teacher_dir, max_steps=1, arch="resnet14")
    with pytest.raises(ValueError, match=re.escape("holds a 'resnet8', but config.teacher.arch is "
                                                   "'resnet14'")):
        train_and_evaluate(config, tmp_path / "a")
    # Metadata that names the right architecture, variables of another: the shapes are checked.
    mislabeled = _save_teacher(tmp_path / "mislabeled", claimed_arch="resnet14")
    config = _config(mislabeled, max_steps=1, arch="resnet14")
    with pytest.raises(ValueError, match="does not match the model"):
        train_and_evaluate(config, tmp_path / "b")


def test_missing_teacher_checkpoint(tmp_path):
    config = _config(str(tmp_path / "nowhere"), max_steps=1)
    with pytest.raises(ValueError, match="does not exist; convert the published teacher"):
        train_and_evaluate(config, tmp_path / "c")
    config.teacher.checkpoint = None
    with pytest.raises(ValueError, match="config.teacher.checkpoint is not set"):
        train_and_evaluate(config, tmp_path / "d")


def test_mlkd_runs_through_the_pipeline_in_mixed_precision(tmp_path, teacher_dir):
    """MLKD's two views (weak + strong from the data module), bfloat16 compute, float32 state."""
    variant = "mlkd_ls"
    config = _config(teacher_dir, max_steps=2)
    settings, _ = common.method_settings(variant, "resnet8", "resnet8")
    config.method = common.method_config(settings)
    config.mixed_precision = True
    summary = train_and_evaluate(config, tmp_path / variant)
    assert summary["step"] == 2 and not summary["finished"]
    step, leaves = _final_state(tmp_path / variant)
    assert step == 2
    floats = [x for x in leaves if x.dtype.kind == "f"]
    assert all(x.dtype == np.float32 and np.isfinite(x).all() for x in floats)
