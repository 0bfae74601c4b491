"""On-device input path: purity, epoch semantics, and agreement with the tf.data path."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zkd_jax.data as zdata
from zkd_jax.data import device

INFO = zdata.info("cifar100")
MEAN, STD = INFO.mean, INFO.std


def _images(n, seed=0):
    """Random images whose channels have different distributions (so per-channel stats differ)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 32, 32, 3)).astype(np.float64)
    x *= np.array([1.0, 0.7, 0.4])
    return x.astype(np.uint8), rng.integers(0, 100, n).astype(np.int32)


def _jit_train(batch_size):
    return jax.jit(functools.partial(device.device_train_batch, batch_size=batch_size, mean=MEAN, std=STD))


def test_import_needs_no_tensorflow_and_digits_load_without_tf():
    images, labels = zdata.load_device_arrays("digits", "train")
    chex.assert_shape(images, (1500, 32, 32, 3))
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    with pytest.raises(ValueError, match="on-device"):
        zdata.load_device_arrays("imagenet2012", "train")


def test_epoch_covers_each_example_once_and_is_deterministic():
    images, labels = _images(200)
    labels = np.arange(200, dtype=np.int32)
    key = jax.random.key(0)
    step_fn = _jit_train(32)
    order = device.epoch_permutation(key, 3, 200)
    assert sorted(np.asarray(order).tolist()) == list(range(200))
    batches = [step_fn(images, labels, key, 3, s) for s in range(200 // 32)]
    seen = np.concatenate([np.asarray(b["label"]) for b in batches])
    assert len(set(seen.tolist())) == len(seen) == 192
    again = step_fn(images, labels, key, 3, 2)
    with_order = step_fn(images, labels, key, 3, 2, order=order)
    for k in ("image", "label"):
        np.testing.assert_array_equal(batches[2][k], again[k])
        np.testing.assert_array_equal(batches[2][k], with_order[k])
    other_epoch = step_fn(images, labels, key, 4, 2)
    assert not np.array_equal(batches[2]["label"], other_epoch["label"])
    chex.assert_shape(batches[0]["image"], (32, 32, 32, 3))
    chex.assert_type(batches[0]["image"], jnp.float32)
    chex.assert_type(batches[0]["label"], jnp.int32)


def test_device_crop_pads_zeros_and_flips_half_the_time():
    cols = 100 + np.arange(32, dtype=np.uint8)
    images = np.broadcast_to(cols[None, None, :, None], (1024, 32, 32, 3)).copy()
    labels = np.zeros(1024, np.int32)
    x = np.asarray(_jit_train(1024)(images, labels, jax.random.key(1), 1, 0)["image"])
    pad_value = (np.float32(0) / np.float32(255) - np.float32(MEAN)) / np.float32(STD)
    padded = np.all(x == pad_value, axis=-1)
    assert padded.any()
    kept_rows = (~padded).any(axis=2).sum(axis=1)
    assert kept_rows.min() == 28 and kept_rows.max() == 32
    first_row = np.array([x[k, np.flatnonzero(~padded[k].all(1))[0], :, 0] for k in range(1024)])
    flipped = []
    for k in range(1024):
        vals = first_row[k][~padded[k].all(0)]
        d = np.diff(vals)
        assert np.all(d > 0) or np.all(d < 0)
        flipped.append(d[0] < 0)
    assert abs(np.mean(flipped) - 0.5) < 0.06


def test_device_and_tf_paths_agree_in_statistics_and_eval_images():
    pytest.importorskip("tensorflow")
    from zkd_jax.data.cifar import array_eval_dataset, array_train_dataset

    n, b = 8192, 1024
    images, labels = _images(n, seed=3)
    tf_ds = array_train_dataset(
        images, labels, per_process_batch_size=b, seed=0, epoch=1, start_step=0, views=("weak",),
        mean=MEAN, std=STD, process_index=0, process_count=1,
    )
    tf_x = np.concatenate([batch["image"] for batch in tf_ds.as_numpy_iterator()])
    step_fn = _jit_train(b)
    dev_x = np.concatenate(
        [np.asarray(step_fn(images, labels, jax.random.key(5), 1, s)["image"]) for s in range(n // b)]
    )
    assert tf_x.shape == dev_x.shape == (n, 32, 32, 3)
    tf_mean, dev_mean = tf_x.mean(axis=(0, 1, 2)), dev_x.mean(axis=(0, 1, 2))
    tf_std, dev_std = tf_x.std(axis=(0, 1, 2)), dev_x.std(axis=(0, 1, 2))
    np.testing.assert_allclose(tf_mean, dev_mean, atol=1e-2)
    np.testing.assert_allclose(tf_std, dev_std, atol=1e-2)
    # Zero padding lowers the mean well beyond the tolerance, so agreement is informative.
    plain = ((images / 255.0 - np.array(MEAN)) / np.array(STD)).mean(axis=(0, 1, 2))
    assert np.all(np.abs(plain - tf_mean) > 0.05)

    small, small_labels = images[:300], labels[:300]
    tf_eval = list(
        array_eval_dataset(
            small, small_labels, per_process_batch_size=128, mean=MEAN, std=STD, process_index=0, process_count=1
        ).as_numpy_iterator()
    )
    eval_fn = jax.jit(functools.partial(device.device_eval_batch, batch_size=128, mean=MEAN, std=STD))
    assert len(tf_eval) == device.num_eval_batches(300, 128) == 3
    for i, want in enumerate(tf_eval):
        got = eval_fn(small, small_labels, i)
        for k in ("image", "label", "mask"):
            np.testing.assert_array_equal(np.asarray(got[k]), want[k])


def test_digits_eval_identical_through_public_entry_points():
    pytest.importorskip("tensorflow")
    images, labels = zdata.load_device_arrays("digits", "test")
    info = zdata.info("digits")
    tf_eval = list(zdata.eval_batches("digits", per_process_batch_size=100, process_index=0, process_count=1))
    for i, want in enumerate(tf_eval):
        got = device.device_eval_batch(images, labels, i, batch_size=100, mean=info.mean, std=info.std)
        for k in ("image", "label", "mask"):
            np.testing.assert_array_equal(np.asarray(got[k]), want[k])
