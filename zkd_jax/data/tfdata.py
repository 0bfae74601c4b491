"""The tf.data pipelines, one entry per split: :func:`train_batches`, :func:`eval_batches`.

Batches are NumPy dicts of this process's share (the trainer's feed, ``zkd_jax.data.feeds``, makes
global arrays of them):

* train: {"image": float32 [b,H,W,3] normalized, "label": int32 [b]} (+ "image_strong" for
  ``views=("weak", "strong")``), exactly ``steps_per_epoch`` batches per epoch minus ``start_step``.
* eval: the same plus "mask" bool [b]; the last batch is padded (mask False) so shapes stay static.
* ``normalized=False``: the images stay uint8 [b,H,W,3] (eval padding rows 0), a quarter of the bytes
  to copy to the devices; ``zkd_jax.data.device.normalize_batch`` gives the normalized float32
  batch from them, equal bit for bit (one lookup table, ``zkd_jax.data.normalization``). The
  trainer's tf.data feed works this way.

TensorFlow (and TFDS for "cifar100" and "imagenet2012"; "digits" also needs scikit-learn) is
imported on first use, with every GPU hidden from TF; importing this module does not import it.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from zkd_jax.data.datasets import info, load_device_arrays, num_train_examples
from zkd_jax.views import CIFAR_AUGMENTATION, WEAK, check_augmentation, check_views


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # pylint: disable=import-outside-toplevel

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
    return int(process_index), int(process_count)


def _check_batch_size(per_process_batch_size: int) -> None:
    if per_process_batch_size <= 0:
        raise ValueError(f"per_process_batch_size must be positive, got {per_process_batch_size}.")


def _split_kwargs(name: str, per_process_batch_size: int, process_index: int | None,
                  process_count: int | None, normalized: bool) -> dict:
    """The arguments every split's dataset function takes: this process's share, the batch size
    and the dataset's normalization."""
    ds_info = info(name)
    p, count = _processes(process_index, process_count)
    return dict(per_process_batch_size=per_process_batch_size, mean=ds_info.mean,
                std=ds_info.std, process_index=p, process_count=count, normalize=normalized)


def _check_vit_dataset(name: str, augmentation: str) -> None:
    if augmentation != CIFAR_AUGMENTATION and name == "imagenet2012":
        raise ValueError("the ViT augmentation serves the datasets held in memory (CIFAR-100, "
                         "digits, synthetic_cifar100), not imagenet2012; use one of those.")


def train_batches(
    name: str,
    *,
    per_process_batch_size: int,
    seed: int,
    epoch: int,
    start_step: int = 0,
    views: Sequence[str] = (WEAK,),
    data_dir: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    normalized: bool = True,
    augmentation: str = CIFAR_AUGMENTATION,
    image_size: int | None = None,
    batch_fns: dict | None = None,
    train_examples: int = -1,
) -> Iterator[dict[str, np.ndarray]]:
    """The training batches of ONE epoch (counted from 1) of this process, from ``start_step`` on.

    Deterministic given (seed, epoch): order and every augmentation; starting at step k yields
    exactly what an uninterrupted iterator yields from step k. Each process reads a disjoint part.
    ``normalized=False`` keeps the images uint8 (module docstring; the ViT transform's images are
    float32 and normalized either way). ``augmentation="vit"`` (``zkd_jax.views``): the ViT
    students' images at ``image_size`` px (the datasets held in memory only, not imagenet2012).
    ``batch_fns``: a dict kept from epoch to epoch, so the datasets held in memory trace their
    batch function once (``data.cifar``). ``train_examples`` > 0: only the split's first
    ``train_examples`` images (:func:`num_train_examples`).
    Needs TensorFlow (+ TFDS for cifar100/imagenet2012, scikit-learn for digits).
    """
    info(name)  # an unknown dataset is named before anything else
    views = check_views(views)
    _check_vit_dataset(name, check_augmentation(augmentation, views))
    _check_batch_size(per_process_batch_size)
    if epoch < 1:
        raise ValueError(f"epochs are counted from 1, got epoch={epoch}.")
    kwargs = _split_kwargs(name, per_process_batch_size, process_index, process_count, normalized)
    kwargs.update(seed=seed, epoch=epoch, start_step=start_step, views=views)
    num_train = num_train_examples(name, train_examples)
    if name == "imagenet2012":
        from zkd_jax.data.imagenet_tfdata import imagenet_train_dataset  # pylint: disable=import-outside-toplevel

        ds = imagenet_train_dataset(data_dir=data_dir, **kwargs)
    else:
        from zkd_jax.data.cifar import array_train_dataset  # pylint: disable=import-outside-toplevel

        images, labels = load_device_arrays(name, "train", data_dir)
        ds = array_train_dataset(images[:num_train], labels[:num_train], augmentation=augmentation,
                                 image_size=image_size, batch_fns=batch_fns, **kwargs)
    return ds.as_numpy_iterator()


def eval_batches(name: str, **kwargs) -> Iterator[dict[str, np.ndarray]]:
    """This process's part of the test split (ImageNet: validation), once, with a "mask" per batch.

    Every process yields the same number of batches, ``ceil(ceil(N / P) / b)``. Needs TensorFlow
    (+ TFDS for cifar100/imagenet2012, scikit-learn for digits). ``kwargs``: those of
    :func:`eval_dataset`.
    """
    return eval_dataset(name, **kwargs).as_numpy_iterator()


def eval_dataset(
    name: str,
    *,
    per_process_batch_size: int,
    data_dir: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    normalized: bool = True,
    augmentation: str = CIFAR_AUGMENTATION,
    image_size: int | None = None,
):
    """The ``tf.data.Dataset`` that :func:`eval_batches` iterates: build it once and iterate it at
    every evaluation (a run's feed does), so its map function is traced once.
    ``normalized=False`` keeps the images uint8 (module docstring).
    ``augmentation="vit"``: the test images resized to ``image_size`` px (the ViT students' test
    transform; float32 and normalized either way).
    """
    info(name)  # an unknown dataset is named before anything else
    _check_vit_dataset(name, check_augmentation(augmentation, (WEAK,)))
    _check_batch_size(per_process_batch_size)
    kwargs = _split_kwargs(name, per_process_batch_size, process_index, process_count, normalized)
    if name == "imagenet2012":
        from zkd_jax.data.imagenet_tfdata import imagenet_eval_dataset  # pylint: disable=import-outside-toplevel

        ds = imagenet_eval_dataset(data_dir=data_dir, **kwargs)
    else:
        from zkd_jax.data.cifar import array_eval_dataset  # pylint: disable=import-outside-toplevel

        images, labels = load_device_arrays(name, "test", data_dir)
        ds = array_eval_dataset(images, labels, augmentation=augmentation,
                                image_size=image_size, **kwargs)
    return ds


def clear_cache() -> None:
    """Forgets cached TFDS split arrays and their TF copies (frees host memory; imports no TF)."""
    from zkd_jax.data import cifar, tfds_source  # pylint: disable=import-outside-toplevel

    tfds_source.clear_cache()
    cifar.clear_tensor_cache()


__all__ = ["clear_cache", "eval_batches", "eval_dataset", "train_batches"]
