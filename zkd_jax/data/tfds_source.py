"""Lazy TensorFlow / TFDS access: GPU hiding, prepared builders, offline errors, split arrays.

Nothing here imports TensorFlow at module import time. ``tf`` below is a proxy that imports
TensorFlow on first attribute access (and then hides every GPU from it, so that TF never grabs the
accelerator JAX trains on). Every function in this module needs TensorFlow and TFDS installed
(the ``data`` extra: ``pip install -e '.[data]'``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

_LOCK = threading.Lock()
_TF_MODULE: Any = None


@contextlib.contextmanager
def _native_stderr_quiet(enabled: bool) -> Iterator[None]:
    """Silences file descriptor 2 while TensorFlow's native code starts: its C++ logging prints
    INFO lines (oneDNN, CPU features) before it reads ``TF_CPP_MIN_LOG_LEVEL``."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def import_tf():
    """Imports TensorFlow once, hides all GPUs from it and quiets its logs; returns the module.

    Needs TensorFlow. Safe to call many times.
    """
    global _TF_MODULE
    if _TF_MODULE is not None:
        return _TF_MODULE
    with _LOCK:
        if _TF_MODULE is None:
            # TF_CPP_MIN_LOG_LEVEL=0 asks for TF's native logs (libraries set it to 1 themselves).
            quiet = os.environ.get("TF_CPP_MIN_LOG_LEVEL") != "0"
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            with _native_stderr_quiet(quiet):
                try:
                    import tensorflow as tf_module  # pylint: disable=import-outside-toplevel
                except ImportError as e:  # pragma: no cover - depends on the install
                    raise ValueError(
                        "The tf.data input pipelines need TensorFlow and TFDS; install them with "
                        "pip install 'zkd_jax[data]', or use the on-device path "
                        "(zkd_jax.data.device) with arrays from elsewhere."
                    ) from e
                try:
                    tf_module.config.set_visible_devices([], "GPU")
                except (RuntimeError, ValueError):
                    # TF already initialised its devices (someone imported it first).
                    pass
            _TF_MODULE = tf_module
    return _TF_MODULE


def import_tfds():
    """Imports tensorflow_datasets (after :func:`import_tf`); returns the module. Needs TFDS."""
    import_tf()
    import tensorflow_datasets as tfds_module  # pylint: disable=import-outside-toplevel

    return tfds_module


class _LazyModule:
    """Attribute access imports the real module (``tf.cast`` works; ``import`` does not run)."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name: str):
        return getattr(self._loader(), name)


tf: Any = _LazyModule(import_tf)


def _missing_data_error(name: str, builder, cause: BaseException) -> ValueError:
    root = str(builder.data_dir_root)
    version_dir = str(builder.data_dir)
    if name.startswith("imagenet"):
        manual_dir = os.path.join(root, "downloads", "manual")
        how = (
            f"download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from image-net.org into "
            f"{manual_dir} and run again (TFDS then prepares the dataset once), or pass data_dir= "
            f"pointing to a directory that holds a prepared {name}"
        )
    else:
        how = (
            f"on a machine with network access run `tfds build {name} --data_dir={root}` "
            f"(or python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
            f"data_dir='{root}').download_and_prepare()\") and copy that directory here, or pass "
            f"data_dir= pointing to a directory that holds a prepared {name}"
        )
    return ValueError(
        f"TFDS dataset {name!r} is not prepared in {version_dir} and could not be prepared "
        f"({type(cause).__name__}: {' '.join(str(cause).split())[:240]}); {how}."
    )


# Hosts TFDS downloads CIFAR-100 from (its GCS mirror first, then the original site). Probing them
# turns an offline machine's 3+ minutes of download retries into an immediate error.
_DOWNLOAD_HOSTS = {"cifar100": ("storage.googleapis.com", "www.cs.toronto.edu")}


def _reachable(hosts: tuple[str, ...], timeout: float = 3.0) -> bool:
    for host in hosts:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            return True
        except OSError:
            continue
    return False


def prepared_builder(name: str, data_dir: str | None):
    """Returns ``tfds.builder(name, data_dir=...)`` after making sure its data is on disk.

    If the dataset is not prepared, TFDS is asked to prepare it (download for CIFAR-100, after a
    quick check that its download hosts answer; the manual tar files for ImageNet); any failure
    (offline, manual files absent) becomes ONE ``ValueError`` naming the directory TFDS looked in
    and how to provide the data. Needs TensorFlow and TFDS.
    """
    tfds = import_tfds()
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    hosts = _DOWNLOAD_HOSTS.get(name)
    # Probe only in front of TFDS's real downloader (tfds.testing.mock_data replaces it by a no-op).
    real_download = type(builder).download_and_prepare.__module__.startswith("tensorflow_datasets.core")
    if hosts and real_download and not _reachable(hosts):
        raise _missing_data_error(name, builder, ConnectionError(f"no network: cannot reach {' or '.join(hosts)}"))
    try:
        builder.download_and_prepare()
    except Exception as e:  # noqa: BLE001 - every failure here means "data not available"
        raise _missing_data_error(name, builder, e) from e
    return builder


def split_cardinality(ds, fallback: int | None = None) -> int:
    """Number of elements of a finite tf.data dataset (known for TFDS splits and mocks)."""
    n = int(ds.cardinality().numpy())
    if n >= 0:
        return n
    if fallback is not None:
        return fallback
    return sum(1 for _ in ds)


_ARRAY_CACHE: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] = {}


def clear_cache() -> None:
    """Forgets the split arrays cached by :func:`load_split_arrays` (tests; other data dirs)."""
    _ARRAY_CACHE.clear()


def load_split_arrays(
    name: str, split: str, data_dir: str | None, label_key: str = "label"
) -> tuple[np.ndarray, np.ndarray]:
    """A whole TFDS image split as NumPy: (images uint8 [N,H,W,3], labels int32 [N]).

    Cached per (name, split, data directory) for the life of the process, so that a trainer calling
    ``train_batches`` every epoch reads the files once. Only for splits that fit in host memory
    (CIFAR-100: 50,000 x 32 x 32 x 3 bytes = 150 MB). Needs TensorFlow and TFDS.
    """
    builder = prepared_builder(name, data_dir)
    key = (name, split, str(builder.data_dir))
    if key in _ARRAY_CACHE:
        return _ARRAY_CACHE[key]
    ds = builder.as_dataset(split=split, shuffle_files=False)
    ds = ds.map(lambda ex: (ex["image"], tf.cast(ex[label_key], tf.int32)))
    images, labels = [], []
    for img, lab in ds.batch(8192).as_numpy_iterator():
        images.append(img)
        labels.append(lab)
    if not images:
        raise ValueError(f"TFDS split {name}/{split} in {builder.data_dir} is empty; rebuild it.")
    out = (np.concatenate(images).astype(np.uint8), np.concatenate(labels).astype(np.int32))
    for array in out:
        array.flags.writeable = False  # shared by every caller of the cache
    _ARRAY_CACHE[key] = out
    return out
