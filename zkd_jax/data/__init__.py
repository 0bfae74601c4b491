"""Input pipelines for CIFAR-100, ImageNet and the offline digits: the face of ``zkd_jax.data``.

One door for the trainer: :func:`make_feed` (``zkd_jax.data.feeds``) returns the global batches of a
run for its input plan: tf.data on the host, the split held on the devices, or that split feeding
scans of several steps (``steps_per_call > 1``). The parts, re-exported here:

* ``datasets``: :func:`info`, :func:`num_train_examples`, :func:`steps_per_epoch` and
  :func:`load_device_arrays` (a small split as NumPy); plain Python and NumPy.
* ``tfdata``: :func:`train_batches`, :func:`eval_batches`, :func:`eval_dataset` (this process's
  NumPy batches from tf.data; TensorFlow imported on first use).
* ``device``: the on-device batches (pure JAX): :func:`device_train_batch`,
  :func:`device_eval_batch`, :func:`epoch_permutation`, :func:`normalize_batch`.
* ``feeds``: :func:`make_feed` and the :class:`Feed` it returns; ``plan``: an epoch's calls.

Importing this package does NOT import TensorFlow.
"""

from __future__ import annotations

from zkd_jax.data.datasets import (
    NAMES,
    VIEWS,
    DatasetInfo,
    info,
    load_device_arrays,
    num_train_examples,
    steps_per_epoch,
)
from zkd_jax.data.device import (
    device_eval_batch,
    device_train_batch,
    epoch_permutation,
    normalize_batch,
    num_eval_batches,
)
from zkd_jax.data.feeds import Feed, make_feed
from zkd_jax.data.tfdata import clear_cache, eval_batches, eval_dataset, train_batches

__all__ = [
    "DatasetInfo",
    "Feed",
    "NAMES",
    "clear_cache",
    "device_eval_batch",
    "device_train_batch",
    "epoch_permutation",
    "eval_batches",
    "eval_dataset",
    "info",
    "load_device_arrays",
    "make_feed",
    "normalize_batch",
    "num_eval_batches",
    "num_train_examples",
    "steps_per_epoch",
    "train_batches",
]
