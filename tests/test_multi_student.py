"""Several students in one program (issue 7): ``config.students`` with K students.

Real ``train_and_evaluate`` runs on the offline digits (resnet8 student, random resnet8 teacher
saved in the zkd-convert format), K = 2: two students with the single run's seed and settings both
end where the single run ends; in a second K = 2 run (stopped and resumed) the student with the
single run's seed ends there too, the student with another seed, temperature and kd weight ends
elsewhere, and each has its own metrics, summary, checkpoints and export. At the
step level, K = 3 on a tiny model (two students identical to one single run, one different) checks
every form of the multi step ("loop", "vmap", "vmap_matmul") against single steps.
"""

from __future__ import annotations

import chex
import jax
import ml_collections
import numpy as np
import pytest

from flax import linen as nn

from cpu_devices import every_xla_optimization
from zkd_jax import methods, models, optim
from zkd_jax.io import torch_weights as convert
from zkd_jax.io import checkpoint
from zkd_jax.io import metrics as metrics_io
from zkd_jax.step import multi as multi_student
from zkd_jax.trainer import students as students_lib
from zkd_jax.configs import common, demo
from zkd_jax.models import layers
from zkd_jax.parallel import create_mesh, host_to_global
from zkd_jax.step import make_train_step
from zkd_jax.trainer import train_and_evaluate
from zkd_jax.step.state import init_variables

BATCH = 32
STEPS_PER_EPOCH = 11  # config.train_examples = 11 * BATCH


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("teacher") / "resnet8"
    model = models.create("resnet8", num_classes=10, dataset="cifar100")
    variables = init_variables(model, jax.random.PRNGKey(5), (1, 32, 32, 3))
    convert.save_variables(directory, jax.device_get(variables), arch="resnet8",
                           dataset="cifar100", num_classes=10)
    return str(directory)


def _config(teacher_checkpoint, *, students=(), max_steps=-1):
    config = demo.get_config("kd_ls")
    config.suite = ml_collections.ConfigDict()
    settings, _ = common.method_settings("kd_ls", "resnet8", "resnet8")
    config.method = common.method_config(settings)
    config.teacher.arch = "resnet8"
    config.teacher.checkpoint = teacher_checkpoint
    config.teacher.train_if_missing = False
    config.batch_size = BATCH
    config.train_examples = STEPS_PER_EPOCH * BATCH
    config.epochs = 1
    config.optimizer.milestones = ()
    config.max_steps = max_steps
    config.keep_checkpoints = 3
    config.log_every_steps = 3
    config.progress_bar = False
    config.students = tuple(students)
    config.optimizer.lr = 0.01  # keeps the runs' rounding differences from growing (see below)
    return config


def _state_leaves(workdir, step=None):
    ckpt = checkpoint.Checkpointer(workdir, keep=3)
    step = ckpt.latest_step() if step is None else step
    restored = ckpt.last.restore(step)
    ckpt.close()
    return step, [np.asarray(x) for x in jax.tree.leaves(restored["state"])]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, teacher_dir):
    """A single run (seed 0) and one K = 2 run: student 0 with its seed and settings, student 1 with
    seed 1, temperature 3 and kd weight 8; the K = 2 run stops after 4 steps and resumes. Compiled
    with every XLA optimization, as users run them (tests/conftest.py says why)."""
    root = tmp_path_factory.mktemp("multi")
    students = [{"seed": 0}, {"seed": 1, "temperature": 3.0, "kd_weight": 8.0}]
    with every_xla_optimization():
        single = train_and_evaluate(_config(teacher_dir), root / "single")
        stopped = train_and_evaluate(_config(teacher_dir, students=students, max_steps=4),
                                     root / "multi")
        assert [s["step"] for s in stopped["students"]] == [4, 4]
        multi = train_and_evaluate(_config(teacher_dir, students=students), root / "multi")
        twins = train_and_evaluate(_config(teacher_dir, students=[{"seed": 0}, {"seed": 0}]),
                                   root / "twins")
    assert [s["step"] for s in twins["students"]] == [STEPS_PER_EPOCH] * 2
    return root, single, multi


def test_student_with_the_runs_seed_equals_single_run_across_resume(runs):
    root, single, multi = runs
    step, reference = _state_leaves(root / "single")
    assert step == STEPS_PER_EPOCH and single["finished"]
    k_step, leaves = _state_leaves(root / "multi" / "student_0")
    assert k_step == step
    # Equal up to rounding: XLA fuses the bigger program differently (~1e-11 per step here), and
    # training amplifies such differences (hence this run's low learning rate).
    for x, y in zip(leaves, reference, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    summary = multi["students"][0]
    assert summary["finished"] and summary["student_seed"] == 0 and summary["data_seed"] == 0
    assert summary["last_top1"] == single["last_top1"]


def test_two_students_with_the_same_seed_and_settings_both_equal_single_run(runs):
    root, single, _ = runs
    _, reference = _state_leaves(root / "single")
    _, first = _state_leaves(root / "twins" / "student_0")
    _, second = _state_leaves(root / "twins" / "student_1")
    for x, y, z in zip(first, second, reference, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(x, z, rtol=1e-5, atol=1e-6)
    summaries = metrics_io.read_summary(root / "twins")["students"]
    assert [s["last_top1"] for s in summaries] == [single["last_top1"]] * 2


def test_different_seed_and_settings_end_different(runs):
    root, _, _ = runs
    _, first = _state_leaves(root / "multi" / "student_0")
    _, second = _state_leaves(root / "multi" / "student_1")
    assert any(not np.allclose(x, y) for x, y in zip(first, second, strict=True))
    config = metrics_io.read_summary(root / "multi" / "student_1")["config"]
    assert config["seed"] == 1 and config["method"]["temperature"] == 3.0
    assert config["method"]["kd_weight"] == 8.0 and config["students"] == []


def test_per_student_outputs_exist(runs):
    root, _, _ = runs
    top = metrics_io.read_summary(root / "multi")
    assert [s["student"] for s in top["students"]] == [0, 1]
    for k in range(2):
        d = root / "multi" / f"student_{k}"
        records = metrics_io.read_metrics(d)
        assert [r["epoch"] for r in records] == [1]
        assert {"train_loss", "train_kd", "top1", "top5"} <= set(records[0])
        assert (d / "tensorboard").is_dir() and (d / "checkpoints_best").is_dir()
        variables, meta = convert.load_variables(d / "export")
        assert meta["arch"] == "resnet8" and "params" in variables


class TinyStudent(nn.Module):
    """The zoo's layers (3x3 conv, BatchNorm, stride-2 conv, linear): compiles in a second, has
    params, batch stats and momentum, and convolutions that "vmap_matmul" turns into products."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = layers.Conv2d(4, 3, padding=1, name="conv")(x)
        x = layers.BatchNorm(name="bn")(x, train)
        x = layers.Conv2d(6, 3, stride=2, padding=1, name="down")(jax.nn.relu(x))
        return layers.Linear(5, name="fc")(jax.nn.relu(x).mean(axis=(1, 2)))


@pytest.mark.parametrize("form", multi_student.FORMS)
def test_multi_step_matches_single_steps(form):
    """The jitted K = 3 step = single steps: two students with the single step's seed and settings,
    one with another seed and temperature (vmap selects its objective with lax.switch)."""
    mesh = create_mesh()
    student, teacher = TinyStudent(), TinyStudent()
    method = methods.KD(temperature=2.0, kd_weight=9.0, standardize=True)
    other = methods.KD(temperature=4.0, kd_weight=1.0, standardize=True)
    schedule = optim.step_decay_schedule(0.01, steps_per_epoch=10, milestones=())
    tx = optim.sgd(schedule, weight_decay=5e-4)
    states = multi_student.create_states(student, [method, other], [3, 4], tx,
                                         input_shape=(1, 6, 6, 3), mesh=mesh)
    stacked = multi_student.stack_states([states[0], states[0], states[1]], mesh)
    teacher_vars = init_variables(teacher, jax.random.PRNGKey(9), (1, 6, 6, 3))
    single = make_train_step(student, teacher, method, tx, mesh, learning_rate_fn=schedule)
    single_other = make_train_step(student, teacher, other, tx, mesh, learning_rate_fn=schedule)
    multi = multi_student.make_multi_train_step(
        student, teacher, [method, method, other], tx, mesh, learning_rate_fn=schedule, form=form)
    rng = np.random.default_rng(0)
    epoch = np.int32(1)
    state, state_other = states
    for _ in range(3):
        batch = host_to_global({"image": rng.normal(size=(16, 6, 6, 3)).astype(np.float32),
                                "label": rng.integers(0, 5, 16).astype(np.int32)}, mesh)
        state, m1 = single(state, teacher_vars, batch, epoch)
        state_other, m3 = single_other(state_other, teacher_vars, batch, epoch)
        stacked, m = multi(stacked, teacher_vars, batch, epoch)
        chex.assert_shape(m["loss"], (3,))
        np.testing.assert_allclose(np.asarray(m["loss"]),
                                   [float(m1["loss"])] * 2 + [float(m3["loss"])], rtol=1e-5)
    for k, expected in enumerate([state, state, state_other]):  # equal up to rounding
        got = jax.tree.leaves(multi_student.unstack_state(stacked, k, mesh))
        for x, y in zip(got, jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=f"{form} {k}")
    assert not np.allclose(jax.tree.leaves(state.params)[0],
                           jax.tree.leaves(state_other.params)[0])


def test_student_entries_are_checked(teacher_dir):
    config = _config(teacher_dir, students=[{"seed": 0}, {"temperature": 3.0}])
    with pytest.raises(ValueError, match="no 'seed'"):
        students_lib.student_specs(config)
    config = _config(teacher_dir, students=[{"seed": 0, "tau": 3.0}])
    with pytest.raises(ValueError, match="no setting tau"):
        students_lib.student_specs(config)
    students = [2, {"seed": 3, "ce_weight": 1.0}]
    specs = students_lib.student_specs(_config(teacher_dir, students=students))
    assert [s.seed for s in specs] == [2, 3] and specs[1].method["ce_weight"] == 1.0
    assert students_lib.student_specs(_config(teacher_dir)) == []
