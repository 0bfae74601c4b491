"""tf.data ops of the ViT students' input (the reference's timm ``create_transform``).

Train: RandomResizedCrop 224 (scale 0.08-1, ratio 3/4-4/3, bicubic on the 32-px image), horizontal
flip 0.5, RandAugment ``rand-m9-mstd0.5-inc1``, ToTensor + Normalize (ImageNet mean/std),
RandomErasing p 0.25 (one box of 2-33 % of the area, aspect 0.3-3.3, per-pixel N(0, 1)). Test:
Resize (224, 224) bilinear to uint8, Normalize (:func:`eval_view_batch`).

TensorFlow is imported lazily (``tfds_source.tf``). Images are uint8 NHWC batches; random
parameters come in as uniform [0, 1) arrays drawn by the caller (:func:`train_view_batch` draws
them from a stateless seed), so each op is a pure function of its inputs.

Resizing reproduces Pillow's ``Image.resize`` (8-bit path): separable, horizontal pass first with
an 8-bit intermediate, filter taps normalised and quantised to 22-bit fixed point, rounding
``floor(sum + 1/2)`` clipped to [0, 255]; upsampling only (no antialias support needed), as every
resize here enlarges (crop <= 32 px -> 224). RandAugment (timm, ``inc1``): two ops drawn
uniformly with replacement from the 15 below, each applied with probability 0.5 at magnitude
``m ~ N(9, 0.5)`` clipped to [0, 10]; signed ops take a random sign:

=====================  =========================================
op                     at magnitude m (level m / 10)
=====================  =========================================
AutoContrast           per channel min-max stretch
Equalize               per channel histogram equalization
Invert                 255 - x
Rotate                 +-30 level degrees
PosterizeIncreasing    keep 4 - int(4 level) bits
SolarizeIncreasing     invert pixels >= 256 - int(256 level)
SolarizeAdd            + int(110 level) to pixels < 128
Color/Contrast/        enhance factor 1 +- 0.9 level
Brightness/Sharpness
ShearX, ShearY         +-0.3 level
TranslateXRel/YRel     +-0.45 level x the image size
=====================  =========================================

Geometric ops fill with timm's ``img_mean`` (124, 116, 104); they sample nearest-neighbour (timm
draws bilinear or bicubic at random: a documented difference).
"""

from __future__ import annotations

import math

from zkd_jax.data import augment
from zkd_jax.data.tfds_source import tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIZE = 224
FILL = (124, 116, 104)  # timm: round(255 * mean)
RRC_ATTEMPTS = 10
RRC_DRAWS = 4 * RRC_ATTEMPTS + 1  # 10 x (scale, ratio, top, left) + flip
RANDAUG_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
RANDAUG_NUM_OPS, RANDAUG_PROB, RANDAUG_M, RANDAUG_MSTD = 2, 0.5, 9.0, 0.5
RANDAUG_DRAWS = 4 * RANDAUG_NUM_OPS  # per slot: op, apply, magnitude, sign
ERASE_PROB, ERASE_AREA, ERASE_ASPECT = 0.25, (0.02, 1 / 3), 0.3
ERASE_DRAWS = 1 + 4 * RRC_ATTEMPTS
TRAIN_DRAWS = RRC_DRAWS + RANDAUG_DRAWS + ERASE_DRAWS
_PRECISION_BITS = 22


# ----------------------------------------------------------------------------- Pillow resize
def _filter(x, name: str):
    ax = tf.abs(x)
    if name == "bilinear":
        return tf.maximum(1.0 - ax, 0.0)
    a = -0.5  # Pillow's bicubic
    near = ((a + 2.0) * ax - (a + 3.0)) * ax * ax + 1.0
    far = ((ax - 5.0) * ax + 8.0) * ax * a - 4.0 * a
    return tf.where(ax < 1.0, near, tf.where(ax < 2.0, far, 0.0))


def _resize_weights(start, length, in_size: int, out_size: int, name: str):
    """float64 [n, out, in]: Pillow's quantised taps of resizing input pixels
    ``[start, start + length)`` (per image) to ``out_size`` (enlarging)."""
    support = 1.0 if name == "bilinear" else 2.0
    start = tf.cast(start, tf.float64)[:, None, None]
    length = tf.cast(length, tf.float64)[:, None, None]
    center = (tf.range(out_size, dtype=tf.float64)[None, :, None] + 0.5) * length / out_size
    j = tf.range(in_size, dtype=tf.float64)[None, None, :] - start  # index inside the crop
    xmin = tf.maximum(tf.floor(center - support + 0.5), 0.0)
    xmax = tf.minimum(tf.floor(center + support + 0.5), length)
    inside = (j >= xmin) & (j < xmax)
    k = tf.where(inside, _filter(j - center + 0.5, name), 0.0)
    k = k / tf.reduce_sum(k, axis=-1, keepdims=True)
    scaled = k * float(1 << _PRECISION_BITS)
    q = tf.where(scaled < 0, tf.math.ceil(scaled - 0.5), tf.floor(scaled + 0.5))  # C's (int)
    return q / float(1 << _PRECISION_BITS)


def _round8(x):
    return tf.clip_by_value(tf.floor(x + 0.5), 0.0, 255.0)


def resized_crop_batch(images, top, left, height, width, size: int = SIZE, name: str = "bicubic"):
    """``img.crop((left, top, left + width, top + height)).resize((size, size), name)`` per image.

    images uint8 [n, H, W, 3]; crop boxes int32 [n] each -> uint8 [n, size, size, 3].
    """
    h, w = images.shape[1], images.shape[2]
    wx = _resize_weights(left, width, w, size, name)
    wy = _resize_weights(top, height, h, size, name)
    x = tf.cast(images, tf.float64)
    x = _round8(tf.einsum("nhwc,nvw->nhvc", x, wx))  # horizontal pass, 8-bit intermediate
    x = _round8(tf.einsum("nhvc,nuh->nuvc", x, wy))
    return tf.cast(x, tf.uint8)


def eval_view_batch(images, size: int = SIZE):
    """Test transform: Resize (size, size) bilinear (uint8) then Normalize -> float32 NHWC."""
    n = tf.shape(images)[0]
    h, w = images.shape[1], images.shape[2]
    zeros = tf.zeros([n], tf.int32)
    x = resized_crop_batch(images, zeros, zeros, zeros + h, zeros + w, size, "bilinear")
    return augment.normalize(x, IMAGENET_MEAN, IMAGENET_STD)


# ----------------------------------------------------------------------------- RandomResizedCrop
def rrc_boxes(u, h: int, w: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's ``RandomResizedCrop.get_params``: the first of 10 attempts whose box fits,
    else the centre crop clamped to ``ratio``. u float32 [n, 40] -> (top, left, height, width)."""
    area = float(h * w)
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    u = tf.reshape(u, [-1, RRC_ATTEMPTS, 4])
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    aspect = tf.exp(lr0 + (lr1 - lr0) * u[..., 1])
    cw = tf.round(tf.sqrt(target * aspect))
    ch = tf.round(tf.sqrt(target / aspect))
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    top = tf.floor(u[..., 2] * (h - ch + 1.0))
    left = tf.floor(u[..., 3] * (w - cw + 1.0))
    first = tf.argmax(tf.cast(ok, tf.int32), axis=1, output_type=tf.int32)
    any_ok = tf.reduce_any(ok, axis=1)
    pick = lambda v: tf.cast(tf.gather(v, first, batch_dims=1), tf.int32)  # noqa: E731
    fw = w if w / h <= ratio[1] else int(round(h * ratio[1]))
    fh = h if w / h >= ratio[0] else int(round(w / ratio[0]))
    fallback = ((h - fh) // 2, (w - fw) // 2, fh, fw)
    return tuple(tf.where(any_ok, pick(v), fb)
                 for v, fb in zip((top, left, ch, cw), fallback, strict=True))


def flip_batch(images, u):
    """Horizontal flip where ``u < 0.5``."""
    return tf.where(u[:, None, None, None] < 0.5, tf.reverse(images, axis=[2]), images)


# ----------------------------------------------------------------------------- RandAugment (timm)
def _with_fill(fn):
    def op(x, v):
        moved = fn(x, v)
        covered = fn(tf.ones_like(x), v) > 0
        return tf.where(covered, moved, tf.constant(FILL, tf.uint8)[None, None, None, :])
    return op


def _enhance(fn):
    return lambda x, v: fn(x, 1.0 + v * 0.9)


def _invert(x, v):
    del v
    return 255 - x


def _posterize(x, v):
    bits = 4 - tf.cast(tf.floor(tf.abs(v) * 4.0), tf.int32)
    d = tf.bitwise.left_shift(tf.ones_like(bits), 8 - bits)[:, None, None, None]
    return tf.cast(tf.cast(x, tf.int32) // d * d, tf.uint8)


def _solarize(x, v):
    thresh = 256.0 - tf.floor(tf.abs(v) * 256.0)
    return augment.solarize(x, thresh)


def _solarize_add(x, v):
    add = tf.floor(tf.abs(v) * 110.0)[:, None, None, None]
    xi = tf.cast(x, tf.float32)
    return tf.cast(tf.where(xi < 128.0, tf.minimum(xi + add, 255.0), xi), tf.uint8)


# Each takes the signed level v = +-m / 10 (unsigned ops ignore the sign).
_OPS = {
    "AutoContrast": augment.auto_contrast,
    "Equalize": augment.equalize,
    "Invert": _invert,
    "Rotate": _with_fill(lambda x, v: augment.rotate(x, 30.0 * v)),
    "PosterizeIncreasing": _posterize,
    "SolarizeIncreasing": _solarize,
    "SolarizeAdd": _solarize_add,
    "ColorIncreasing": _enhance(augment.color),
    "ContrastIncreasing": _enhance(augment.contrast),
    "BrightnessIncreasing": _enhance(augment.brightness),
    "SharpnessIncreasing": _enhance(augment.sharpness),
    "ShearX": _with_fill(lambda x, v: augment.shear_x(x, 0.3 * v)),
    "ShearY": _with_fill(lambda x, v: augment.shear_y(x, 0.3 * v)),
    "TranslateXRel": _with_fill(lambda x, v: augment.translate_x(x, 0.45 * v)),
    "TranslateYRel": _with_fill(lambda x, v: augment.translate_y(x, 0.45 * v)),
}
_SIGNED = {"Rotate", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
           "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}


def rand_augment_plan(u):
    """u float32 [n, 8] -> (op [n, 2] int32, with -1 where the op is not applied; level [n, 2]
    = sign * clip(N(9, 0.5), 0, 10) / 10, the normal drawn as ``ndtri(u)``)."""
    u = tf.reshape(u, [-1, RANDAUG_NUM_OPS, 4])
    num = len(RANDAUG_OPS)
    op = tf.minimum(tf.cast(u[..., 0] * num, tf.int32), num - 1)
    op = tf.where(u[..., 1] < RANDAUG_PROB, op, -1)
    z = tf.math.ndtri(tf.clip_by_value(u[..., 2], 1e-7, 1.0 - 1e-7))
    m = tf.clip_by_value(RANDAUG_M + RANDAUG_MSTD * z, 0.0, 10.0)
    signed = tf.constant([name in _SIGNED for name in RANDAUG_OPS])
    negative = (u[..., 3] < 0.5) & tf.gather(signed, tf.maximum(op, 0))
    return op, tf.where(negative, -m, m) / 10.0


def rand_augment_batch(x, u):
    """timm's RandAugment ``rand-m9-mstd0.5-inc1`` on uint8 [n, H, W, 3]; u float32 [n, 8]."""
    ops, levels = rand_augment_plan(u)
    num = len(RANDAUG_OPS)
    positions = tf.range(tf.shape(x)[0])
    for slot in range(RANDAUG_NUM_OPS):
        idx = tf.where(ops[:, slot] < 0, num, ops[:, slot])  # partition `num`: not applied
        xs = tf.dynamic_partition(x, idx, num + 1)
        vs = tf.dynamic_partition(levels[:, slot], idx, num + 1)
        ps = tf.dynamic_partition(positions, idx, num + 1)
        outs = [_OPS[name](xs[k], vs[k]) for k, name in enumerate(RANDAUG_OPS)] + [xs[num]]
        x = tf.ensure_shape(tf.dynamic_stitch(ps, outs), x.shape)
    return x


# ----------------------------------------------------------------------------- RandomErasing
def erase_boxes(u, h: int, w: int):
    """timm's RandomErasing box: u float32 [n, 41] -> (apply bool, top, left, eh, ew) [n].

    Applied with probability 0.25 (u[:, 0]); the first of 10 attempts with area ``U(2 %, 33 %)``
    of the image and log-uniform aspect in (0.3, 1 / 0.3) whose ``eh < h`` and ``ew < w``; top
    and left uniform integers in ``[0, h - eh]``, ``[0, w - ew]``. No attempt fits: no box.
    """
    a = tf.reshape(u[:, 1:], [-1, RRC_ATTEMPTS, 4])
    area = float(h * w) * (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * a[..., 0])
    l0, l1 = math.log(ERASE_ASPECT), math.log(1 / ERASE_ASPECT)
    aspect = tf.exp(l0 + (l1 - l0) * a[..., 1])
    eh = tf.round(tf.sqrt(area * aspect))
    ew = tf.round(tf.sqrt(area / aspect))
    ok = (eh < h) & (ew < w)
    top = tf.floor(a[..., 2] * (h - eh + 1.0))
    left = tf.floor(a[..., 3] * (w - ew + 1.0))
    first = tf.argmax(tf.cast(ok, tf.int32), axis=1, output_type=tf.int32)
    pick = lambda v: tf.cast(tf.gather(v, first, batch_dims=1), tf.int32)  # noqa: E731
    apply = (u[:, 0] < ERASE_PROB) & tf.reduce_any(ok, axis=1)
    return apply, pick(top), pick(left), pick(eh), pick(ew)


def random_erasing(x, u, noise):
    """x float32 [n, H, W, 3] (normalized); u [n, 41]; noise N(0, 1) [n, H, W, 3]."""
    h, w = x.shape[1], x.shape[2]
    apply, top, left, eh, ew = erase_boxes(u, h, w)
    rows = tf.range(h)[None, :]
    cols = tf.range(w)[None, :]
    in_y = (rows >= top[:, None]) & (rows < (top + eh)[:, None])
    in_x = (cols >= left[:, None]) & (cols < (left + ew)[:, None])
    mask = in_y[:, :, None, None] & in_x[:, None, :, None] & apply[:, None, None, None]
    return tf.where(mask, noise, x)


# ----------------------------------------------------------------------------- the train view
def train_view_batch(images, u, noise, size: int = SIZE):
    """The students' train transform of uint8 [n, H, W, 3] -> float32 [n, size, size, 3].

    ``u`` float32 [n, TRAIN_DRAWS] uniforms (crop + flip, RandAugment, erasing), ``noise``
    float32 [n, size, size, 3] standard normal (the erased pixels).
    """
    h, w = images.shape[1], images.shape[2]
    top, left, ch, cw = rrc_boxes(u[:, : RRC_DRAWS - 1], h, w)
    x = resized_crop_batch(images, top, left, ch, cw, size, "bicubic")
    x = flip_batch(x, u[:, RRC_DRAWS - 1])
    x = rand_augment_batch(x, u[:, RRC_DRAWS : RRC_DRAWS + RANDAUG_DRAWS])
    x = augment.normalize(x, IMAGENET_MEAN, IMAGENET_STD)
    return random_erasing(x, u[:, RRC_DRAWS + RANDAUG_DRAWS :], noise)


def train_view_from_seed(images, seed, size: int = SIZE):
    """:func:`train_view_batch` with its draws from the stateless ``seed`` (int32 [2])."""
    n = tf.shape(images)[0]
    seeds = tf.random.experimental.stateless_split(seed, 2)
    u = tf.random.stateless_uniform([n, TRAIN_DRAWS], seeds[0])
    noise = tf.random.stateless_normal([n, size, size, 3], seeds[1])
    return train_view_batch(images, u, noise, size)
