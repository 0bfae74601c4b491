"""RandAugment / Cutout TF ops against NumPy statements of the PIL semantics they reproduce."""

from __future__ import annotations

import math

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from zkd_jax.data import augment  # noqa: E402

RNG = np.random.default_rng(0)
X = RNG.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)


def _op(name, x, v):
    return augment.apply_op(name, tf.constant(x), tf.constant(np.asarray(v, np.float32))).numpy()


def _pil_affine_ref(img, m):
    """PIL AFFINE + NEAREST: out(i, j) = in(floor(a(i+.5)+b(j+.5)+c), floor(d(i+.5)+e(j+.5)+f)), 0 outside."""
    a, b, c, d, e, f = m
    h, w, _ = img.shape
    jj, ii = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    xin = a * ii + b * jj + c
    yin = d * ii + e * jj + f
    ok = (xin >= 0) & (yin >= 0) & (xin < w) & (yin < h)
    xi = np.clip(np.floor(xin).astype(int), 0, w - 1)
    yi = np.clip(np.floor(yin).astype(int), 0, h - 1)
    return np.where(ok[..., None], img[yi, xi], 0).astype(np.uint8)


def _rotate_matrix(deg, w, h):
    ang = -math.radians(deg)
    cs, sn = round(math.cos(ang), 15), round(math.sin(ang), 15)
    cx, cy = w / 2, h / 2
    return (cs, sn, cs * -cx + sn * -cy + cx, -sn, cs, -sn * -cx + cs * -cy + cy)


@pytest.mark.parametrize("name", ["ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"])
def test_geometric_ops_sample_like_pil(name):
    lo, hi = {n: (a, b) for n, a, b in augment.RANDAUG_OPS}[name]
    v = RNG.uniform(lo, hi, X.shape[0])
    out = _op(name, X, v)
    for k, vk in enumerate(v):
        m = {
            "ShearX": (1, vk, 0, 0, 1, 0),
            "ShearY": (1, 0, 0, vk, 1, 0),
            "TranslateX": (1, 0, vk * 32, 0, 1, 0),
            "TranslateY": (1, 0, 0, 0, 1, vk * 32),
            "Rotate": _rotate_matrix(vk, 32, 32),
        }[name]
        ref = _pil_affine_ref(X[k], m)
        # Float32 vs float64 coordinates may flip a pixel sitting exactly on a boundary.
        assert np.mean(np.any(ref != out[k], axis=-1)) < 0.005, name


def _equalize_ref(img):
    out = img.copy()
    for c in range(3):
        h = np.bincount(img[..., c].ravel(), minlength=256)
        histo = h[h > 0]
        step = (histo.sum() - histo[-1]) // 255 if len(histo) > 1 else 0
        if step:
            n = step // 2
            lut = []
            for i in range(256):
                lut.append(min(255, n // step))
                n += h[i]
            out[..., c] = np.asarray(lut)[img[..., c]]
    return out


def test_equalize_and_autocontrast():
    x = RNG.integers(20, 90, (4, 32, 32, 3)).astype(np.uint8)
    x[1, ..., 2] = 77  # a constant channel stays as it is
    eq = _op("Equalize", x, np.zeros(4))
    for k in range(4):
        np.testing.assert_array_equal(eq[k], _equalize_ref(x[k]))
    ac = _op("AutoContrast", x, np.zeros(4)).astype(int)
    assert np.all(ac[[0, 2, 3]].min(axis=(1, 2)) == 0) and np.all(ac[[0, 2, 3]].max(axis=(1, 2)) == 255)
    np.testing.assert_array_equal(ac[1, ..., 2], 77)
    lo, hi = x[0, ..., 0].min(), x[0, ..., 0].max()
    want = np.floor((x[0, ..., 0].astype(np.float64) - lo) * 255.0 / (hi - lo))
    assert np.max(np.abs(ac[0, ..., 0] - want)) <= 1


def test_pointwise_ops():
    v = np.array([0.05, 0.3, 0.5, 0.7, 0.9, 0.95])
    xf = X.astype(np.float64)
    np.testing.assert_array_equal(_op("Identity", X, v), X)
    bright = _op("Brightness", X, v).astype(int)
    assert np.max(np.abs(bright - np.floor(xf * v[:, None, None, None]))) <= 1
    gray = (X[..., 0].astype(int) * 19595 + X[..., 1].astype(int) * 38470 + X[..., 2].astype(int) * 7471 + 32768) >> 16
    col = _op("Color", X, v).astype(int)
    want = np.floor(gray[..., None] + v[:, None, None, None] * (xf - gray[..., None]))
    assert np.max(np.abs(col - want)) <= 1
    mean = np.floor(gray.mean(axis=(1, 2)) + 0.5)[:, None, None, None]
    con = _op("Contrast", X, v).astype(int)
    assert np.max(np.abs(con - np.floor(mean + v[:, None, None, None] * (xf - mean)))) <= 1
    bits = np.array([4.0, 4.9, 5.5, 6.2, 7.0, 7.99])
    post = _op("Posterize", X, bits)
    for k, b in enumerate(bits):
        np.testing.assert_array_equal(post[k], X[k] & np.uint8((0xFF << (8 - int(b))) & 0xFF))
    thr = np.array([0.0, 64.0, 128.5, 200.0, 255.0, 256.0])
    sol = _op("Solarize", X, thr)
    np.testing.assert_array_equal(sol, np.where(X < thr[:, None, None, None], X, 255 - X))
    sharp = _op("Sharpness", X, v).astype(int)
    np.testing.assert_array_equal(sharp[:, 0], np.floor(xf[:, 0]).astype(int))  # border rows kept
    k = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13.0
    smooth = sum(k[dy, dx] * xf[:, dy : dy + 30, dx : dx + 30] for dy in range(3) for dx in range(3))
    inner = np.floor(np.floor(smooth) + v[:, None, None, None] * (xf[:, 1:31, 1:31] - np.floor(smooth)))
    assert np.max(np.abs(sharp[:, 1:31, 1:31] - inner)) <= 1


def test_cutout_fills_a_gray_square_of_at_most_half_the_side():
    u = RNG.uniform(size=(64, 3)).astype(np.float32)
    u[0] = [0.0, 0.5, 0.5]  # size 0: no cutout
    x = np.zeros((64, 32, 32, 3), np.uint8)
    out = augment.cutout(tf.constant(x), tf.constant(u)).numpy()
    np.testing.assert_array_equal(out[0], 0)
    for k in range(1, 64):
        filled = np.all(out[k] == augment.CUTOUT_FILL, axis=-1)
        rows, cols = np.flatnonzero(filled.any(1)), np.flatnonzero(filled.any(0))
        assert filled.sum() == len(rows) * len(cols)  # one rectangle
        side = u[k, 0] * 16
        assert len(rows) <= int(side) + 1 and len(cols) <= int(side) + 1
        # PIL rectangle [x0, x1] with both ends inclusive, x1 = min(W, x0 + side), clipped to the image.
        for got, centre in ((cols, u[k, 1]), (rows, u[k, 2])):
            start = int(max(0.0, centre * 32 - side / 2))
            end = min(int(min(32.0, start + side)), 31)
            np.testing.assert_array_equal(got, np.arange(start, end + 1))


def test_rand_augment_batch_equals_per_image_dispatch_and_covers_ops():
    u = tf.random.stateless_uniform([24, augment.RANDAUG_DRAWS], seed=[4, 2])
    x = tf.constant(RNG.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8))
    out = augment.rand_augment_batch(x, u).numpy()
    for k in range(24):
        np.testing.assert_array_equal(augment.rand_augment_image(x[k], u[k]).numpy(), out[k])
    idx, mag = augment._op_and_magnitude(tf.linspace(0.0, 0.9999, 140), tf.linspace(0.0, 0.9999, 140))
    assert sorted(set(idx.numpy().tolist())) == list(range(14))
    for (name, lo, hi), k in zip(augment.RANDAUG_OPS, range(14)):
        m = mag.numpy()[idx.numpy() == k]
        assert np.all(m >= lo) and np.all(m <= hi), name


def test_strong_view_keeps_uint8_and_changes_images():
    u = tf.random.stateless_uniform([16, augment.STRONG_DRAWS], seed=[1, 1])
    x = RNG.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    out = augment.strong_view_batch(tf.constant(x), u)
    assert out.dtype == tf.uint8 and out.shape == (16, 32, 32, 3)
    assert np.mean(np.any(out.numpy() != x, axis=(1, 2, 3))) > 0.9
