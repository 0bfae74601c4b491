"""Read PyTorch ``torch.save`` files into NumPy without importing torch, and without running code.

A checkpoint is untrusted input: pickle can call any importable function. The unpickler here
resolves only the globals needed to rebuild tensors and plain containers:

- ``collections.OrderedDict``;
- ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_tensor``, ``_rebuild_parameter`` /
  ``_rebuild_parameter_with_state``, ``torch._tensor._rebuild_from_type_v2`` (for plain tensors and
  ``nn.Parameter`` only);
- the typed storage classes ``torch.FloatStorage``, ``HalfStorage``, ``BFloat16Storage``,
  ``DoubleStorage``, ``LongStorage``, ``IntStorage``, ``ShortStorage``, ``CharStorage``,
  ``ByteStorage``, ``BoolStorage`` and their ``torch.cuda.*`` twins (used as dtype tags; nothing
  of torch is imported; the saved device is ignored).

Any other global (``os.system``, ``builtins.eval``, a pickled ``nn.Module`` ...) raises
:class:`UnsafeCheckpointError` before it is called. The rebuilding functions are our own: they check
every offset, size and stride against the storage they index, and they return inert placeholders
that cannot be mutated by the pickle; arrays are materialized after unpickling.

Formats: the zip format of PyTorch >= 1.6 (``<name>/data.pkl`` + ``<name>/data/<key>`` +
``<name>/version``, optional ``<name>/byteorder``) and the legacy stream format of PyTorch < 1.6
(magic number, protocol version, system info, the object pickle, the list of storage keys, then each
storage as an int64 element count followed by its bytes). The pre-0.4 tar format is not supported.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

__all__ = ["UnsafeCheckpointError", "load_torch_file"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class UnsafeCheckpointError(ValueError):
    """The file asks the unpickler for something other than tensors and plain containers."""


class _Frozen:
    """Base of the placeholders: attributes cannot be set by a pickle's BUILD opcode."""

    __slots__ = ()

    def __setattr__(self, key: str, value: Any) -> None:
        raise UnsafeCheckpointError(
            f"the checkpoint tries to set attribute {key!r} on a {type(self).__name__}; "
            "refusing it."
        )

    def _init(self, **fields: Any) -> None:
        for k, v in fields.items():
            object.__setattr__(self, k, v)


class _StorageType(_Frozen):
    """Stands for ``torch.<X>Storage``: only its dtype matters."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str) -> None:
        self._init(name=name, dtype=_STORAGE_DTYPES[name])


class _TensorType(_Frozen):
    """Stands for ``torch.Tensor`` / ``torch.nn.Parameter`` in ``_rebuild_from_type_v2``."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self._init(name=name)


class _Storage(_Frozen):
    """A flat typed buffer; ``data`` is set when the bytes are read (legacy: after the pickle)."""

    __slots__ = ("key", "dtype", "numel", "data", "root", "offset")

    def __init__(
        self, key: str, dtype: np.dtype, numel: int, root: _Storage | None = None, offset: int = 0
    ):
        self._init(key=key, dtype=dtype, numel=numel, data=None, root=root, offset=offset)

    def set_data(self, data: np.ndarray) -> None:
        object.__setattr__(self, "data", data)

    def array(self) -> np.ndarray:
        if self.root is not None:
            return self.root.array()[self.offset : self.offset + self.numel]
        if self.data is None:
            raise ValueError(
                f"storage {self.key!r} has no data in the file; the checkpoint is truncated."
            )
        return self.data


class _Tensor(_Frozen):
    """A tensor to be materialized from its storage once all bytes are known."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(
        self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]
    ):
        self._init(storage=storage, offset=offset, size=size, stride=stride)

    def materialize(self) -> np.ndarray:
        data = self.storage.array()
        dtype = self.storage.dtype
        if any(s == 0 for s in self.size):
            return np.zeros(self.size, dtype)
        last = self.offset + sum((n - 1) * st for n, st in zip(self.size, self.stride, strict=True))
        if last >= data.shape[0]:
            raise ValueError(
                f"a tensor of size {self.size} (offset {self.offset}, stride {self.stride}) reads "
                f"past its storage of {data.shape[0]} elements; the checkpoint is corrupt."
            )
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :],
            shape=self.size,
            strides=tuple(st * dtype.itemsize for st in self.stride),
            writeable=False,
        )
        return np.array(view, dtype=dtype.newbyteorder("=") if dtype.byteorder != "|" else dtype)


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise ValueError(
            f"tensor {what} {value!r} is not a tuple of non-negative ints; the checkpoint is "
            "corrupt."
        )
    return tuple(value)


def _rebuild_tensor(
    storage: Any, storage_offset: Any, size: Any, stride: Any, *unused: Any
) -> _Tensor:
    """``torch._utils._rebuild_tensor[_v2](storage, offset, size, stride, [grad, hooks, meta])``."""
    if not isinstance(storage, _Storage):
        raise UnsafeCheckpointError(
            "a tensor is rebuilt from something that is not a storage; refusing it."
        )
    if (
        not isinstance(storage_offset, int)
        or isinstance(storage_offset, bool)
        or storage_offset < 0
    ):
        raise ValueError(f"tensor offset {storage_offset!r} is invalid; the checkpoint is corrupt.")
    size_t, stride_t = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size_t) != len(stride_t):
        raise ValueError("tensor size and stride differ in length; the checkpoint is corrupt.")
    return _Tensor(storage, storage_offset, size_t, stride_t)


def _rebuild_parameter(data: Any, *unused: Any) -> _Tensor:
    """``torch._utils._rebuild_parameter[_with_state](data, grad, hooks, [state])``: the data."""
    if not isinstance(data, _Tensor):
        raise UnsafeCheckpointError(
            "a parameter wraps something that is not a tensor; refusing it."
        )
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> _Tensor:
    """``torch._tensor._rebuild_from_type_v2``, for plain tensors and parameters only."""
    if func not in (_rebuild_tensor, _rebuild_parameter) or not isinstance(new_type, _TensorType):
        raise UnsafeCheckpointError("a tensor subclass or unknown rebuild function; refusing it.")
    if not isinstance(args, tuple):
        raise ValueError("tensor rebuild arguments are not a tuple; the checkpoint is corrupt.")
    return func(*args)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TensorType("Tensor"),
    ("torch.nn.parameter", "Parameter"): _TensorType("Parameter"),
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
    # Legacy files written from GPU tensors (PyTorch < 1.6) name the CUDA storage classes.
    **{("torch.cuda", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only :data:`_ALLOWED_GLOBALS`; storages come from ``storage_loader``."""

    def __init__(self, file: BinaryIO, storage_loader: Any = None) -> None:
        super().__init__(file)
        self._storage_loader = storage_loader

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise UnsafeCheckpointError(
                f"the checkpoint references {module}.{name}, which is neither a tensor nor a plain "
                "container; refusing to load it (only state dicts of tensors can be read)."
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if (
            not isinstance(pid, tuple)
            or not pid
            or (pid[0] if isinstance(pid[0], str) else bytes(pid[0]).decode("ascii", "replace"))
            != "storage"
            or self._storage_loader is None
        ):
            raise UnsafeCheckpointError(
                f"the checkpoint holds a persistent object {str(pid)[:80]!r} that is not a tensor "
                "storage (a pickled module?); refusing it."
            )
        return self._storage_loader(pid[1:])


def _check_storage_args(storage_type: Any, key: Any, numel: Any) -> str:
    if not isinstance(storage_type, _StorageType):
        raise UnsafeCheckpointError("a storage of unknown type; refusing it.")
    if isinstance(key, bytes):
        key = key.decode("ascii", "replace")
    if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
        raise ValueError("a storage record is malformed; the checkpoint is corrupt.")
    return key


def _load_zip(raw: bytes) -> Any:
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise ValueError(
                "the zip file has no single '<name>/data.pkl'; it is not a torch.save file."
            )
        prefix = pkls[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in zf.namelist():
            byteorder = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
        storages: dict[str, _Storage] = {}

        def load_storage(args: tuple) -> _Storage:
            if len(args) != 4:
                raise ValueError("a storage record is malformed; the checkpoint is corrupt.")
            storage_type, key, _location, numel = args
            key = _check_storage_args(storage_type, key, numel)
            if key not in storages:
                dtype = storage_type.dtype
                if byteorder == "big" and dtype.itemsize > 1:
                    dtype = dtype.newbyteorder(">")
                nbytes = numel * dtype.itemsize
                try:
                    buf = zf.read(f"{prefix}data/{key}")
                except KeyError:
                    raise ValueError(
                        f"storage {key!r} is missing from the zip; the checkpoint is truncated."
                    ) from None
                if len(buf) < nbytes:
                    raise ValueError(
                        f"storage {key!r} holds {len(buf)} bytes, {nbytes} expected; the "
                        "checkpoint is corrupt."
                    )
                storage = _Storage(key, dtype, numel)
                storage.set_data(np.frombuffer(buf, dtype=dtype, count=numel))
                storages[key] = storage
            return storages[key]

        with zf.open(pkls[0]) as f:
            return _RestrictedUnpickler(f, load_storage).load()


def _load_legacy(raw: bytes) -> Any:
    f = io.BytesIO(raw)
    try:
        magic = _RestrictedUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        if isinstance(e, UnsafeCheckpointError):
            raise
        raise ValueError(
            f"not a PyTorch checkpoint (neither a zip nor a legacy torch.save stream): {e}"
        ) from None
    if magic != _LEGACY_MAGIC:
        raise ValueError("not a PyTorch checkpoint (bad magic number); is it a torch.save file?")
    if _RestrictedUnpickler(f).load() != _LEGACY_PROTOCOL:
        raise ValueError("unsupported legacy torch.save protocol version.")
    sys_info = _RestrictedUnpickler(f).load()
    if isinstance(sys_info, Mapping) and not sys_info.get("little_endian", True):
        raise ValueError(
            "big-endian legacy checkpoints are not supported; re-save it with torch >= 1.6."
        )
    storages: dict[str, _Storage] = {}

    def load_storage(args: tuple) -> _Storage:
        if len(args) != 5:
            raise ValueError("a storage record is malformed; the checkpoint is corrupt.")
        storage_type, key, _location, numel, view = args
        key = _check_storage_args(storage_type, key, numel)
        if key not in storages:
            storages[key] = _Storage(key, storage_type.dtype, numel)
        root = storages[key]
        if view is None:
            return root
        if not (isinstance(view, tuple) and len(view) == 3):
            raise ValueError("a storage view record is malformed; the checkpoint is corrupt.")
        view_key, offset, view_size = view
        if (
            not all(isinstance(v, int) and v >= 0 for v in (offset, view_size))
            or offset + view_size > numel
        ):
            raise ValueError("a storage view lies outside its storage; the checkpoint is corrupt.")
        view_key = f"view:{view_key}"
        if view_key not in storages:
            storages[view_key] = _Storage(view_key, root.dtype, view_size, root=root, offset=offset)
        return storages[view_key]

    result = _RestrictedUnpickler(f, load_storage).load()
    keys = _RestrictedUnpickler(f).load()
    if not isinstance(keys, list):
        raise ValueError("the legacy storage key list is malformed; the checkpoint is corrupt.")
    for key in keys:
        key = key.decode("ascii") if isinstance(key, bytes) else key
        if key not in storages:
            raise ValueError(
                f"storage {key!r} is listed but never used; the checkpoint is corrupt."
            )
        storage = storages[key]
        (numel,) = struct.unpack("<q", f.read(8))
        if numel != storage.numel:
            raise ValueError(
                f"storage {key!r} has {numel} elements, {storage.numel} expected; corrupt file."
            )
        nbytes = numel * storage.dtype.itemsize
        buf = f.read(nbytes)
        if len(buf) != nbytes:
            raise ValueError(f"storage {key!r} is truncated; the checkpoint is incomplete.")
        storage.set_data(np.frombuffer(buf, dtype=storage.dtype, count=numel))
    return result


def _materialize(obj: Any) -> Any:
    """Replace every placeholder tensor by a NumPy array, through plain containers."""
    if isinstance(obj, _Tensor):
        return obj.materialize()
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _materialize(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _materialize(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialize(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialize(v) for v in obj)
    if isinstance(obj, _Frozen):
        raise ValueError(
            f"the checkpoint holds a bare {type(obj).__name__.strip('_')}; only tensors are "
            "supported."
        )
    return obj


def load_torch_file(raw: bytes) -> Any:
    """Unpickle the bytes of a ``torch.save`` file: tensors become NumPy arrays (native byte order).

    Raises :class:`UnsafeCheckpointError` (a ``ValueError``) for anything but tensors and plain
    containers, ``ValueError`` for a malformed file.
    """
    try:
        obj = _load_zip(raw) if raw[:4] == b"PK\x03\x04" else _load_legacy(raw)
    except UnsafeCheckpointError:
        raise
    except (
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        EOFError,
        AttributeError,
        TypeError,
        IndexError,
        KeyError,
        struct.error,
        UnicodeDecodeError,
    ) as e:
        raise ValueError(
            f"the checkpoint is malformed ({type(e).__name__}: {e}); is it a torch.save file?"
        ) from None
    return _materialize(obj)
