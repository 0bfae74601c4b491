"""On-device input path: the whole uint8 split lives on the accelerator; batches come from a PRNG key.

For datasets that fit in device memory (CIFAR-100 train: 50,000 x 32 x 32 x 3 uint8 = 150 MB;
digits), shuffling, pad-crop, flip and normalization run in jitted JAX, so no host work happens per
step. All functions below are pure and jittable (JAX only); :func:`load_device_arrays`
(``zkd_jax.data.datasets``, re-exported) reads the split to place.

Usage (one epoch, global batch B, ``steps = N // B`` as in the tf.data path)::

    images, labels = load_device_arrays("cifar100", "train")          # NumPy, once
    images = jax.device_put(flat_images(images), replicated)            # e.g. NamedSharding(mesh, P())
    labels = jax.device_put(labels, replicated)
    info = zkd_jax.data.info("cifar100")
    order = epoch_permutation(data_key, epoch, images.shape[0])         # once per epoch (or inside)
    batch = device_train_batch(images, labels, data_key, epoch, step,   # inside the jitted step
                               batch_size=B, mean=info.mean, std=info.std, order=order)

Randomness: ``k = fold_in(key, epoch)``; the epoch order is ``permutation(fold_in(k, 0), N)`` and
global step ``s`` (0-based within the epoch) reads ``order[s B : (s + 1) B]`` and augments with
``fold_in(fold_in(k, 1), s)``: crop offsets ``randint(0, 2 pad + 1)`` per axis, flip
``bernoulli(0.5)``. This is the tf.data path's distribution (zero pad 4 in uint8 space, uniform
32x32 crop, flip 0.5, reshuffle each epoch without replacement, the last ``N mod B`` dropped), from
JAX's PRNG instead of TF's, so the numbers differ while the statistics agree. The on-device path
makes the weak view only (MLKD's strong view needs the tf.data path).

``mean`` and ``std`` must be static numbers (bind them with ``functools.partial`` before ``jit``):
normalization reads the float32 table of ``normalization.table``, which the tf.data path reads too,
so :func:`device_eval_batch` gives the tf.data eval images bit for bit. With a multi-device mesh,
the batch is the global batch; shard it with ``jax.lax.with_sharding_constraint`` (e.g.
``NamedSharding(mesh, P("data"))``) inside the jitted step.

Layout on the devices: the split is held as ``[N, H * W * C]`` uint8 (:func:`flat_images`), one
row per image, and each batch is reshaped to ``[B, H, W, C]`` after its rows are gathered. The
batch functions take either form and give the same batches bit for bit; the flat form is what the
feeds place. Why: XLA:TPU lays a uint8 ``[N, 32, 32, 3]`` array out with its last two dimensions
padded to tiles (3 channels in a 128-lane tile), so a program that gathers rows from it copies the
whole split into another layout on every call (615 MB for CIFAR-100, a dataset-sized temporary and
about a millisecond of HBM traffic per batch on v5e); a ``[N, 3072]`` array needs no relayout.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from zkd_jax.data import normalization
from zkd_jax.data.datasets import load_device_arrays  # re-exported: the split to place
from zkd_jax.views import BATCH_KEYS

CIFAR_PAD = 4


def flat_images(images):
    """``[N, H, W, C] -> [N, H * W * C]`` (NumPy or JAX, same dtype): the layout the devices hold a
    split in (module docstring); row ``i`` is image ``i`` in row-major (h, w, c) order."""
    return images.reshape(images.shape[0], -1)


def _rows_as_images(rows: jax.Array, image_shape: Sequence[int] | None) -> jax.Array:
    """Gathered rows ``[B, H * W * C]`` (or already ``[B, H, W, C]``) -> ``[B, H, W, C]``; a flat
    row of ``3 s^2`` bytes is an ``s x s`` RGB image unless ``image_shape`` says otherwise."""
    if rows.ndim == 4:
        return rows
    if image_shape is None:
        side = int(round((rows.shape[1] / 3) ** 0.5))
        image_shape = (side, side, 3)
    if math.prod(image_shape) != rows.shape[1]:
        raise ValueError(f"flat images of {rows.shape[1]} values are not {tuple(image_shape)}; "
                         "pass image_shape=(H, W, C).")
    return rows.reshape(rows.shape[0], *image_shape)


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """``(float32(x) / 255 - mean) / std``; uint8 [..., 3] -> float32 [..., 3].

    Looked up in ``normalization.table`` (as the tf.data path does), so the two paths agree bit
    for bit whatever XLA does to divisions.
    """
    lut = jnp.asarray(normalization.table(mean, std).T.reshape(-1))  # [3 * 256], channel-major
    return jnp.take(lut, images.astype(jnp.int32) + jnp.array([0, 256, 512], jnp.int32), axis=0)


def normalize_batch(batch: Mapping[str, jax.Array], *, mean: Sequence[float],
                    std: Sequence[float]) -> dict[str, jax.Array]:
    """A batch of uint8 images -> the same batch normalized, as the tf.data path normalizes it.

    Every image entry (``views.BATCH_KEYS``: "image", "image_strong") that is uint8 [B,H,W,3]
    becomes ``(float32(x) / 255 - mean) / std`` float32 [B,H,W,3] (:func:`normalize`, the shared
    table: bit-identical to ``train_batches``/``eval_batches`` with ``normalized=True``); with a
    "mask" [B], masked rows become zeros, as the tf.data path pads. Other entries pass unchanged.
    Pure and jittable (``mean``/``std`` static).
    """
    out = dict(batch)
    for key in BATCH_KEYS.values():
        if key in out and out[key].dtype == jnp.uint8:
            x = normalize(out[key], mean, std)
            if "mask" in out:
                x = jnp.where(out["mask"][:, None, None, None], x, jnp.zeros_like(x))
            out[key] = x
    return out


def epoch_permutation(key: jax.Array, epoch, num_examples: int) -> jax.Array:
    """The example order of ``epoch``: int32 [N], a permutation of range(N) fixed by (key, epoch)."""
    k = jax.random.fold_in(key, epoch)
    return jax.random.permutation(jax.random.fold_in(k, 0), num_examples).astype(jnp.int32)


def pad_crop_flip(images: jax.Array, key: jax.Array, pad: int = CIFAR_PAD) -> jax.Array:
    """Zero-pad ``pad`` (uint8 space), uniform HxW crop, flip w.p. 0.5; uint8 [B,H,W,3] -> same."""
    b, h, w, c = images.shape
    k_off, k_flip = jax.random.split(key)
    offsets = jax.random.randint(k_off, (b, 2), 0, 2 * pad + 1)
    flip = jax.random.bernoulli(k_flip, 0.5, (b,))
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def crop(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))

    out = jax.vmap(crop)(padded, offsets)
    return jnp.where(flip[:, None, None, None], out[:, :, ::-1, :], out)


def device_train_batch(
    images: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    epoch,
    step,
    *,
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    order: jax.Array | None = None,
    pad: int = CIFAR_PAD,
    image_shape: Sequence[int] | None = None,
) -> dict[str, jax.Array]:
    """Global training batch ``step`` (0-based, < N // batch_size) of ``epoch``; pure and jittable.

    images uint8 [N,H,W,3], or [N, H*W*3] (:func:`flat_images`, the layout the feeds place; then
    ``image_shape`` (static) gives (H, W, C), default square RGB), and labels int32 [N] on device;
    returns {"image": float32 [B,H,W,3] normalized, "label": int32 [B]}, the same for both
    layouts. ``order`` (from :func:`epoch_permutation` with the same key and epoch) may be passed
    to avoid recomputing the permutation every step.
    """
    n = images.shape[0]
    if order is None:
        order = epoch_permutation(key, epoch, n)
    rows = jax.lax.dynamic_slice_in_dim(order, step * batch_size, batch_size)
    k = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, epoch), 1), step)
    x = pad_crop_flip(_rows_as_images(jnp.take(images, rows, axis=0), image_shape), k, pad)
    return {"image": normalize(x, mean, std), "label": jnp.take(labels, rows, axis=0).astype(jnp.int32)}


def train_batch_builder(batch_size: int, mean: Sequence[float], std: Sequence[float]
                        ) -> Callable[..., dict[str, jax.Array]]:
    """``build(images, labels, key, epoch, step, order=None)``: :func:`device_train_batch` with its
    static batch size and normalization bound (pure and jittable; what a scanned program calls to
    make each step's batch, ``zkd_jax.step.scan``)."""
    return functools.partial(device_train_batch, batch_size=batch_size, mean=mean, std=std)


def num_eval_batches(num_examples: int, batch_size: int) -> int:
    """ceil(N / batch_size): the number of :func:`device_eval_batch` indices covering the split."""
    return -(-num_examples // batch_size)


def device_eval_batch(
    images: jax.Array,
    labels: jax.Array,
    index,
    *,
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    image_shape: Sequence[int] | None = None,
) -> dict[str, jax.Array]:
    """Eval batch ``index``: rows ``[index B, (index + 1) B)`` of the split, padded; jittable.

    ``images``: [N,H,W,3] or flat [N, H*W*3] as in :func:`device_train_batch`.

    Returns {"image": (x / 255 - mean) / std float32 [B,H,W,3], "label": int32 [B], "mask": bool
    [B]}; rows past the end are zero images, label 0, mask False. Identical to
    ``eval_batches(..., process_count=1)`` of the tf.data path.
    """
    n = images.shape[0]
    idx = index * batch_size + jnp.arange(batch_size)
    mask = idx < n
    safe = jnp.minimum(idx, n - 1)
    x = normalize(_rows_as_images(jnp.take(images, safe, axis=0), image_shape), mean, std)
    return {
        "image": jnp.where(mask[:, None, None, None], x, jnp.zeros_like(x)),
        "label": jnp.where(mask, jnp.take(labels, safe, axis=0), 0).astype(jnp.int32),
        "mask": mask,
    }
