"""``config.steps_per_call``: several steps in one scanned program (``zkd_jax.step.scan, zkd_jax.data.plan``).

The plan covers every step exactly once, aligned and inside its bounds; one scanned call equals the
same number of single steps (one student and K), up to rounding; real runs checkpoint at the same
steps, resume bit for bit from an epoch boundary, and refuse a pipeline that cannot feed a scan.
"""

from __future__ import annotations

import itertools

import chex
import jax
import numpy as np
import pytest
from flax import linen as nn

from zkd_jax import methods, optim
from zkd_jax.data import feeds as feed_lib
from zkd_jax.data import plan as plan_lib
from zkd_jax.io import checkpoint
from zkd_jax.io import metrics as metrics_io
from zkd_jax.step import multi as multi_student
from zkd_jax.step import scan as scan_lib
from zkd_jax.models import layers
from zkd_jax.parallel import create_mesh
from zkd_jax.step import make_train_step
from zkd_jax.trainer import train_and_evaluate
from zkd_jax.step.state import init_variables

BATCH = 32


@pytest.mark.parametrize("start, end, epoch_start, n, every", [
    (s, e, 11 * (s // 11), n, c)
    for s, e, n, c in itertools.product((0, 3, 11, 14), (17, 22), (1, 2, 4, 8), (0, 3, 7))
    if s < e
])
def test_plan_covers_each_step_once_aligned_and_bounded(start, end, epoch_start, n, every):
    sizes = list(plan_lib.plan(start, end, epoch_start=epoch_start, n=n, checkpoint_every=every))
    assert sum(sizes) == end - start and set(sizes) <= {1, n}
    step = start
    for size in sizes:
        if size > 1:
            assert (step - epoch_start) % n == 0
            inside = range(step + 1, step + size)  # step counts passed through, not ended at
            assert not every or all(m % every for m in inside)
        step += size
    if n > 1 and every == 0 and start == epoch_start:
        assert sizes[: (end - start) // n] == [n] * ((end - start) // n)  # scans first


def test_steps_per_call_errors_say_what_to_set():
    assert plan_lib.check_steps_per_call(1, "tfdata") == 1
    assert plan_lib.check_steps_per_call(8, "device") == 8
    with pytest.raises(ValueError, match="set config.input_pipeline='device'"):
        plan_lib.check_steps_per_call(4, "tfdata")
    with pytest.raises(ValueError, match="must be >= 1"):
        plan_lib.check_steps_per_call(0, "device")


class TinyNet(nn.Module):
    """The zoo's layers at a size that compiles in a second."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = layers.Conv2d(4, 3, stride=2, padding=1, name="conv")(x)
        x = layers.BatchNorm(name="bn")(x, train)
        return layers.Linear(10, name="fc")(jax.nn.relu(x).mean(axis=(1, 2)))


def _close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("students, unroll", [(1, False), (1, True), (2, None)])
def test_one_scanned_call_equals_single_steps(students, unroll):
    mesh = create_mesh()
    net = TinyNet()
    method = methods.KD(temperature=4.0, kd_weight=9.0, standardize=True)
    schedule = optim.step_decay_schedule(0.01, steps_per_epoch=10, milestones=())
    tx = optim.sgd(schedule, weight_decay=5e-4)
    teacher_vars = init_variables(net, jax.random.PRNGKey(9), (1, 32, 32, 3))
    feed = feed_lib.make_feed("device", dataset="digits", mesh=mesh, seed=0, views=("weak",),
                              batch_size=BATCH, eval_batch_size=BATCH)
    split = feed.device
    if students == 1:
        step = make_train_step(net, net, method, tx, mesh, learning_rate_fn=schedule)
        fresh = lambda: multi_student.create_states(  # noqa: E731
            net, [method], [3], tx, input_shape=(1, 32, 32, 3), mesh=mesh)[0]
    else:
        step = multi_student.make_multi_train_step(net, net, [method] * 2, tx, mesh,
                                                   learning_rate_fn=schedule)
        fresh = lambda: multi_student.stack_states(multi_student.create_states(  # noqa: E731
            net, [method] * 2, [3, 4], tx, input_shape=(1, 32, 32, 3), mesh=mesh), mesh)
    epoch = split.put(2)
    order = split.order(epoch)
    state, losses = fresh(), []
    for s in range(5, 8):  # steps 5, 6, 7 of epoch 2
        state, m = step(state, teacher_vars, split.batch(epoch, order, s), epoch)
        losses.append(np.asarray(m["loss"]))
    scanned = scan_lib.make_scanned_step(step.unjitted, mesh, 3, split.build,
                                         unroll=unroll)  # a loop, unrolled, the default
    got, metrics = scanned(fresh(), teacher_vars, split.images, split.labels, split.key, epoch,
                           split.put(5), order)
    chex.assert_shape(metrics["loss"], (3,) if students == 1 else (3, 2))
    np.testing.assert_allclose(np.asarray(metrics["loss"]), np.stack(losses), rtol=1e-5)
    _close(got, state, atol=1e-5)  # a few kernel entries ~1e-2 differ in the 6th digit


def _config(n: int, max_steps: int):
    from zkd_jax.configs import demo

    c = demo.teacher_config()  # cross-entropy only: the runs are about the calls
    c.input_pipeline = "device"
    c.student.arch = "resnet8"
    c.batch_size = 32
    c.train_examples = 11 * 32  # 11 steps per epoch
    c.epochs = 2
    c.optimizer.lr = 0.01
    c.optimizer.milestones = ()
    c.max_steps = max_steps
    c.checkpoint_every_steps = 7
    c.keep_checkpoints = 10
    c.log_every_steps = 3
    c.progress_bar = False
    c.export = False
    c.steps_per_call = n
    return c


def _final(workdir):
    ckpt = checkpoint.Checkpointer(workdir)
    try:
        return list(ckpt.last.all_steps()), jax.tree.leaves(
            ckpt.last.restore(ckpt.latest_step())["state"])
    finally:
        ckpt.close()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A 17-step run with 4 steps per call: (its workdir, its summary)."""
    workdir = tmp_path_factory.mktemp("scans") / "straight"
    return workdir, train_and_evaluate(_config(4, 17), workdir)


def test_runs_with_scans_checkpoint_alike_and_resume_bit_identically(straight, tmp_path):
    straight_dir, straight = straight
    one = train_and_evaluate(_config(1, 17), tmp_path / "one")
    train_and_evaluate(_config(4, 11), tmp_path / "resumed")  # stops at the end of epoch 1
    resumed = train_and_evaluate(_config(4, 17), tmp_path / "resumed")
    assert one["step"] == straight["step"] == resumed["step"] == 17
    steps_one, leaves_one = _final(tmp_path / "one")
    steps_straight, leaves_straight = _final(straight_dir)
    _, leaves_resumed = _final(tmp_path / "resumed")
    assert steps_one == steps_straight == [7, 11, 14, 17]  # every 7 steps, epoch 1's end, the stop
    for a, b in zip(leaves_straight, leaves_resumed, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    a, b = (metrics_io.read_metrics(d)[0] for d in (tmp_path / "one", straight_dir))
    assert a["step"] == b["step"] == 11
    np.testing.assert_allclose(b["train_loss"], a["train_loss"], rtol=1e-4)  # same 11 batches
    with pytest.raises(ValueError, match="set config.input_pipeline='device'"):
        c = _config(4, 17)
        c.input_pipeline = "tfdata"
        train_and_evaluate(c, tmp_path / "tfdata")


def test_k_students_with_scans_split_their_metrics(straight, tmp_path):
    """Scanned K = 2 metrics ([steps, K]) reach each student: student 0 (the config's seed) logs
    the single run's first epoch, student 1 (another seed) its own."""
    config = _config(4, 11)
    config.students = ({"seed": config.seed}, {"seed": config.seed + 1})
    train_and_evaluate(config, tmp_path / "multi")
    ref = metrics_io.read_metrics(straight[0])[0]  # epoch 1: the same 11 steps and calls
    (first,) = metrics_io.read_metrics(tmp_path / "multi" / "student_0")
    (second,) = metrics_io.read_metrics(tmp_path / "multi" / "student_1")
    assert ref["step"] == first["step"] == second["step"] == 11
    np.testing.assert_allclose(first["train_loss"], ref["train_loss"], rtol=1e-5)
    assert first["top1"] == pytest.approx(ref["top1"], abs=0.35)  # at most one image of 297
    assert second["train_loss"] != pytest.approx(ref["train_loss"], rel=1e-4)
