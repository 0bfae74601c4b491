"""An offline teacher cache: per token, the teacher's top-k logits and its full-vocabulary statistics.

Run the teacher once over a dataset (:func:`write_teacher_cache`), then distil from the files
(:class:`TeacherCache`) with :func:`zkd_jax.topk_kd.topk_kd_loss` without the teacher in memory.
Per token the cache keeps the ``k`` largest logits' vocabulary ids (int32) and values (bfloat16 or
float32) and :class:`~zkd_jax.topk_kd.TeacherStats` (float32): the mean and standard deviation of
all ``V`` logits and the log-partition of the tempered (standardized, if so configured) logits, so
that the KD loss uses exactly the full teacher's probabilities on the top-k.

Format (version 1), in one directory; each process (host) ``h`` writes only its own files:

- ``host-{h:05d}.json``: ``{"format": 1, "config": {...}, "shards": [...], "complete": bool}``;
  ``config`` holds ``top_k``, ``vocab_size``, ``temperature``, ``standardize``, ``logits_dtype``,
  ``batches_per_shard``; each shard entry ``{"file", "batches", "size", "sha256"}``. Written
  atomically (temporary file, fsync, rename) after every shard: the list is what is on disk.
- ``host-{h:05d}-shard-{i:05d}.npz``: an uncompressed zip of ``.npy`` members (NumPy's ``npz``,
  readable with ``np.load``) with fixed timestamps, so equal contents give equal bytes. For the
  shard's ``j``-th batch: ``{j:05d}/indices`` int32 ``[..., k]``, ``{j:05d}/logits`` ``[..., k]``
  (bfloat16 stored as its uint16 bits), ``{j:05d}/mean``, ``/std``, ``/log_partition`` float32
  ``[...]`` (``...`` the batch's token axes, e.g. ``[batch, seq]``).

Batch ``n`` of the cache is the teacher's output on batch ``n`` of the dataset the writer was
given: read the student's data in the same order (same seed, same host split) and zip the two.
A killed writer, rerun with the same arguments, verifies the shards it listed, skips their batches
(without running the teacher) and continues; the files are then byte for byte those of an
uninterrupted write (the teacher must be deterministic). The reader checks every shard's SHA-256
(the checksum of :mod:`zkd_jax.io.manifest`) before using it and refuses a damaged one with one
line naming it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import ml_dtypes
import numpy as np
from etils import epath

from zkd_jax.io.manifest import _digest as sha256_of
from zkd_jax.topk_kd import TeacherStats, teacher_top_k

FORMAT = 1
LOGITS_DTYPES = ("bfloat16", "float32")
FIELDS = ("indices", "logits", "mean", "std", "log_partition")

__all__ = ["TeacherCache", "TeacherCacheError", "write_teacher_cache"]


class TeacherCacheError(ValueError):
    """A cache that cannot be used as asked (damaged shard, other settings); one line."""


def _manifest_path(directory: str, host: int) -> str:
    return os.path.join(directory, f"host-{host:05d}.json")


def _shard_name(host: int, index: int) -> str:
    return f"host-{host:05d}-shard-{index:05d}.npz"


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _zip_bytes(members: dict[str, np.ndarray]) -> bytes:
    """A deterministic npz: stored members, fixed timestamps and attributes, in the given order."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, array in members.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            npy = io.BytesIO()
            np.lib.format.write_array(npy, np.ascontiguousarray(array), allow_pickle=False)
            z.writestr(info, npy.getvalue())
    return buf.getvalue()


def _read_manifest(directory: str, host: int) -> dict | None:
    path = _manifest_path(directory, host)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise TeacherCacheError(f"teacher cache manifest {path} is unreadable ({e}); delete the "
                                "directory and write the cache again") from e


def _write_manifest(directory: str, host: int, manifest: dict) -> None:
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    _atomic_write(_manifest_path(directory, host), text.encode())


def _shard_ok(directory: str, entry: dict) -> bool:
    path = epath.Path(directory) / entry["file"]
    return path.exists() and path.stat().length == entry["size"] and sha256_of(path) == entry["sha256"]


def write_teacher_cache(
    directory: str,
    teacher_fn: Callable[[Any], jax.Array],
    batches: Iterable[Any],
    *,
    top_k: int,
    temperature: float,
    standardize: bool = True,
    logits_dtype: str = "bfloat16",
    batches_per_shard: int = 64,
    process_index: int | None = None,
) -> dict:
    """Runs ``teacher_fn`` over ``batches`` and writes (or completes) this host's cache files.

    Args:
      directory: the cache directory (created; shared by all hosts).
      teacher_fn: ``batch -> logits [..., V]`` (any JAX callable; deterministic).
      batches: this host's batches, in the order the student will read them; re-iterated from the
        start when a killed write is resumed (batches already written are skipped unread by the
        teacher).
      top_k: ``k`` logits kept per token.
      temperature, standardize: those of the log-partition stored (the loss must use the same).
      logits_dtype: ``"bfloat16"`` or ``"float32"`` for the top-k values.
      batches_per_shard: batches per shard file.
      process_index: this host's index (default ``jax.process_index()``).

    Returns:
      This host's manifest (``shards``, ``config``, ``complete``).
    """
    if logits_dtype not in LOGITS_DTYPES:
        raise TeacherCacheError(f"logits_dtype must be one of {LOGITS_DTYPES}, got {logits_dtype!r}")
    if not isinstance(top_k, int) or top_k < 1 or batches_per_shard < 1 or not temperature > 0:
        raise TeacherCacheError("top_k and batches_per_shard must be positive ints and temperature > 0; "
                                f"got {top_k!r}, {batches_per_shard!r}, {temperature!r}")
    host = jax.process_index() if process_index is None else process_index
    os.makedirs(directory, exist_ok=True)
    config = {"top_k": top_k, "temperature": float(temperature), "standardize": bool(standardize),
              "logits_dtype": logits_dtype, "batches_per_shard": batches_per_shard}
    manifest = _read_manifest(directory, host) or {"format": FORMAT, "config": None, "shards": [],
                                                   "complete": False}
    if manifest["config"] is not None:
        known = {k: v for k, v in manifest["config"].items() if k != "vocab_size"}
        if known != config:
            raise TeacherCacheError(f"{_manifest_path(directory, host)} was written with {known}, not "
                                    f"{config}: use another directory or the same settings")
    for i, entry in enumerate(manifest["shards"]):  # keep the verified prefix, rewrite the rest
        if not _shard_ok(directory, entry):
            manifest["shards"] = manifest["shards"][:i]
            break
    done = sum(e["batches"] for e in manifest["shards"])
    stats_of = jax.jit(lambda b: teacher_top_k(teacher_fn(b), top_k, temperature, standardize=standardize))
    pending: dict[str, np.ndarray] = {}
    count = 0

    def flush():
        nonlocal pending, count
        name = _shard_name(host, len(manifest["shards"]))
        _atomic_write(os.path.join(directory, name), _zip_bytes(pending))
        entry = {"file": name, "batches": count, "size": os.path.getsize(os.path.join(directory, name))}
        entry["sha256"] = sha256_of(epath.Path(directory) / name)
        manifest["shards"].append(entry)
        _write_manifest(directory, host, manifest)
        pending, count = {}, 0

    for n, batch in enumerate(batches):
        if n < done:
            continue
        idx, top, stats = jax.device_get(stats_of(batch))
        if manifest["config"] is None:
            manifest["config"] = dict(config, vocab_size=int(jax.eval_shape(teacher_fn, batch).shape[-1]))
        if logits_dtype == "bfloat16":
            top = np.asarray(top).astype(ml_dtypes.bfloat16).view(np.uint16)
        else:
            top = np.asarray(top, np.float32)
        arrays = dict(zip(FIELDS, (np.asarray(idx, np.int32), top, *(np.asarray(x, np.float32) for x in stats))))
        pending.update({f"{count:05d}/{k}": v for k, v in arrays.items()})
        count += 1
        if count == batches_per_shard:
            flush()
    if count:
        flush()
    manifest["complete"] = True
    _write_manifest(directory, host, manifest)
    return manifest


class TeacherCache:
    """This host's batches of a cache written by :func:`write_teacher_cache`, in write order.

    ``cache[n]`` / iteration yield ``{"indices": int32 [..., k], "logits": float32 [..., k],
    "stats": TeacherStats}`` (NumPy). Each shard's checksum is verified when it is first read.

    >>> # for batch, cached in zip(student_batches, TeacherCache(path)): ...
    """

    def __init__(self, directory: str, *, process_index: int | None = None):
        self.directory = directory
        self.host = jax.process_index() if process_index is None else process_index
        manifest = _read_manifest(directory, self.host)
        if manifest is None:
            raise TeacherCacheError(f"no teacher cache for host {self.host} in {directory} "
                                    f"({os.path.basename(_manifest_path(directory, self.host))} is missing)")
        if manifest.get("format") != FORMAT:
            raise TeacherCacheError(f"{_manifest_path(directory, self.host)} has format "
                                    f"{manifest.get('format')}, this reader reads {FORMAT}")
        if not manifest["complete"]:
            raise TeacherCacheError(f"the teacher cache in {directory} is incomplete (its writer "
                                    "stopped): rerun the writer with the same arguments to finish it")
        self.config: dict = manifest["config"]
        self.shards: list[dict] = manifest["shards"]
        self._starts = np.cumsum([0] + [s["batches"] for s in self.shards])
        self._open: tuple[int, Any] | None = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def check(self, *, temperature: float, standardize: bool) -> None:
        """Refuses (one line) a loss whose temperature or standardization differs from the cache's."""
        if (float(temperature), bool(standardize)) != (self.config["temperature"], self.config["standardize"]):
            raise TeacherCacheError(
                f"the teacher cache in {self.directory} holds log-partitions at temperature "
                f"{self.config['temperature']} with standardize={self.config['standardize']}; the loss "
                f"asks for {temperature} and {standardize}: use those or write another cache")

    def _shard(self, i: int):
        if self._open is None or self._open[0] != i:
            entry = self.shards[i]
            path = os.path.join(self.directory, entry["file"])
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise TeacherCacheError(f"teacher cache shard {path} cannot be read ({e.strerror})") from e
            if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise TeacherCacheError(f"teacher cache shard {path} is damaged (its checksum does not "
                                        "match the manifest); write the cache again")
            self._open = (i, np.load(io.BytesIO(data)))
        return self._open[1]

    def __getitem__(self, n: int) -> dict:
        if not 0 <= n < len(self):
            raise IndexError(f"batch {n} of a cache of {len(self)}")
        i = int(np.searchsorted(self._starts, n, side="right") - 1)
        z, j = self._shard(i), n - int(self._starts[i])
        get = lambda k: z[f"{j:05d}/{k}"]  # noqa: E731
        logits = get("logits")
        if self.config["logits_dtype"] == "bfloat16":
            logits = logits.view(ml_dtypes.bfloat16)
        return {"indices": get("indices"), "logits": logits.astype(np.float32),
                "stats": TeacherStats(get("mean"), get("std"), get("log_partition"))}

    def __iter__(self) -> Iterator[dict]:
        return (self[n] for n in range(len(self)))
