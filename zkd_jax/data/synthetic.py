"""``synthetic_cifar100``: random uint8 images with CIFAR-100's shapes, for timing without the data.

50,000 train and 10,000 test images of 32x32x3 and labels in 0..99, drawn once from a fixed NumPy
seed (the same on every machine; 150 MB + 30 MB). Labels do not depend on the images: nothing can
be learned, so accuracy means nothing; the cost of every step, batch and evaluation is CIFAR-100's.
Both input pipelines serve it, with CIFAR-100's normalization constants. Needs NumPy only.
"""

from __future__ import annotations

import functools

import numpy as np

NAME = "synthetic_cifar100"
NUM_CLASSES = 100
NUM_TRAIN = 50_000
NUM_TEST = 10_000
IMAGE_SIZE = 32
_SEEDS = {"train": 0, "test": 1}


@functools.lru_cache(maxsize=None)
def load_synthetic_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``split`` ("train" | "test"): (uint8 [N, 32, 32, 3], int32 [N] in 0..99), read-only."""
    if split not in _SEEDS:
        raise ValueError(f"{NAME} has splits 'train' and 'test', not {split!r}.")
    n = NUM_TRAIN if split == "train" else NUM_TEST
    rng = np.random.default_rng(_SEEDS[split])
    images = rng.integers(0, 256, (n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    for array in (images, labels):
        array.flags.writeable = False
    return images, labels
