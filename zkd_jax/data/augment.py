"""TensorFlow image ops of the tf.data pipelines: CIFAR crop/flip, normalization, RandAugment, Cutout.

Every function here needs TensorFlow (imported lazily on first use through ``tfds_source.tf``).
Images are uint8 NHWC; random parameters come in as uniform [0, 1) arrays drawn by the caller from
stateless seeds, so each op is a pure function of its inputs.

RandAugment follows the MLKD reference's PIL implementation: two ops drawn
uniformly, with replacement, from the 14 below; each op's magnitude is drawn uniformly in its range:

==============  ===============  ======================================================
op              magnitude range  PIL semantics reproduced
==============  ===============  ======================================================
AutoContrast    (unused)         per channel: (x - min) * 255 / (max - min), truncated
Brightness      0.05 .. 0.95     blend(black, x, v)
Color           0.05 .. 0.95     blend(gray(x), x, v), gray = (19595R+38470G+7471B+2^15)>>16
Contrast        0.05 .. 0.95     blend(round(mean(gray(x))), x, v)
Equalize        (unused)         per-channel histogram equalization, PIL's LUT rule
Identity        (unused)         x
Posterize       4 .. 8           keep the top int(v) bits
Rotate          -30 .. 30        degrees counter-clockwise about the centre, nearest, black fill
Sharpness       0.05 .. 0.95     blend(smooth3x3(x) [1 1 1; 1 5 1; 1 1 1]/13, border kept, x, v)
ShearX          -0.3 .. 0.3      input (x + v*y, y), nearest, black fill
ShearY          -0.3 .. 0.3      input (x, y + v*x)
Solarize        0 .. 256         x if x < v else 255 - x
TranslateX      -0.3 .. 0.3      input (x + v*width, y)
TranslateY      -0.3 .. 0.3      input (x, y + v*height)
==============  ===============  ======================================================

``blend(d, x, v) = floor(d + v * (x - d))`` clipped to [0, 255] (PIL's ``Image.blend``). Geometric
ops sample PIL's way: output pixel (i, j) reads input ``floor(A @ (i + 0.5, j + 0.5))`` and black
outside. Then Cutout: a square of side ``s = U(0, 0.5) * width`` around a uniform centre, filled
with gray (125, 123, 114), PIL-rectangle style (both corners inclusive). Bit-exactness with Pillow
is not claimed (e.g. float32 vs float64 rounding at exact integer boundaries), the semantics are.
"""

from __future__ import annotations

import math

from zkd_jax.data import normalization
from zkd_jax.data.tfds_source import tf

CIFAR_PAD = 4
CUTOUT_FILL = (125, 123, 114)
RANDAUG_NUM_OPS = 2

# (name, low, high): the magnitude is low + (high - low) * U[0, 1).
RANDAUG_OPS: tuple[tuple[str, float, float], ...] = (
    ("AutoContrast", 0.0, 1.0),
    ("Brightness", 0.05, 0.95),
    ("Color", 0.05, 0.95),
    ("Contrast", 0.05, 0.95),
    ("Equalize", 0.0, 1.0),
    ("Identity", 0.0, 1.0),
    ("Posterize", 4.0, 8.0),
    ("Rotate", -30.0, 30.0),
    ("Sharpness", 0.05, 0.95),
    ("ShearX", -0.3, 0.3),
    ("ShearY", -0.3, 0.3),
    ("Solarize", 0.0, 256.0),
    ("TranslateX", -0.3, 0.3),
    ("TranslateY", -0.3, 0.3),
)
# Uniform draws the strong view consumes per image: crop/flip (3), 2 x (op, magnitude), cutout (3).
CROP_FLIP_DRAWS = 3
RANDAUG_DRAWS = 2 * RANDAUG_NUM_OPS
CUTOUT_DRAWS = 3
STRONG_DRAWS = CROP_FLIP_DRAWS + RANDAUG_DRAWS + CUTOUT_DRAWS


# ----------------------------------------------------------------------------- normalization
def normalize(images, mean, std):
    """``(float32(x) / 255 - mean) / std`` per channel; uint8 [..., 3] -> float32 [..., 3].

    Looked up in ``normalization.table`` (the on-device path reads the same table), so both paths
    give identical images, equal to that float32 expression evaluated in NumPy.
    """
    lut = tf.constant(normalization.table(mean, std).T.reshape(-1))  # [3 * 256], channel-major
    return tf.gather(lut, tf.cast(images, tf.int32) + tf.constant([0, 256, 512]))


# ----------------------------------------------------------------------------- CIFAR crop + flip
def crop_flip_batch(images, u, pad: int = CIFAR_PAD):
    """Zero-pad ``pad`` pixels (uint8 space), random HxW crop, horizontal flip with probability 0.5.

    images: uint8 [n, H, W, 3]; u: float32 [n, 3] uniform: (row offset, column offset, flip).
    Offsets are ``floor(u * (2 * pad + 1))`` in 0..2*pad (torchvision ``RandomCrop(padding=4)``).
    """
    h, w = images.shape[1], images.shape[2]
    span = 2 * pad + 1
    oy = tf.minimum(tf.cast(u[:, 0] * span, tf.int32), span - 1)
    ox = tf.minimum(tf.cast(u[:, 1] * span, tf.int32), span - 1)
    flip = u[:, 2] < 0.5
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    rows = oy[:, None] + tf.range(h)[None, :]
    cols = ox[:, None] + tf.where(flip[:, None], tf.range(w - 1, -1, -1)[None, :], tf.range(w)[None, :])
    out = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(out, cols, axis=2, batch_dims=1)


# ----------------------------------------------------------------------------- RandAugment ops
def _bcast(v):
    return tf.cast(v, tf.float32)[:, None, None, None]


def _blend(degenerate, image, factor):
    """PIL ``Image.blend(degenerate, image, factor)``: floor(d + f (x - d)) clipped; float in, uint8 out."""
    out = degenerate + _bcast(factor) * (image - degenerate)
    return tf.cast(tf.clip_by_value(tf.floor(out), 0.0, 255.0), tf.uint8)


def _gray(x):
    """PIL ``convert('L')``: (19595 R + 38470 G + 7471 B + 32768) >> 16, int32 [n, H, W, 1]."""
    xi = tf.cast(x, tf.int32)
    g = xi[..., 0:1] * 19595 + xi[..., 1:2] * 38470 + xi[..., 2:3] * 7471 + 32768
    return tf.bitwise.right_shift(g, 16)


def auto_contrast(x, v):
    del v
    xf = tf.cast(x, tf.float32)
    lo = tf.reduce_min(xf, axis=[1, 2], keepdims=True)
    hi = tf.reduce_max(xf, axis=[1, 2], keepdims=True)
    scale = 255.0 / tf.maximum(hi - lo, 1.0)
    out = tf.clip_by_value(tf.floor(xf * scale - lo * scale), 0.0, 255.0)
    return tf.cast(tf.where(hi > lo, out, xf), tf.uint8)


def brightness(x, v):
    xf = tf.cast(x, tf.float32)
    return _blend(tf.zeros_like(xf), xf, v)


def color(x, v):
    xf = tf.cast(x, tf.float32)
    return _blend(tf.cast(_gray(x), tf.float32) + tf.zeros_like(xf), xf, v)


def contrast(x, v):
    xf = tf.cast(x, tf.float32)
    mean = tf.reduce_mean(tf.cast(_gray(x), tf.float32), axis=[1, 2, 3], keepdims=True)
    return _blend(tf.floor(mean + 0.5) + tf.zeros_like(xf), xf, v)


def equalize(x, v):
    """PIL ``ImageOps.equalize`` per image and channel (one bincount for the whole batch)."""
    del v
    n, h, w = tf.shape(x)[0], x.shape[1], x.shape[2]
    flat = tf.reshape(tf.transpose(tf.cast(x, tf.int32), [0, 3, 1, 2]), [n * 3, h * w])
    offsets = tf.range(n * 3)[:, None] * 256
    hist = tf.math.bincount(
        tf.reshape(flat + offsets, [-1]), minlength=n * 3 * 256, maxlength=n * 3 * 256, dtype=tf.int32
    )
    hist = tf.reshape(hist, [n * 3, 256])
    last = tf.gather(hist, tf.reduce_max(flat, axis=1), batch_dims=1)  # count of the top value
    step = (h * w - last) // 255
    safe = tf.maximum(step, 1)[:, None]
    lut = (step[:, None] // 2 + tf.cumsum(hist, axis=1, exclusive=True)) // safe
    lut = tf.where(step[:, None] > 0, tf.clip_by_value(lut, 0, 255), tf.range(256)[None, :])
    out = tf.gather(lut, flat, batch_dims=1)
    return tf.cast(tf.transpose(tf.reshape(out, [n, 3, h, w]), [0, 2, 3, 1]), tf.uint8)


def identity(x, v):
    del v
    return x


def posterize(x, v):
    bits = tf.maximum(tf.cast(tf.floor(v), tf.int32), 1)
    d = tf.bitwise.left_shift(tf.ones_like(bits), 8 - bits)[:, None, None, None]
    xi = tf.cast(x, tf.int32)
    return tf.cast(xi // d * d, tf.uint8)


def solarize(x, v):
    xi = tf.cast(x, tf.int32)
    return tf.cast(tf.where(tf.cast(xi, tf.float32) < _bcast(v), xi, 255 - xi), tf.uint8)


def _sharp_smooth(xf):
    """PIL ``ImageFilter.SMOOTH`` ([1 1 1; 1 5 1; 1 1 1] / 13, truncated), border pixels kept."""
    h, w = xf.shape[1], xf.shape[2]
    total = 4.0 * xf[:, 1 : h - 1, 1 : w - 1]
    for dy in range(3):
        for dx in range(3):
            total += xf[:, dy : dy + h - 2, dx : dx + w - 2]
    inner = tf.clip_by_value(tf.floor(total / 13.0), 0.0, 255.0)
    padded = tf.pad(inner, [[0, 0], [1, 1], [1, 1], [0, 0]])
    border = tf.pad(tf.zeros([h - 2, w - 2, 1]), [[1, 1], [1, 1], [0, 0]], constant_values=1.0)
    return tf.where(border[None] > 0, xf, padded)


def sharpness(x, v):
    xf = tf.cast(x, tf.float32)
    return _blend(_sharp_smooth(xf), xf, v)


def pil_affine(x, a, b, c, d, e, f):
    """PIL ``Image.transform(AFFINE, (a..f), NEAREST)`` on a batch; each coefficient float32 [n].

    Output pixel (i, j) = input (floor(a(i+.5) + b(j+.5) + c), floor(d(i+.5) + e(j+.5) + f)),
    zero outside. TF's NEAREST rounds its mapped coordinate, hence the shifted offsets below.
    """
    zeros = tf.zeros_like(a)
    t = tf.stack(
        [a, b, c + 0.5 * (a + b) - 0.5, d, e, f + 0.5 * (d + e) - 0.5, zeros, zeros], axis=1
    )
    h, w = x.shape[1], x.shape[2]
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=x,
        transforms=tf.cast(t, tf.float32),
        output_shape=tf.constant([h, w], tf.int32),
        fill_value=tf.constant(0.0, tf.float32),
        interpolation="NEAREST",
        fill_mode="CONSTANT",
    )


def rotate(x, v):
    """PIL ``img.rotate(v)``: v degrees counter-clockwise about (W/2, H/2)."""
    h, w = float(x.shape[1]), float(x.shape[2])
    ang = -tf.cast(v, tf.float32) * (math.pi / 180.0)
    cs, sn = tf.cos(ang), tf.sin(ang)
    cx, cy = w / 2.0, h / 2.0
    c = cs * (-cx) + sn * (-cy) + cx
    f = -sn * (-cx) + cs * (-cy) + cy
    return pil_affine(x, cs, sn, c, -sn, cs, f)


def _affine_coeffs(v):
    v = tf.cast(v, tf.float32)
    return v, tf.ones_like(v), tf.zeros_like(v)


def shear_x(x, v):
    v, one, zero = _affine_coeffs(v)
    return pil_affine(x, one, v, zero, zero, one, zero)


def shear_y(x, v):
    v, one, zero = _affine_coeffs(v)
    return pil_affine(x, one, zero, zero, v, one, zero)


def translate_x(x, v):
    v, one, zero = _affine_coeffs(v)
    return pil_affine(x, one, zero, v * float(x.shape[2]), zero, one, zero)


def translate_y(x, v):
    v, one, zero = _affine_coeffs(v)
    return pil_affine(x, one, zero, zero, zero, one, v * float(x.shape[1]))


_OP_FNS = {
    "AutoContrast": auto_contrast,
    "Brightness": brightness,
    "Color": color,
    "Contrast": contrast,
    "Equalize": equalize,
    "Identity": identity,
    "Posterize": posterize,
    "Rotate": rotate,
    "Sharpness": sharpness,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "Solarize": solarize,
    "TranslateX": translate_x,
    "TranslateY": translate_y,
}


def apply_op(name: str, x, v):
    """One named RandAugment op on uint8 [n, H, W, 3] with magnitudes float32 [n]."""
    return _OP_FNS[name](x, v)


def _op_and_magnitude(u_op, u_mag):
    idx = tf.minimum(tf.cast(u_op * len(RANDAUG_OPS), tf.int32), len(RANDAUG_OPS) - 1)
    lows = tf.constant([lo for _, lo, _ in RANDAUG_OPS], tf.float32)
    highs = tf.constant([hi for _, _, hi in RANDAUG_OPS], tf.float32)
    mag = tf.gather(lows, idx) + (tf.gather(highs, idx) - tf.gather(lows, idx)) * u_mag
    return idx, mag


def rand_augment_batch(x, u):
    """RandAugment(2 ops) on uint8 [n, H, W, 3]; u float32 [n, 4] = (op, magnitude) x 2.

    Vectorized: each slot partitions the batch by drawn op (``tf.dynamic_partition``), runs each op
    once on the images that drew it, and stitches the results back in order, so every image is
    processed by exactly its two ops.
    """
    num = len(RANDAUG_OPS)
    positions = tf.range(tf.shape(x)[0])
    for slot in range(RANDAUG_NUM_OPS):
        idx, mag = _op_and_magnitude(u[:, 2 * slot], u[:, 2 * slot + 1])
        xs = tf.dynamic_partition(x, idx, num)
        ms = tf.dynamic_partition(mag, idx, num)
        ps = tf.dynamic_partition(positions, idx, num)
        outs = [_OP_FNS[name](xs[k], ms[k]) for k, (name, _, _) in enumerate(RANDAUG_OPS)]
        x = tf.ensure_shape(tf.dynamic_stitch(ps, outs), x.shape)
    return x


def rand_augment_image(x, u):
    """RandAugment(2 ops) on ONE uint8 image [H, W, 3]; u float32 [4]; per-image op dispatch."""
    for slot in range(RANDAUG_NUM_OPS):
        idx, mag = _op_and_magnitude(u[2 * slot : 2 * slot + 1], u[2 * slot + 1 : 2 * slot + 2])
        xb = x[None]
        branches = [
            (lambda fn=_OP_FNS[name]: fn(xb, mag)[0]) for name, _, _ in RANDAUG_OPS
        ]
        x = tf.switch_case(idx[0], branches)
        x = tf.ensure_shape(x, xb.shape[1:])
    return x


def cutout(x, u):
    """Cutout on uint8 [n, H, W, 3]; u float32 [n, 3] = (size, centre x, centre y) uniforms.

    Side ``v = 0.5 * u0 * W``; ``x0 = int(max(0, u1 W - v/2))``, ``x1 = min(W, x0 + v)`` (same for y);
    pixels with ``x0 <= col <= int(x1)`` and ``y0 <= row <= int(y1)`` become (125, 123, 114).
    """
    h, w = x.shape[1], x.shape[2]
    v = u[:, 0] * 0.5 * float(w)
    x0 = tf.floor(tf.maximum(0.0, u[:, 1] * float(w) - v / 2.0))
    y0 = tf.floor(tf.maximum(0.0, u[:, 2] * float(h) - v / 2.0))
    x1 = tf.floor(tf.minimum(float(w), x0 + v))
    y1 = tf.floor(tf.minimum(float(h), y0 + v))
    cols = tf.range(w, dtype=tf.float32)[None, :]
    rows = tf.range(h, dtype=tf.float32)[None, :]
    in_x = (cols >= x0[:, None]) & (cols <= x1[:, None]) & (v[:, None] > 0)
    in_y = (rows >= y0[:, None]) & (rows <= y1[:, None])
    mask = in_y[:, :, None, None] & in_x[:, None, :, None]
    fill = tf.constant(CUTOUT_FILL, tf.uint8)[None, None, None, :]
    return tf.where(mask, fill, x)


def strong_view_batch(images, u):
    """MLKD's strong view of uint8 [n, 32, 32, 3]: crop/flip, RandAugment(2), Cutout; u [n, 10]."""
    x = crop_flip_batch(images, u[:, :CROP_FLIP_DRAWS])
    x = rand_augment_batch(x, u[:, CROP_FLIP_DRAWS : CROP_FLIP_DRAWS + RANDAUG_DRAWS])
    return cutout(x, u[:, CROP_FLIP_DRAWS + RANDAUG_DRAWS :])
