"""ImageNet (TFDS ``imagenet2012``, manual download) through tf.data; every function needs TF + TFDS.

Train: each process reads its own contiguous part of the train split
(``tfds.even_splits(..., n=P)[p]``, what ``tfds.split_for_jax_process`` returns), in a file order
and shuffle-buffer order fixed by (seed, epoch), keeps the first ``steps * b`` examples
(``steps = N // (b P)``), and decodes only the random-resized-crop window of each JPEG
(``tf.image.decode_and_crop_jpeg``): torchvision's ``RandomResizedCrop(224, scale=(0.08, 1),
ratio=(3/4, 4/3))`` (10 tries, then its centre-crop fallback), bilinear antialiased resize, rounded
to uint8, flip with probability 0.5. The random numbers of example i of the process's epoch stream
come from the stateless seed ``[key(seed, epoch, view), p * 2**40 + i]``. Starting at step k skips
``k * b`` encoded records before decoding (read, not decoded).

The shuffle buffer holds ``SHUFFLE_BUFFER`` encoded JPEGs (about 110 kB each: ~1.8 GB of host
memory per process). The strong view (MLKD) decodes its own crop and flip, then applies
RandAugment(2) (per-image op dispatch) and Cutout with a side up to 112 pixels.

Eval: resize the short side to 256 and centre-crop 224, done as torchvision's geometry in the
original image: decode only the centred square of side ``round(224 / 256 * short side)`` and resize
it to 224 (equal up to resampling at the window border). Padding rows complete the last batch.
"""

from __future__ import annotations

import math
from typing import Sequence

from zkd_jax.data import augment, seeding
from zkd_jax.views import BATCH_KEYS, STRONG, WEAK
from zkd_jax.data.tfds_source import import_tfds, prepared_builder, split_cardinality, tf

NAME = "imagenet2012"
IMAGE_SIZE = 224
RESIZE_SIZE = 256
SHUFFLE_BUFFER = 16_384
_ATTEMPTS = 10
_DRAWS_PER_ATTEMPT = 4
_EXAMPLE_STRIDE = 2**40


def random_resized_crop_window(shape, u, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)):
    """torchvision ``RandomResizedCrop.get_params``: int32 [4] = (top, left, height, width).

    shape: int32 [3] (H, W, C) of the encoded image; u: float32 [40] uniforms (10 attempts of
    (scale, log-ratio, top, left)). The first attempt whose window fits wins; otherwise the whole
    image, clamped to the ratio range, centred.
    """
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    u = tf.reshape(u, [_ATTEMPTS, _DRAWS_PER_ATTEMPT])
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u[:, 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = tf.exp(log_lo + (log_hi - log_lo) * u[:, 1])
    cw = tf.round(tf.sqrt(area * aspect))
    ch = tf.round(tf.sqrt(area / aspect))
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    top = tf.floor(u[:, 2] * (h - ch + 1.0))
    left = tf.floor(u[:, 3] * (w - cw + 1.0))
    first = tf.argmax(tf.cast(ok, tf.int32))
    in_ratio = w / h
    fb_w = tf.where(in_ratio < ratio[0], w, tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w))
    fb_h = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
    fallback = tf.stack([tf.floor((h - fb_h) / 2.0), tf.floor((w - fb_w) / 2.0), fb_h, fb_w])
    chosen = tf.stack([top[first], left[first], ch[first], cw[first]])
    return tf.cast(tf.where(tf.reduce_any(ok), chosen, fallback), tf.int32)


def _resize_uint8(image, size: int):
    out = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def decode_train(jpeg, u, size: int = IMAGE_SIZE):
    """Random-resized crop (decoding only the window) + flip; uint8 [size, size, 3]; u float32 [41]."""
    window = random_resized_crop_window(tf.io.extract_jpeg_shape(jpeg), u[: _ATTEMPTS * _DRAWS_PER_ATTEMPT])
    image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
    image = _resize_uint8(image, size)
    return tf.cond(u[-1] < 0.5, lambda: tf.reverse(image, axis=[1]), lambda: image)


def decode_eval(jpeg, size: int = IMAGE_SIZE, resize: int = RESIZE_SIZE):
    """Resize-256 / centre-crop-224 geometry, decoding only the centred window; uint8 [size, size, 3]."""
    shape = tf.io.extract_jpeg_shape(jpeg)
    h, w = shape[0], shape[1]
    side = tf.cast(tf.round(size / resize * tf.cast(tf.minimum(h, w), tf.float32)), tf.int32)
    window = tf.stack([(h - side + 1) // 2, (w - side + 1) // 2, side, side])
    return _resize_uint8(tf.image.decode_and_crop_jpeg(jpeg, window, channels=3), size)


_TRAIN_DRAWS = _ATTEMPTS * _DRAWS_PER_ATTEMPT + 1
_STRONG_EXTRA = augment.RANDAUG_DRAWS + augment.CUTOUT_DRAWS


def _as_dataset(builder, split, *, shuffle_seed: int | None):
    tfds = import_tfds()
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, options=_options())
    return builder.as_dataset(
        split=split,
        shuffle_files=shuffle_seed is not None,
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=read_config,
    )


def _options():
    opts = tf.data.Options()
    opts.deterministic = True
    return opts


def imagenet_train_dataset(
    *,
    per_process_batch_size: int,
    seed: int,
    epoch: int,
    start_step: int,
    views: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    data_dir: str | None,
    process_index: int,
    process_count: int,
    normalize: bool = True,
):
    """tf.data of one epoch of ImageNet training batches for this process (module docstring).

    ``normalize=False``: the images stay uint8 [b, 224, 224, 3] (normalized later, on the devices).
    """
    tfds = import_tfds()
    builder = prepared_builder(NAME, data_dir)
    b, p = per_process_batch_size, process_index
    num_train = split_cardinality(_as_dataset(builder, "train", shuffle_seed=None))
    steps = num_train // (b * process_count)
    if steps == 0:
        raise ValueError(f"global batch {b * process_count} exceeds the {num_train} ImageNet training examples.")
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step={start_step} is outside [0, {steps}] for this epoch; pass a step of the epoch.")
    split = tfds.even_splits("train", n=process_count)[process_index]
    ds = _as_dataset(builder, split, shuffle_seed=seeding.small_seed(seed, epoch, "imagenet_files"))
    ds = ds.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32)))
    ds = ds.shuffle(SHUFFLE_BUFFER, seed=seeding.small_seed(seed, epoch, "imagenet_shuffle"), reshuffle_each_iteration=False)
    ds = ds.take(steps * b).enumerate().skip(start_step * b)
    weak_key = seeding.stream_key(seed, epoch, WEAK)
    strong_key = seeding.stream_key(seed, epoch, STRONG)
    with_strong = STRONG in views

    def per_example(i, example):
        jpeg, label = example
        pos = tf.cast(i, tf.int64) + p * _EXAMPLE_STRIDE
        u = tf.random.stateless_uniform([_TRAIN_DRAWS], seed=tf.stack([tf.constant(weak_key, tf.int64), pos]))
        out = {"image": decode_train(jpeg, u), "label": label}
        if with_strong:
            us = tf.random.stateless_uniform(
                [_TRAIN_DRAWS + _STRONG_EXTRA], seed=tf.stack([tf.constant(strong_key, tf.int64), pos])
            )
            x = decode_train(jpeg, us[:_TRAIN_DRAWS])
            x = augment.rand_augment_image(x, us[_TRAIN_DRAWS : _TRAIN_DRAWS + augment.RANDAUG_DRAWS])
            out[BATCH_KEYS[STRONG]] = augment.cutout(x[None], us[None, -augment.CUTOUT_DRAWS :])[0]
        return out

    def finish(batch):
        out = dict(batch)
        out["image"] = augment.normalize(batch["image"], mean, std)
        if with_strong:
            out[BATCH_KEYS[STRONG]] = augment.normalize(batch[BATCH_KEYS[STRONG]], mean, std)
        return out

    ds = ds.map(per_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(b, drop_remainder=True)
    if normalize:
        ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def imagenet_eval_dataset(
    *,
    per_process_batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    data_dir: str | None,
    process_index: int,
    process_count: int,
    normalize: bool = True,
):
    """tf.data of this process's part of the validation split, once, padded; every batch has "mask".

    ``normalize=False``: the images stay uint8 [b, 224, 224, 3] (padding rows 0).
    """
    tfds = import_tfds()
    builder = prepared_builder(NAME, data_dir)
    b = per_process_batch_size
    num_val = split_cardinality(_as_dataset(builder, "validation", shuffle_seed=None))
    num_batches = max(1, math.ceil(math.ceil(num_val / process_count) / b))
    split = tfds.even_splits("validation", n=process_count)[process_index]
    ds = _as_dataset(builder, split, shuffle_seed=None)
    ds = ds.map(
        lambda ex: (decode_eval(ex["image"]), tf.cast(ex["label"], tf.int32), tf.constant(True)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    pad = tf.data.Dataset.from_tensors(
        (tf.zeros([IMAGE_SIZE, IMAGE_SIZE, 3], tf.uint8), tf.constant(0, tf.int32), tf.constant(False))
    ).repeat()
    ds = ds.concatenate(pad).take(num_batches * b).batch(b, drop_remainder=True)

    def finish(images, labels, mask):
        x = augment.normalize(images, mean, std) if normalize else images
        return {"image": tf.where(mask[:, None, None, None], x, tf.zeros_like(x)), "label": labels, "mask": mask}

    ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())
