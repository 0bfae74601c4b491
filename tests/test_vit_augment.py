"""The ViT students' tf.data transforms (``zkd_jax.data.vit_augment``): Pillow-exact resizing,
and the statistics of RandomResizedCrop, RandAugment and RandomErasing over many draws."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from zkd_jax.data import normalization, vit_augment as va
from zkd_jax.data.tfds_source import tf

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
N = 20000


def test_eval_view_is_pil_resize_then_normalize():
    got = va.eval_view_batch(tf.constant(IMAGES)).numpy()
    table = normalization.table(va.IMAGENET_MEAN, va.IMAGENET_STD)
    for img, out in zip(IMAGES, got, strict=True):
        pil = np.asarray(Image.fromarray(img).resize((224, 224), Image.BILINEAR))
        np.testing.assert_array_equal(out, table[pil, np.arange(3)])


@pytest.mark.parametrize("box", [(0, 0, 32, 32), (5, 3, 17, 11), (20, 9, 4, 23)])
def test_resized_crop_is_pil_bicubic(box):
    top, left, h, w = box
    col = lambda v: tf.constant([v] * len(IMAGES), tf.int32)  # noqa: E731
    got = va.resized_crop_batch(tf.constant(IMAGES), col(top), col(left), col(h), col(w)).numpy()
    for img, out in zip(IMAGES, got, strict=True):
        pil = Image.fromarray(img).crop((left, top, left + w, top + h))
        np.testing.assert_array_equal(out, np.asarray(pil.resize((224, 224), Image.BICUBIC)))


def test_random_resized_crop_boxes():
    u = tf.constant(RNG.random((N, va.RRC_DRAWS - 1), dtype=np.float32))
    top, left, h, w = (t.numpy() for t in va.rrc_boxes(u, 32, 32))
    assert np.all((h >= 1) & (w >= 1) & (top >= 0) & (left >= 0))
    assert np.all((top + h <= 32) & (left + w <= 32))
    area = h * w / 1024.0
    assert area.min() >= 0.05 and area.max() <= 1.0  # scale (0.08, 1) up to rounding
    ratio = w / h
    assert ratio.min() >= 0.6 and ratio.max() <= 1.6
    # torchvision's loop, written out on the same draws (float64 here: a box may differ where a
    # value rounds across .5 between float32 and float64; allow a handful)
    un = u.numpy().astype(np.float64).reshape(N, 10, 4)
    want = np.zeros((N, 4))
    for i in range(N):
        want[i] = (0, 0, 32, 32)
        for s, r, ti, li in un[i]:
            target = 1024 * (0.08 + 0.92 * s)
            ar = np.exp(np.log(3 / 4) + (np.log(4 / 3) - np.log(3 / 4)) * r)
            cw, ch = round(np.sqrt(target * ar)), round(np.sqrt(target / ar))
            if 0 < cw <= 32 and 0 < ch <= 32:
                want[i] = (int(ti * (33 - ch)), int(li * (33 - cw)), ch, cw)
                break
    same = np.all(np.stack([top, left, h, w], 1) == want, axis=1)
    assert same.mean() > 0.999


def test_rand_augment_op_frequencies_and_magnitudes():
    u = tf.constant(RNG.random((N, va.RANDAUG_DRAWS), dtype=np.float32))
    ops, levels = (t.numpy() for t in va.rand_augment_plan(u))
    applied = ops >= 0
    assert abs(applied.mean() - 0.5) < 0.01
    freq = np.bincount(ops[applied], minlength=15) / ops.size
    np.testing.assert_allclose(freq, 0.5 / 15, atol=0.004)  # each op, each slot
    m = np.abs(levels[applied]) * 10
    assert abs(m.mean() - 9.0) < 0.02 and abs(m.std() - 0.5) < 0.02 and m.max() <= 10.0
    signed = np.isin(ops, [va.RANDAUG_OPS.index(n) for n in va._SIGNED])
    assert abs(np.mean(levels[signed] < 0) - 0.5) < 0.02
    assert np.all(levels[applied & ~signed] >= 0)


def test_every_rand_augment_op_runs():
    x = tf.constant(np.repeat(IMAGES[:1], 4, axis=0))
    for name, fn in va._OPS.items():
        out = fn(x, tf.constant([0.9, -0.9, 0.5, 0.0], tf.float32))
        assert out.shape == x.shape and out.dtype == tf.uint8, name
    inverted = va._OPS["Invert"](x, tf.zeros([4]))
    np.testing.assert_array_equal(inverted.numpy(), 255 - x.numpy())


def test_random_erasing_statistics():
    u = tf.constant(RNG.random((N, va.ERASE_DRAWS), dtype=np.float32))
    apply, top, left, eh, ew = (t.numpy() for t in va.erase_boxes(u, 224, 224))
    assert abs(apply.mean() - 0.25) < 0.015
    area = (eh * ew / 224.0**2)[apply]
    assert area.min() >= 0.019 and area.max() <= 0.34
    aspect = (eh / ew)[apply]
    assert aspect.min() >= 0.28 and aspect.max() <= 1 / 0.28
    assert np.all((top + eh <= 224) & (left + ew <= 224))
    x = tf.zeros([2, 224, 224, 3])
    noise = tf.ones([2, 224, 224, 3])
    out = va.random_erasing(x, u[:2], noise).numpy()
    for i in range(2):
        expected = eh[i] * ew[i] * 3 if apply[i] else 0
        assert out[i].sum() == expected


def test_train_view_shapes_and_determinism():
    seed = tf.constant([1, 2], tf.int32)
    a = va.train_view_from_seed(tf.constant(IMAGES), seed).numpy()
    b = va.train_view_from_seed(tf.constant(IMAGES), seed).numpy()
    assert a.shape == (3, 224, 224, 3) and a.dtype == np.float32
    assert np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)
