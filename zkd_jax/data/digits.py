"""The embedded offline dataset: scikit-learn's handwritten digits as 32x32 RGB images.

``sklearn.datasets.load_digits`` ships 1,797 grayscale 8x8 images with values 0..16 (no download).
They become CIFAR-shaped uint8 images:

* value ``v`` -> ``round(v * 255 / 16)`` (0..255, uint8);
* 8x8 -> 32x32 by nearest-neighbour upsampling (each pixel a 4x4 block), gray -> 3 equal channels;
* split: a fixed permutation (``seeding.epoch_order(1797, seed=0, epoch=0)``); its first 1,500
  entries are the train split, the other 297 the test split (deterministic on every machine).

Mean and std (per channel, of x / 255 over all train pixels) are the constants below, computed once
from the train split (``tests/test_data_digits.py`` recomputes them). Needs scikit-learn, not TF.
"""

from __future__ import annotations

import functools

import numpy as np

from zkd_jax.data import seeding

NUM_EXAMPLES = 1797
NUM_TRAIN = 1500
NUM_TEST = NUM_EXAMPLES - NUM_TRAIN
#: "digits_val": the train split carved in two for choosing settings, the test split untouched:
#: its "train" is the first VAL_TRAIN train images, its "test" the other NUM_TRAIN - VAL_TRAIN.
VAL_NAME = "digits_val"
VAL_TRAIN = 1200
VAL_TEST = NUM_TRAIN - VAL_TRAIN
UPSAMPLE = 4
MEAN = (0.305585, 0.305585, 0.305585)
STD = (0.376027, 0.376027, 0.376027)


@functools.lru_cache(maxsize=None)
def _all_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ValueError("The digits dataset needs scikit-learn; install it with `pip install -e '.[data]'`.") from e
    d = load_digits()
    gray = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # [N, 8, 8]
    big = np.repeat(np.repeat(gray, UPSAMPLE, axis=1), UPSAMPLE, axis=2)  # [N, 32, 32]
    images = np.repeat(big[..., None], 3, axis=-1)
    return images, d.target.astype(np.int32)


@functools.lru_cache(maxsize=None)
def load_digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The digits ``split`` ("train" | "test"): (uint8 [N, 32, 32, 3], int32 [N] in 0..9), read-only."""
    if split not in ("train", "test"):
        raise ValueError(f"digits has splits 'train' and 'test', not {split!r}.")
    images, labels = _all_digits()
    order = seeding.epoch_order(NUM_EXAMPLES, 0, 0)
    chosen = order[:NUM_TRAIN] if split == "train" else order[NUM_TRAIN:]
    out = (images[chosen], labels[chosen])
    for array in out:
        array.flags.writeable = False
    return out


def load_split(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``split`` of "digits" or of "digits_val" (the validation carve-out of digits' train split:
    train = its first ``VAL_TRAIN`` images, test = the other ``VAL_TEST``; the test split unused)."""
    if name == "digits":
        return load_digits_arrays(split)
    if name != VAL_NAME:
        raise ValueError(f"not a digits dataset: {name!r}; use 'digits' or {VAL_NAME!r}.")
    if split not in ("train", "test"):
        raise ValueError(f"{VAL_NAME} has splits 'train' and 'test', not {split!r}.")
    images, labels = load_digits_arrays("train")
    part = slice(0, VAL_TRAIN) if split == "train" else slice(VAL_TRAIN, NUM_TRAIN)
    return images[part], labels[part]


def compute_mean_std() -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of x / 255 over the train split (float64 [3] each)."""
    images, _ = load_digits_arrays("train")
    x = images.astype(np.float64) / 255.0
    return x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2))
