"""Deterministic randomness for the host pipelines, from (seed, epoch, purpose) only (NumPy only).

Every random choice of an epoch is a pure function of ``(seed, epoch)`` and of the position it is
made for (a step or an example index), never of how many draws happened before. That is what lets an
iterator start at any step of an epoch and see exactly what an uninterrupted one sees, with no replay.

* ``epoch_order`` uses ``SeedSequence`` and the ``Philox`` bit generator, both of which NumPy keeps
  stream-stable across versions (NEP 19), plus a stable argsort, so the order does not depend on
  NumPy's ``permutation`` algorithm.
* ``stream_key`` gives a 63-bit integer per (seed, epoch, stream); the TensorFlow stateless ops use
  the seed pair ``[stream_key, step or example index]``.
"""

from __future__ import annotations

import numpy as np

# Purposes of random draws; the numbers keep streams independent. Never renumber them (that would
# change every run's data).
STREAMS = {"order": 0, "weak": 1, "strong": 2, "imagenet_files": 3, "imagenet_shuffle": 4,
           "erase_noise": 5}


def _check(seed: int, epoch: int) -> None:
    if int(seed) < 0 or int(epoch) < 0:
        raise ValueError(f"seed and epoch must be non-negative integers, got seed={seed}, epoch={epoch}.")


def stream_key(seed: int, epoch: int, stream: str) -> int:
    """A 63-bit non-negative integer fixed by (seed, epoch, stream)."""
    _check(seed, epoch)
    state = np.random.SeedSequence([int(seed), int(epoch), STREAMS[stream]]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def small_seed(seed: int, epoch: int, stream: str) -> int:
    """A 31-bit seed for TF ops that take a Python int seed (shuffle buffers, file order)."""
    return stream_key(seed, epoch, stream) % (2**31 - 1)


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch: a permutation of ``range(num_examples)``, int64 [N]."""
    _check(seed, epoch)
    bitgen = np.random.Philox(np.random.SeedSequence([int(seed), int(epoch), STREAMS["order"]]))
    return np.argsort(bitgen.random_raw(num_examples), kind="stable").astype(np.int64)


def even_split_bounds(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, end) of this process's contiguous part, as ``tfds.even_splits`` cuts it.

    Parts differ in size by at most one; the first ``num_examples % process_count`` parts get the
    extra example.
    """
    base, extra = divmod(num_examples, process_count)
    start = base * process_index + min(process_index, extra)
    end = start + base + (1 if process_index < extra else 0)
    return start, end
