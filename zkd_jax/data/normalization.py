"""The normalization table both input paths read (NumPy only).

``table(mean, std)[v, c] = (float32(v) / 255 - mean[c]) / std[c]``, evaluated in float32 in this
order (torchvision's ``ToTensor`` then ``Normalize``), for every uint8 value ``v`` and channel ``c``.
The tf.data path and the on-device path both look pixels up in this table instead of computing the
expression, because compilers rewrite it differently (XLA turns ``x / const`` into
``x * (1 / const)``); so both paths give bit-identical images, equal to the NumPy expression.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """float32 [256, 3]: the normalized value of each uint8 pixel value per channel."""
    mean32 = np.asarray(mean, np.float32)
    std32 = np.asarray(std, np.float32)
    if mean32.shape != (3,) or std32.shape != (3,) or np.any(std32 <= 0):
        raise ValueError(f"mean and std must be 3 numbers with std > 0, got {mean} and {std}.")
    values = np.arange(256, dtype=np.float32)[:, None]
    return ((values / np.float32(255.0) - mean32) / std32).astype(np.float32)
