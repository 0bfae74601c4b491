"""The trainer's batch feeds (zkd_jax.data.feeds): tf.data on the host vs the split held on the devices.

Both feeds on the offline digits: same shapes, dtypes and sharding; the device feed is
deterministic and restartable at any step; its evaluation batches are tf.data's bit for bit; the
errors a user can cause say what to set; and a real ``train_and_evaluate`` with
``input_pipeline="device"`` resumes bit-identically.
"""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest

from zkd_jax import data, models, step
from zkd_jax.data import feeds as feed_lib
from zkd_jax.parallel import batch_sharding, create_mesh
from zkd_jax.trainer import train_and_evaluate
from zkd_jax.trainer.loop import evaluate
from zkd_jax.step.state import init_variables

BATCH, EVAL_BATCH = 64, 128


def _feed(pipeline, *, seed=0, views=("weak",), dataset="digits", batch=BATCH):
    return feed_lib.make_feed(pipeline, dataset=dataset, mesh=create_mesh(), seed=seed,
                              views=views, batch_size=batch, eval_batch_size=EVAL_BATCH)


def _host(batches):
    return [{k: np.asarray(v) for k, v in b.items()} for b in batches]


@pytest.mark.parametrize("pipeline", feed_lib.PIPELINES)
def test_train_batches_are_global_sharded_and_normalized(pipeline):
    batches = list(itertools.islice(_feed(pipeline).train(1, 0), 2))
    mesh = create_mesh()
    for b in batches:
        assert set(b) == {"image", "label"}
        assert b["image"].shape == (BATCH, 32, 32, 3) and b["image"].dtype == np.float32
        assert b["label"].shape == (BATCH,) and b["label"].dtype == np.int32
        assert b["image"].sharding.is_equivalent_to(batch_sharding(mesh), 4)
        image = np.asarray(b["image"])
        assert -3.0 < image.mean() < 3.0 and image.std() > 0.3  # normalized, not raw bytes
        assert 0 <= np.asarray(b["label"]).min() and np.asarray(b["label"]).max() < 10


def test_tfdata_feed_sends_uint8_and_the_step_gets_the_old_float32_batches():
    """Issue 18: the host batches stay uint8, are normalized on the devices, and the batches
    reaching the step equal the old path's (float32 normalized on the host, then copied) exactly,
    the padded eval batches included; MLKD's strong view is normalized by the same function."""
    from zkd_jax import data
    from zkd_jax.parallel import host_to_global

    mesh, views = create_mesh(), ("weak",)
    raw = next(data.train_batches("digits", per_process_batch_size=BATCH, seed=0, epoch=1,
                                  views=views, normalized=False))
    assert raw["image"].dtype == np.uint8
    new = _host(itertools.islice(_feed("tfdata", views=views).train(1, 0), 3))
    old = _host(host_to_global(b, mesh) for b in itertools.islice(data.train_batches(
        "digits", per_process_batch_size=BATCH, seed=0, epoch=1, views=views), 3))
    new_eval = _host(_feed("tfdata").eval())
    old_eval = _host(host_to_global(b, mesh) for b in data.eval_batches(
        "digits", per_process_batch_size=EVAL_BATCH))
    assert len(new) == 3 and len(new_eval) == len(old_eval) == 3
    assert not new_eval[-1]["mask"].all()  # the padded last batch is compared too
    for a, b in zip(new + new_eval, old + old_eval):
        assert set(a) == set(b)
        for key in a:
            assert a[key].dtype == b[key].dtype
            np.testing.assert_array_equal(a[key], b[key])
    info = data.info("digits")
    both = data.normalize_batch({"image": raw["image"], "image_strong": raw["image"]},
                                mean=info.mean, std=info.std)
    for key in ("image", "image_strong"):
        np.testing.assert_array_equal(np.asarray(both[key]), old[0]["image"])


def test_prefetch_keeps_two_batches_in_flight_in_order():
    from zkd_jax.parallel import prefetch_to_mesh

    pulled = []

    def source():
        for i in range(5):
            pulled.append(i)
            yield {"x": np.full((2,), i, np.uint8)}

    it = prefetch_to_mesh(source(), create_mesh(), size=2)
    assert int(next(it)["x"][0]) == 0 and pulled == [0, 1]  # batch 1 already on its way
    assert [int(b["x"][0]) for b in it] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="size=0 must be >= 1"):
        next(prefetch_to_mesh(source(), create_mesh(), size=0))


@pytest.mark.parametrize("pipeline", feed_lib.PIPELINES)
def test_train_examples_caps_the_split_to_its_first_images(pipeline):
    """config.train_examples = 5 * BATCH: an epoch is 5 batches that hold each of the split's first
    5 * BATCH labels once (their multiset), and nothing else."""
    def feed(cap):
        return feed_lib.make_feed(pipeline, dataset="digits", mesh=create_mesh(), seed=0,
                                  views=("weak",), batch_size=BATCH, eval_batch_size=EVAL_BATCH,
                                  train_examples=cap)

    epoch = _host(feed(5 * BATCH).train(1, 0))
    assert len(epoch) == 5 and data.steps_per_epoch("digits", BATCH, 5 * BATCH) == 5
    _, labels = data.load_device_arrays("digits", "train")
    got = np.sort(np.concatenate([b["label"] for b in epoch]))
    np.testing.assert_array_equal(got, np.sort(labels[:5 * BATCH]))
    assert len(_host(itertools.islice(feed(-1).train(1, 0), 6))) == 6  # -1: the whole split
    with pytest.raises(ValueError, match=r"config.train_examples=1501 exceeds the 1500 training "):
        feed(1501)


def test_device_feed_is_deterministic_and_restartable():
    feed = _feed("device")
    epoch = _host(itertools.islice(feed.train(2, 0), 6))
    again = _host(itertools.islice(_feed("device").train(2, 0), 6))
    restarted = _host(itertools.islice(feed.train(2, 4), 2))
    for a, b in zip(epoch, again):
        np.testing.assert_array_equal(a["image"], b["image"])
    for a, b in zip(epoch[4:], restarted):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    other_epoch = _host(itertools.islice(feed.train(3, 0), 1))[0]
    other_seed = _host(itertools.islice(_feed("device", seed=1).train(2, 0), 1))[0]
    assert not np.array_equal(other_epoch["label"], epoch[0]["label"])
    assert not np.array_equal(other_seed["label"], epoch[0]["label"])


def test_a_device_epoch_is_a_tfdata_epoch_in_distribution():
    """Every example once (1500 digits // 100), and per class the same mean augmented image."""
    epochs = {}
    for pipeline in feed_lib.PIPELINES:
        batches = _host(_feed(pipeline, batch=100).train(1, 0))
        epochs[pipeline] = tuple(np.concatenate([b[k] for b in batches]) for k in ("image", "label"))
    (x, y), (x_ref, y_ref) = epochs["device"], epochs["tfdata"]
    assert y.shape == (1500,)
    np.testing.assert_array_equal(np.bincount(y, minlength=10), np.bincount(y_ref, minlength=10))
    for c in range(10):  # what sets class c apart from the average image, in both epochs
        ours, ref = x[y == c].mean(0) - x.mean(0), x_ref[y_ref == c].mean(0) - x_ref.mean(0)
        corr = np.corrcoef(ours.ravel(), ref.ravel())[0, 1]
        assert corr > 0.7, (c, corr)  # measured >= 0.81; a label shift gives <= 0.54


def test_device_eval_batches_equal_tfdata_and_so_do_the_metrics():
    device_batches = _host(_feed("device").eval())
    host_batches = _host(_feed("tfdata").eval())
    assert len(device_batches) == len(host_batches)
    for a, b in zip(device_batches, host_batches):
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(a[key], b[key].astype(a[key].dtype))
    model = models.create("resnet8", num_classes=10, dataset="cifar100")
    variables = init_variables(model, jax.random.PRNGKey(0), (1, 32, 32, 3))
    eval_step = step.make_eval_step(model, create_mesh())
    assert evaluate(eval_step, variables, _feed("device")) == evaluate(
        eval_step, variables, _feed("tfdata"))


def test_synthetic_cifar100_has_cifar100_shapes_on_both_feeds():
    from zkd_jax import data

    info = data.info("synthetic_cifar100")
    assert (info.num_classes, info.num_train, info.num_test) == (100, 50_000, 10_000)
    assert data.steps_per_epoch("synthetic_cifar100", 64) == 781
    for pipeline in feed_lib.PIPELINES:
        batch = next(_feed(pipeline, dataset="synthetic_cifar100").train(1, 0))
        assert batch["image"].shape == (BATCH, 32, 32, 3) and batch["image"].dtype == np.float32
        assert 0 <= int(np.min(batch["label"])) and int(np.max(batch["label"])) < 100


def test_errors_say_what_to_set():
    with pytest.raises(ValueError, match="input_pipeline='nvme' is unknown; choose one of"):
        _feed("nvme")
    with pytest.raises(ValueError, match="set config.input_pipeline='tfdata'"):
        _feed("device", views=("weak", "strong"))
    with pytest.raises(ValueError, match="small splits only.*'imagenet2012'; set config.input_pipeline='tfdata'"):
        _feed("device", dataset="imagenet2012")
    with pytest.raises(ValueError, match="config.batch_size=0 is not divisible"):
        _feed("device", batch=0)


def test_a_run_on_the_device_feed_resumes_bit_identically(tmp_path):
    from zkd_jax.configs import demo

    def config(max_steps):
        c = demo.teacher_config()  # cross-entropy only: the run is about the feed
        c.input_pipeline = "device"
        c.student.arch = "resnet8"
        c.batch_size = BATCH // 2
        c.train_examples = 11 * BATCH // 2  # 11 steps per epoch
        c.epochs = 2
        c.optimizer.milestones = ()
        c.max_steps = max_steps
        c.log_every_steps = 5
        c.progress_bar = False
        c.export = False
        return c

    straight = train_and_evaluate(config(15), tmp_path / "straight")
    train_and_evaluate(config(4), tmp_path / "resumed")  # stops inside epoch 1
    resumed = train_and_evaluate(config(15), tmp_path / "resumed")  # on into epoch 2
    assert straight["step"] == resumed["step"] == 15
    assert straight["last_top1"] == resumed["last_top1"]
    from zkd_jax.io import checkpoint

    leaves = []
    for name in ("straight", "resumed"):
        ckpt = checkpoint.Checkpointer(tmp_path / name)
        leaves.append(jax.tree.leaves(ckpt.last.restore(ckpt.latest_step())["state"]))
        ckpt.close()
    for a, b in zip(*leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
