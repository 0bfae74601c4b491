"""The datasets the package reads: their static facts and the splits held in memory.

:func:`info` (shapes, split sizes, normalization constants), :func:`num_train_examples` and
:func:`steps_per_epoch` are plain Python; :func:`load_device_arrays` reads a whole small split as
NumPy (digits: scikit-learn; CIFAR-100: TFDS, so TensorFlow; the synthetic split: NumPy), for the
on-device path and for the tf.data pipelines of the datasets held in memory.

Accepted deviation: every epoch drops the last partial batch (``N // global_batch`` steps: 781 for
CIFAR-100 at batch 64, where the reference runs 782 with a last batch of 16), because jitted steps
want static shapes. The dropped examples change with the epoch's shuffle, so all examples are seen.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from zkd_jax.data import digits as _digits
from zkd_jax.data import synthetic as _synthetic
from zkd_jax.views import VIEW_SETS


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset: shapes, split sizes and the normalization constants."""

    name: str
    num_classes: int
    image_size: int
    num_train: int
    num_test: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


_CIFAR100 = DatasetInfo(
    "cifar100", 100, 32, 50_000, 10_000, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
)
_INFOS = {
    "cifar100": _CIFAR100,
    "imagenet2012": DatasetInfo(
        "imagenet2012", 1000, 224, 1_281_167, 50_000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ),
    "digits": DatasetInfo(
        "digits", 10, 32, _digits.NUM_TRAIN, _digits.NUM_TEST, _digits.MEAN, _digits.STD
    ),
    # digits' train split carved into train and validation ("test") for choosing settings.
    _digits.VAL_NAME: DatasetInfo(
        _digits.VAL_NAME, 10, 32, _digits.VAL_TRAIN, _digits.VAL_TEST, _digits.MEAN, _digits.STD
    ),
    # Random images of CIFAR-100's shapes, for timing where the data is not (zkd_jax.data.synthetic).
    _synthetic.NAME: DatasetInfo(
        _synthetic.NAME, _synthetic.NUM_CLASSES, _synthetic.IMAGE_SIZE, _synthetic.NUM_TRAIN,
        _synthetic.NUM_TEST, _CIFAR100.mean, _CIFAR100.std
    ),
}
NAMES = tuple(_INFOS)
#: The datasets whose splits fit in memory (:func:`load_device_arrays`): every name but ImageNet's.
IN_MEMORY = ("cifar100", "digits", _digits.VAL_NAME, _synthetic.NAME)
VIEWS = VIEW_SETS  # zkd_jax.views


def info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of "cifar100", "imagenet2012", "digits" or "synthetic_cifar100"."""
    if name not in _INFOS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(NAMES)}.")
    return _INFOS[name]


def num_train_examples(name: str, train_examples: int = -1) -> int:
    """The training examples a run reads: the whole train split, or (``train_examples`` > 0) its
    first ``train_examples`` (``config.train_examples``: short runs and data-budget studies; the
    datasets held in memory only).

    Raises:
      ValueError: more examples than the split holds, or a cap on imagenet2012.
    """
    n = info(name).num_train
    if train_examples is None or train_examples <= 0:
        return n
    if name == "imagenet2012":
        raise ValueError("config.train_examples serves the datasets held in memory (cifar100, digits, "
                         "synthetic_cifar100), not imagenet2012; set it to -1 (the whole split).")
    if train_examples > n:
        raise ValueError(f"config.train_examples={train_examples} exceeds the {n} training examples "
                         f"of {name}; set at most {n}, or -1 for all.")
    return int(train_examples)


def steps_per_epoch(name: str, global_batch_size: int, train_examples: int = -1) -> int:
    """``num_train // global_batch_size`` (drop-remainder: 781 for CIFAR-100 at 64, not 782);
    ``num_train`` is :func:`num_train_examples`."""
    n = num_train_examples(name, train_examples)
    if not 0 < global_batch_size <= n:
        raise ValueError(f"global batch size must be in [1, {n}] for {name}, got {global_batch_size}.")
    return n // global_batch_size


def load_device_arrays(name: str, split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A whole split as host NumPy, ready for ``jax.device_put``: (uint8 [N,H,W,3], int32 [N]).

    "digits" needs scikit-learn only; "cifar100" reads TFDS (needs TensorFlow + TFDS, and raises one
    ``ValueError`` saying where to put the data if it is missing); "imagenet2012" does not fit in
    device memory and raises ``ValueError``.
    """
    if name in ("digits", "digits_val"):
        from zkd_jax.data.digits import load_split  # pylint: disable=import-outside-toplevel

        return load_split(name, split)
    if name == "cifar100":
        from zkd_jax.data.cifar import load_cifar100  # pylint: disable=import-outside-toplevel

        return load_cifar100(split, data_dir)
    if name == "synthetic_cifar100":
        from zkd_jax.data.synthetic import load_synthetic_arrays  # pylint: disable=import-outside-toplevel

        return load_synthetic_arrays(split)
    raise ValueError(
        f"the on-device path holds small splits only ('digits', 'cifar100', 'synthetic_cifar100'), "
        f"not {name!r}; "
        "use zkd_jax.data.train_batches for it."
    )


__all__ = ["DatasetInfo", "IN_MEMORY", "NAMES", "VIEWS", "info", "load_device_arrays", "num_train_examples",
           "steps_per_epoch"]
