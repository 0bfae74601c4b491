"""The CIFAR code path: tf.data over a whole split held in host memory (CIFAR-100, digits).

Data layout of one epoch (all processes compute the same plan, from (seed, epoch) only):

* ``order = seeding.epoch_order(N, seed, epoch)``; its first ``steps * B`` entries, ``B = b * P``
  (per-process batch b, P processes), form ``steps = N // B`` global batches; the last ``N % B``
  examples of the order are dropped (different ones each epoch). Process ``p`` reads rows
  ``[p b, (p + 1) b)`` of every global batch, so the P processes read disjoint parts that together
  cover the epoch, and the global batch (processes concatenated in order) is the same whatever P is.
* The augmentation of global step ``s`` draws ``tf.random.stateless_uniform([B, k], seed=[key, s])``
  (``key`` from (seed, epoch, view)) and each process keeps its own rows, so images are augmented
  the same way for any P, and starting at step k needs no replay.

With ``augmentation="vit"`` (the ViT students, ``zkd_jax.data.vit_augment``) the weak view is the
timm train transform at ``image_size`` px, drawn the same way (uniforms of the global batch from
``[key, step]``; the RandomErasing noise of the global batch from its own stream), and the test
images are resized to ``image_size`` (bilinear) and normalized with ImageNet's mean and std.

Every function here needs TensorFlow (imported lazily) except :func:`train_plan` and
:func:`eval_plan` (NumPy).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from zkd_jax.data import augment, seeding, vit_augment
from zkd_jax.views import BATCH_KEYS, CIFAR_AUGMENTATION, STRONG, VIT_AUGMENTATION, WEAK
from zkd_jax.data.tfds_source import load_split_arrays, tf


def train_plan(
    num_examples: int,
    *,
    per_process_batch_size: int,
    seed: int,
    epoch: int,
    start_step: int,
    process_index: int,
    process_count: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices read by this process: (rows int64 [S, b], global steps int64 [S]), S = steps - start."""
    b = per_process_batch_size
    global_batch = b * process_count
    steps = num_examples // global_batch
    if steps == 0:
        raise ValueError(
            f"global batch {global_batch} exceeds the {num_examples} training examples; use a smaller batch."
        )
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step={start_step} is outside [0, {steps}] for this epoch; pass a step of the epoch.")
    order = seeding.epoch_order(num_examples, seed, epoch)[: steps * global_batch]
    rows = order.reshape(steps, process_count, b)[start_step:, process_index]
    return rows, np.arange(start_step, steps, dtype=np.int64)


def eval_plan(
    num_examples: int, *, per_process_batch_size: int, process_index: int, process_count: int
) -> tuple[np.ndarray, np.ndarray]:
    """(indices int64 [nb, b], mask bool [nb, b]) of this process's contiguous part of the split.

    Every process gets the same number of batches, ``ceil(ceil(N / P) / b)``; padding rows have
    mask False (and index 0).
    """
    b = per_process_batch_size
    start, end = seeding.even_split_bounds(num_examples, process_index, process_count)
    num_batches = max(1, math.ceil(math.ceil(num_examples / process_count) / b))
    idx = start + np.arange(num_batches * b, dtype=np.int64)
    mask = idx < end
    return np.where(mask, idx, 0).reshape(num_batches, b), mask.reshape(num_batches, b)


def _check_arrays(images: np.ndarray, labels: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}.")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels must be [N] with N = {images.shape[0]}, got {labels.shape}.")


def _vit_size(augmentation: str, image_size: int | None, images: np.ndarray) -> int | None:
    """The ViT transform's output size (None: the CIFAR augmentation, images keep their size)."""
    if augmentation == CIFAR_AUGMENTATION:
        return None
    if augmentation != VIT_AUGMENTATION:
        raise ValueError(f"augmentation {augmentation!r} is unknown; use 'cifar' or 'vit'.")
    size = int(image_size or images.shape[1])
    if size < images.shape[1]:
        raise ValueError(f"the ViT transform enlarges only: image_size={size} is smaller than the "
                         f"{images.shape[1]}-px images; use an image_size >= {images.shape[1]}.")
    return size


def _options():
    opts = tf.data.Options()
    opts.deterministic = True
    return opts


_TENSORS: list[tuple[np.ndarray, np.ndarray, object]] = []


def _as_tensors(images: np.ndarray, labels: np.ndarray):
    """The split as TF tensors, converted once per array pair (a 150 MB copy per epoch otherwise)."""
    for cached_images, cached_labels, tensors in _TENSORS:
        if cached_images is images and cached_labels is labels:
            return tensors
    tensors = (tf.constant(images), tf.constant(labels.astype(np.int32)))
    _TENSORS.append((images, labels, tensors))
    del _TENSORS[:-4]  # keep the last few splits (train and test of the current dataset)
    return tensors


def clear_tensor_cache() -> None:
    """Drops the TF copies of split arrays kept by :func:`_as_tensors`."""
    _TENSORS.clear()


def _train_batch_fn(b: int, process_index: int, global_batch: int, with_strong: bool, mean, std, pad: int,
                    normalize: bool = True, vit_size: int | None = None):
    """The per-batch map function (a ``tf.function``, traced by the first dataset that maps it:
    once per run when the caller keeps ``batch_fns``); ``vit_size``: the ViT students' transform
    at that size instead of crop + flip (normalized in tf.data whatever ``normalize`` says)."""

    def finish(x):
        return augment.normalize(x, mean, std) if normalize else x

    @tf.function(autograph=False)
    def make_batch(rows, step, weak_key, strong_key, noise_key, all_images, all_labels):
        lo, hi = process_index * b, (process_index + 1) * b
        x = tf.gather(all_images, rows)
        out = {"label": tf.gather(all_labels, rows)}
        if vit_size is not None:
            u = tf.random.stateless_uniform([global_batch, vit_augment.TRAIN_DRAWS], seed=tf.stack([weak_key, step]))
            noise = tf.random.stateless_normal([global_batch, vit_size, vit_size, 3], seed=tf.stack([noise_key, step]))
            out["image"] = vit_augment.train_view_batch(x, u[lo:hi], noise[lo:hi], vit_size)
            return out
        u = tf.random.stateless_uniform([global_batch, augment.CROP_FLIP_DRAWS], seed=tf.stack([weak_key, step]))
        out["image"] = finish(augment.crop_flip_batch(x, u[lo:hi], pad))
        if with_strong:
            us = tf.random.stateless_uniform([global_batch, augment.STRONG_DRAWS], seed=tf.stack([strong_key, step]))
            out[BATCH_KEYS[STRONG]] = finish(augment.strong_view_batch(x, us[lo:hi]))
        return out

    return make_batch


def array_train_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    per_process_batch_size: int,
    seed: int,
    epoch: int,
    start_step: int,
    views: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    process_index: int,
    process_count: int,
    pad: int = augment.CIFAR_PAD,
    normalize: bool = True,
    augmentation: str = CIFAR_AUGMENTATION,
    image_size: int | None = None,
    batch_fns: dict | None = None,
):
    """tf.data of one epoch's training batches for this process (see the module docstring).

    Elements: {"image": float32 [b, H, W, 3], "label": int32 [b]} and, when "strong" is in
    ``views``, "image_strong" (crop + flip + RandAugment(2) + Cutout of the same images, drawn
    independently of the weak view's crop and flip, as the reference's two transforms do).
    ``normalize=False``: the images stay uint8 [b, H, W, 3] (normalized later, on the devices).
    ``augmentation="vit"``: "image" is the ViT train transform at ``image_size`` px, float32 with
    ImageNet normalization whatever ``normalize`` says (``mean`` and ``std`` unused). ``batch_fns``:
    a dict the caller keeps from epoch to epoch (a run's feed), holding the per-batch
    ``tf.function`` so that it is traced once per run rather than once per epoch (the ViT transform
    takes seconds to trace).
    """
    _check_arrays(images, labels)
    b = per_process_batch_size
    rows, steps = train_plan(
        images.shape[0],
        per_process_batch_size=b,
        seed=seed,
        epoch=epoch,
        start_step=start_step,
        process_index=process_index,
        process_count=process_count,
    )
    keys = [np.full(len(steps), seeding.stream_key(seed, epoch, v), np.int64)
            for v in (WEAK, STRONG, "erase_noise")]
    vit_size = _vit_size(augmentation, image_size, images)
    fn_args = (b, process_index, b * process_count, STRONG in views, tuple(mean), tuple(std), pad,
               normalize, vit_size)
    batch_fns = {} if batch_fns is None else batch_fns
    if fn_args not in batch_fns:
        batch_fns[fn_args] = _train_batch_fn(*fn_args)
    make_batch = batch_fns[fn_args]
    plan = tf.data.Dataset.from_tensor_slices((rows, steps, *keys))
    data = tf.data.Dataset.from_tensors(_as_tensors(images, labels)).repeat()
    ds = tf.data.Dataset.zip((plan, data))
    ds = ds.map(
        lambda plan, data: make_batch(*plan, *data), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def array_eval_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    per_process_batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    process_index: int,
    process_count: int,
    normalize: bool = True,
    augmentation: str = CIFAR_AUGMENTATION,
    image_size: int | None = None,
):
    """tf.data of this process's part of a test split, once, normalized, padded with a mask.

    Elements: {"image": float32 [b, H, W, 3] = (x / 255 - mean) / std, "label": int32 [b],
    "mask": bool [b]}; padding rows are all-zero images with label 0 and mask False.
    ``normalize=False``: the images stay uint8 [b, H, W, 3] (padding rows 0).
    ``augmentation="vit"``: the images resized to ``image_size`` px (bilinear, Pillow's uint8
    result) and normalized with ImageNet's mean and std (the ViT students' test transform), float32
    whatever ``normalize`` says.
    """
    _check_arrays(images, labels)
    vit_size = _vit_size(augmentation, image_size, images)
    idx, mask = eval_plan(
        images.shape[0],
        per_process_batch_size=per_process_batch_size,
        process_index=process_index,
        process_count=process_count,
    )

    def make_batch(plan, data):
        idx_t, mask_t = plan
        all_images, all_labels = data
        if vit_size is not None:
            x = vit_augment.eval_view_batch(tf.gather(all_images, idx_t), vit_size)
        else:
            x = tf.gather(all_images, idx_t)
            if normalize:
                x = augment.normalize(x, mean, std)
        return {
            "image": tf.where(mask_t[:, None, None, None], x, tf.zeros_like(x)),
            "label": tf.where(mask_t, tf.gather(all_labels, idx_t), tf.zeros_like(idx_t, tf.int32)),
            "mask": mask_t,
        }

    plan = tf.data.Dataset.from_tensor_slices((idx, mask))
    data = tf.data.Dataset.from_tensors(_as_tensors(images, labels)).repeat()
    ds = tf.data.Dataset.zip((plan, data))
    ds = ds.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def load_cifar100(split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-100 ``split`` ("train" | "test") from TFDS: uint8 [N, 32, 32, 3], fine labels int32 [N].

    Needs TensorFlow and TFDS; a missing, undownloadable dataset raises one ``ValueError``.
    """
    return load_split_arrays("cifar100", split, data_dir, label_key="label")
