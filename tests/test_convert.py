"""PyTorch checkpoints without torch: safe reader, state_dict mapping, orbax storage, the CLI.

The ``.pth`` files are written here, without torch, in PyTorch's two formats: the zip format
(``<name>/data.pkl`` pickled with protocol 2 and persistent-id storages, ``<name>/data/<key>`` raw
little-endian bytes, ``<name>/version``) and the legacy stream of PyTorch < 1.6.
"""

from __future__ import annotations

import collections
import importlib.util
import io
import json
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpu_devices import with_devices
from zkd_jax import models
from zkd_jax.cli import convert as convert_cli
from zkd_jax.io import torch_weights as convert
from zkd_jax.io.torch_pickle import UnsafeCheckpointError

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
ARCHS = json.loads((FIXTURES / "architectures.json").read_text())

# --------------------------------------------------------------------------------------------------
# A minimal torch.save writer (no torch): tensors pickle as torch._utils._rebuild_tensor_v2 calls
# --------------------------------------------------------------------------------------------------

_STORAGE_NAMES = {
    np.dtype("float32"): "FloatStorage",
    np.dtype("float64"): "DoubleStorage",
    np.dtype("float16"): "HalfStorage",
    np.dtype("int64"): "LongStorage",
    np.dtype("int32"): "IntStorage",
    np.dtype("uint8"): "ByteStorage",
    np.dtype("bool"): "BoolStorage",
}


class _Global:
    """Pickles as ``GLOBAL module name`` whether or not that module exists here."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle wants a callable in a reduce tuple; never called
        raise AssertionError("not to be called")


class _Storage:
    def __init__(self, key: str, data: np.ndarray):
        self.key, self.data = key, np.array(data, order="C").reshape(-1)


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce_ex__(self, protocol):
        args = (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict())
        return _Global("torch._utils", "_rebuild_tensor_v2"), args


def _tensor(array: np.ndarray, key: str) -> _Tensor:
    array = np.array(array, order="C")  # (np.ascontiguousarray would make 0-d arrays 1-d)
    strides = tuple(s // array.itemsize for s in array.strides)
    return _Tensor(_Storage(key, array), 0, tuple(array.shape), strides)


class _TorchPickler(pickle._Pickler):  # the pure-Python pickler, so that _Global can be dispatched
    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file, legacy: bool = False):
        super().__init__(file, protocol=2)
        self.legacy = legacy
        # PyTorch < 1.6 named the storage class of GPU tensors torch.cuda.FloatStorage etc.
        self.storage_module = "torch.cuda" if legacy else "torch"
        self.storages: dict[str, _Storage] = {}

    def persistent_id(self, obj):
        if not isinstance(obj, _Storage):
            return None
        self.storages[obj.key] = obj
        record = (
            "storage",
            _Global(self.storage_module, _STORAGE_NAMES[obj.data.dtype]),
            obj.key,
            "cuda:0" if self.legacy else "cpu",
            obj.data.size,
        )
        return record + (None,) if self.legacy else record

    def _save_global(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
        self.memoize(obj)

    dispatch[_Global] = _save_global


def write_zip_pth(path: pathlib.Path, obj, prefix: str = "archive") -> None:
    buf = io.BytesIO()
    pickler = _TorchPickler(buf)
    pickler.dump(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{prefix}/data.pkl", buf.getvalue())
        zf.writestr(f"{prefix}/byteorder", "little")
        for key, storage in pickler.storages.items():
            zf.writestr(
                f"{prefix}/data/{key}",
                storage.data.astype(storage.data.dtype.newbyteorder("<")).tobytes(),
            )
        zf.writestr(f"{prefix}/version", "3\n")


def write_legacy_pth(path: pathlib.Path, obj) -> None:
    buf = io.BytesIO()
    pickle.dump(0x1950A86A20F9469CFC6C, buf, protocol=2)
    pickle.dump(1001, buf, protocol=2)
    pickle.dump(
        {
            "protocol_version": 1001,
            "little_endian": True,
            "type_sizes": {"short": 2, "int": 4, "long": 8},
        },
        buf,
        protocol=2,
    )
    pickler = _TorchPickler(buf, legacy=True)
    pickler.dump(obj)
    keys = sorted(pickler.storages)
    pickle.dump(keys, buf, protocol=2)
    for key in keys:
        data = pickler.storages[key].data
        buf.write(struct.pack("<q", data.size))
        buf.write(data.astype(data.dtype.newbyteorder("<")).tobytes())
    path.write_bytes(buf.getvalue())


def state_dict_of(arch_key: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 arrays in the reference layout (num_batches_tracked as int64 scalars)."""
    rng = np.random.default_rng(seed)
    sd = collections.OrderedDict()
    for key, shape in ARCHS[arch_key]["state_dict"]:
        if key.endswith("num_batches_tracked"):
            sd[key] = np.array(7, np.int64)
        elif key.endswith("running_var"):
            sd[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        else:
            sd[key] = rng.standard_normal(shape).astype(np.float32)
    return sd


def as_torch(sd: dict[str, np.ndarray]) -> collections.OrderedDict:
    return collections.OrderedDict((k, _tensor(v, str(i))) for i, (k, v) in enumerate(sd.items()))


# --------------------------------------------------------------------------------------------------
# Reading .pth files
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("writer", [write_zip_pth, write_legacy_pth], ids=["zip", "legacy"])
def test_pth_round_trip_plain_state_dict(tmp_path, writer):
    rng = np.random.default_rng(0)
    sd = collections.OrderedDict(
        w=rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        h=rng.standard_normal((5,)).astype(np.float16),
        d=rng.standard_normal((2, 2)),
        n=np.array(12, np.int64),
        b=np.array([True, False]),
    )
    obj = as_torch(sd)
    # Views: a transposed tensor and an offset slice sharing one storage.
    base = np.arange(24, dtype=np.float32)
    shared = _Storage("shared", base)
    obj["t"] = _Tensor(shared, 0, (4, 6), (1, 4))  # column-major view
    obj["s"] = _Tensor(shared, 5, (3,), (2,))
    writer(tmp_path / "a.pth", obj)
    got = convert.load_torch_checkpoint(tmp_path / "a.pth")
    assert list(got) == list(sd) + ["t", "s"]
    for k, v in sd.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        np.testing.assert_array_equal(got[k], v)
    np.testing.assert_array_equal(got["t"], base.reshape(6, 4).T)
    np.testing.assert_array_equal(got["s"], [5.0, 7.0, 9.0])


def test_mdistiller_wrapping_is_unwrapped(tmp_path):
    sd = {"fc.weight": np.ones((3, 2), np.float32), "fc.bias": np.zeros(3, np.float32)}
    ckpt = {
        "epoch": 240,
        "model": as_torch(sd),
        "best_acc": _tensor(np.array(79.42, np.float32), "acc"),
        "optimizer": {
            "state": {0: {"momentum_buffer": _tensor(np.ones(3, np.float32), "m")}},
            "param_groups": [{"lr": 0.05, "momentum": 0.9, "nesterov": False, "params": [0]}],
        },
    }
    write_zip_pth(tmp_path / "ckpt_epoch_240.pth", ckpt, prefix="ckpt_epoch_240")
    got = convert.load_torch_checkpoint(tmp_path / "ckpt_epoch_240.pth")
    assert sorted(got) == sorted(sd)
    np.testing.assert_array_equal(got["fc.weight"], sd["fc.weight"])


class _Evil:
    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _zip_with_pickle(path: pathlib.Path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/version", "3\n")


def test_crafted_pickle_calling_os_system_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Evil(marker), protocol=2)
    assert b"system" in evil
    _zip_with_pickle(tmp_path / "evil.pth", evil)
    with pytest.raises(UnsafeCheckpointError, match=r"system.*refusing"):
        convert.load_torch_checkpoint(tmp_path / "evil.pth")
    # Hidden inside an otherwise valid state dict, and as a legacy stream.
    obj = as_torch({"fc.bias": np.zeros(2, np.float32)})
    obj["fc.weight"] = _Evil(marker)
    write_zip_pth(tmp_path / "evil2.pth", obj)
    with pytest.raises(UnsafeCheckpointError):
        convert.load_torch_checkpoint(tmp_path / "evil2.pth")
    (tmp_path / "evil3.pth").write_bytes(evil)
    with pytest.raises(UnsafeCheckpointError):
        convert.load_torch_checkpoint(tmp_path / "evil3.pth")
    assert not marker.exists()  # nothing ran


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps(eval, protocol=2),  # builtins.eval
        b"\x80\x02cbuiltins\nexec\nX\x05\x00\x00\x00pass\n\x85R.",  # exec("pass")
        b"\x80\x02(X\x06\x00\x00\x00moduleq\x00tQ.",  # a pickled nn.Module (persistent id)
        b"\x80\x02ctorch.nn.modules.conv\nConv2d\n)\x81.",  # an nn.Module object
    ],
)
def test_other_globals_and_persistent_objects_are_refused(tmp_path, payload):
    _zip_with_pickle(tmp_path / "x.pth", payload)
    with pytest.raises(UnsafeCheckpointError, match="refusing"):
        convert.load_torch_checkpoint(tmp_path / "x.pth")


def test_corrupt_tensors_are_rejected_not_read_out_of_bounds(tmp_path):
    storage = _Storage("0", np.zeros(4, np.float32))
    write_zip_pth(tmp_path / "big.pth", {"w": _Tensor(storage, 2, (3,), (1,))})
    with pytest.raises(ValueError, match="past its storage"):
        convert.load_torch_checkpoint(tmp_path / "big.pth")
    write_zip_pth(tmp_path / "neg.pth", {"w": _Tensor(storage, 0, (2,), (-1,))})
    with pytest.raises(ValueError, match="stride"):
        convert.load_torch_checkpoint(tmp_path / "neg.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError):
        convert.load_torch_checkpoint(tmp_path / "junk.pth")
    write_zip_pth(tmp_path / "list.pth", [_tensor(np.zeros(2, np.float32), "0")])
    with pytest.raises(ValueError, match="no state dict"):
        convert.load_torch_checkpoint(tmp_path / "list.pth")


# --------------------------------------------------------------------------------------------------
# state_dict -> variables
# --------------------------------------------------------------------------------------------------


def test_layouts_transpose_and_names():
    sd = state_dict_of("cifar/resnet8x4")
    v = convert.from_torch_state_dict("resnet8x4", sd)
    p, s = v["params"], v["batch_stats"]
    w = sd["layer2.0.conv1.weight"]  # (out, in, kh, kw) = (128, 64, 3, 3)
    assert p["layer2_0"]["conv1"]["kernel"].shape == (3, 3, 64, 128)
    assert p["layer2_0"]["conv1"]["kernel"][2, 1, 5, 7] == w[7, 5, 2, 1]
    assert p["fc"]["kernel"][3, 9] == sd["fc.weight"][9, 3]
    np.testing.assert_array_equal(
        p["layer1_0"]["downsample_1"]["scale"], sd["layer1.0.downsample.1.weight"]
    )
    np.testing.assert_array_equal(s["layer3_0"]["bn2"]["var"], sd["layer3.0.bn2.running_var"])
    model = models.create("resnet8x4", num_classes=100)
    models.check_variables(models.abstract_variables(model), v, what="converted variables")
    assert all(a.dtype == np.float32 for a in jax.tree.leaves(v))


def test_dataparallel_prefix_and_num_classes_inferred():
    sd = state_dict_of("cifar/wrn_16_1")
    sd["fc.weight"], sd["fc.bias"] = sd["fc.weight"][:10], sd["fc.bias"][:10]
    v = convert.from_torch_state_dict("wrn_16_1", {f"module.{k}": a for k, a in sd.items()})
    assert v["params"]["fc"]["kernel"].shape == (64, 10)
    assert v["params"]["block1"]["layer_0"]["bn1"]["scale"].shape == (16,)


def test_mismatches_raise_one_error_naming_the_key_and_both_shapes():
    sd = state_dict_of("cifar/resnet8")
    bad = dict(sd)
    bad["layer2.0.conv1.weight"] = np.zeros((32, 16, 1, 1), np.float32)
    with pytest.raises(
        ValueError,
        match=r"'layer2\.0\.conv1\.weight' has shape \(32, 16, 1, 1\) but the "
        r"model expects \(32, 16, 3, 3\)",
    ):
        convert.from_torch_state_dict("resnet8", bad)
    missing = {k: a for k, a in sd.items() if k != "layer3.0.bn1.running_var"}
    with pytest.raises(
        ValueError, match=r"'layer3\.0\.bn1\.running_var' \(shape \(64,\)\) is missing"
    ):
        convert.from_torch_state_dict("resnet8", missing)
    extra = {**sd, "fc2.weight_extra": np.zeros(3, np.float32)}
    with pytest.raises(
        ValueError, match=r"'fc2\.weight_extra' \(shape \(3,\)\) is not part of the model"
    ):
        convert.from_torch_state_dict("resnet8", extra)
    with pytest.raises(
        ValueError, match=r"resnet14.*'layer1\.1\.[a-z0-9.]+' \(shape \(\d+.*missing.*check --arch"
    ):
        convert.from_torch_state_dict("resnet14", sd)  # another architecture's checkpoint
    with pytest.raises(ValueError, match="Unknown architecture"):
        convert.from_torch_state_dict("resnet9", sd)


def test_check_variables_on_variable_trees():
    expected = {
        "params": {"fc": {"kernel": np.zeros((4, 3)), "bias": np.zeros(3)}},
        "batch_stats": {"bn": {"mean": np.zeros(4)}},
    }
    models.check_variables(expected, jax.tree.map(np.ones_like, expected), what="x")
    wrong = {
        "params": {"fc": {"kernel": np.zeros((4, 10)), "bias": np.zeros(10)}},
        "batch_stats": {"bn": {"mean": np.zeros(4)}},
    }
    with pytest.raises(ValueError) as e:
        models.check_variables(
            expected, wrong, what="teacher checkpoint /t", hint="convert the right one"
        )
    msg = str(e.value)
    assert msg.startswith(
        "teacher checkpoint /t does not match the model: key 'params/fc/kernel' has "
        "shape (4, 10) but the model expects (4, 3)"
    )
    assert "0 missing, 0 unexpected, 2 with a wrong shape" in msg and msg.endswith(
        "convert the right one."
    )
    with pytest.raises(ValueError, match="'batch_stats/bn/mean' \\(shape \\(4,\\)\\) is missing"):
        models.check_variables(expected, {"params": expected["params"]}, what="v")


# --------------------------------------------------------------------------------------------------
# orbax storage and the zkd-convert command
# --------------------------------------------------------------------------------------------------


def test_save_and_load_variables_round_trip(tmp_path):
    v = convert.from_torch_state_dict("resnet8", state_dict_of("cifar/resnet8", seed=3))
    convert.save_variables(tmp_path / "t", v, arch="resnet8", dataset="cifar100", num_classes=100)
    got, meta = convert.load_variables(str(tmp_path / "t"))
    assert (
        meta["arch"] == "resnet8" and meta["dataset"] == "cifar100" and meta["num_classes"] == 100
    )
    assert jax.tree.structure(got) == jax.tree.structure(v)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(v), strict=True):
        assert isinstance(a, np.ndarray) and a.dtype == np.float32
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="already exists"):
        convert.save_variables(
            tmp_path / "t", v, arch="resnet8", dataset="cifar100", num_classes=100
        )
    with pytest.raises(ValueError, match="not a zkd_jax variables checkpoint"):
        convert.load_variables(tmp_path)
    # Overwriting, with JAX arrays as a trainer holds them.
    v2 = jax.tree.map(lambda a: jnp.asarray(a) * 2, v)
    convert.save_variables(
        tmp_path / "t", v2, arch="resnet8", dataset="cifar10", num_classes=100, overwrite=True
    )
    got2, meta2 = convert.load_variables(tmp_path / "t")
    assert meta2["dataset"] == "cifar10"
    np.testing.assert_array_equal(got2["params"]["fc"]["kernel"], 2 * v["params"]["fc"]["kernel"])


def test_variables_saved_sharded_on_4_devices_load_on_1(tmp_path):
    """A teacher written by a multi-device run loads anywhere (as host NumPy arrays)."""
    code = textwrap.dedent(
        f"""
        import jax, jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec as P
        from zkd_jax.io import torch_weights as convert
        mesh = jax.make_mesh((4,), ("data",))
        kernel = jnp.arange(32.0).reshape(8, 4)
        rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        v = {{"params": {{"fc": {{"kernel": jax.device_put(kernel, rows),
                                 "bias": jax.device_put(jnp.ones(4), replicated)}}}},
             "batch_stats": {{"bn": {{"var": jax.device_put(jnp.ones(4), replicated)}}}}}}
        convert.save_variables({str(tmp_path / "t")!r}, v, arch="resnet8", dataset="cifar100",
                               num_classes=4)
        """
    )
    env = {
        **os.environ,
        "XLA_FLAGS": with_devices(4),
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, meta = convert.load_variables(tmp_path / "t")
    assert meta["num_classes"] == 4
    assert isinstance(got["params"]["fc"]["kernel"], np.ndarray)
    np.testing.assert_array_equal(got["params"]["fc"]["kernel"], np.arange(32.0).reshape(8, 4))
    np.testing.assert_array_equal(got["batch_stats"]["bn"]["var"], np.ones(4))


def test_zkd_convert_command(tmp_path, capsys):
    sd = state_dict_of("cifar/vgg8", seed=1)
    write_zip_pth(tmp_path / "vgg8.pth", {"model": as_torch(sd), "epoch": 240})
    assert convert_cli.run([str(tmp_path / "vgg8.pth"), str(tmp_path / "out"), "--arch", "vgg8"]) == 0
    assert "wrote vgg8 (cifar100, 100 classes" in capsys.readouterr().out
    got, meta = convert.load_variables(tmp_path / "out")
    assert meta == {"arch": "vgg8", "dataset": "cifar100", "num_classes": 100, "format": 1}
    want = convert.from_torch_state_dict("vgg8", sd)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    # A user error: exit status 2 and one line naming the problem.
    assert convert_cli.run([str(tmp_path / "vgg8.pth"), str(tmp_path / "o2"), "--arch", "vgg11"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zkd-convert: error: the PyTorch state_dict given for vgg11")
    assert "'block2.3.weight' (shape (256, 256, 3, 3)) is missing" in err, err
    assert not (tmp_path / "o2").exists()


def _golden_module():
    """``test_models_golden`` (generator, fixtures) loaded by path, whatever the import mode."""
    path = pathlib.Path(__file__).with_name("test_models_golden.py")
    spec = importlib.util.spec_from_file_location("_zkd_models_golden", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_published_teacher_flow_reproduces_reference_logits(tmp_path):
    """A legacy-format, GPU-saved, mdistiller-wrapped checkpoint (like cifar_teachers.tar's) of the
    reference generator's weights -> zkd-convert -> load_variables -> the reference's logits."""
    golden = _golden_module()
    sd = golden.reference_state_dict("cifar/resnet8")
    ckpt = {"epoch": 240, "model": as_torch(sd), "accuracy": _tensor(np.array(70.0), "acc")}
    write_legacy_pth(tmp_path / "ckpt_epoch_240.pth", ckpt)
    assert (
        convert_cli.run(
            [str(tmp_path / "ckpt_epoch_240.pth"), str(tmp_path / "t"), "--arch", "resnet8"]
        )
        == 0
    )
    variables, meta = convert.load_variables(tmp_path / "t")
    model = models.create(meta["arch"], num_classes=meta["num_classes"], dataset=meta["dataset"])
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(
        variables, golden.golden_input("cifar")
    )
    golden.assert_close(
        logits, golden.GOLDEN["cifar/resnet8/eval_logits"], 1e-4, "resnet8 via .pth"
    )


# --------------------------------------------------------------------------------------------------
# The ViT reference (pycls: weights under "model_state"; issue 17)
# --------------------------------------------------------------------------------------------------

VIT_ARCHS = json.loads((FIXTURES / "architectures_vit.json").read_text())


@pytest.mark.parametrize("arch,dataset", [("pit_ti", "cifar100_224"), ("resnet56", "cifar100")])
def test_zkd_convert_reads_pycls_checkpoints(tmp_path, arch, dataset):
    rng = np.random.default_rng(0)
    sd = collections.OrderedDict(
        (k, np.array(3, np.int64) if k.endswith("num_batches_tracked")
         else rng.uniform(0.5, 2.0, s).astype(np.float32))
        for k, s in VIT_ARCHS[arch]["state_dict"])
    ckpt = {"epoch": 299, "model_state": as_torch(sd), "optimizer_state": {}}
    write_zip_pth(tmp_path / "model.pyth", ckpt, prefix="model")
    out = tmp_path / "out"
    assert convert_cli.run([str(tmp_path / "model.pyth"), str(out), "--arch", arch,
                        "--dataset", dataset]) == 0
    variables, meta = convert.load_variables(out)
    assert (meta["arch"], meta["dataset"], meta["num_classes"]) == (arch, dataset, 100)
    assert models.count_params(variables) == VIT_ARCHS[arch]["trainable_params"]
    flat = models.flatten(variables)
    if arch == "pit_ti":  # a depthwise conv and the 4-D position table, in their layouts
        np.testing.assert_array_equal(flat["params/pools_0/conv/kernel"],
                                      sd["pools.0.conv.weight"].transpose(2, 3, 1, 0))
        np.testing.assert_array_equal(flat["params/pos_embed"], sd["pos_embed"])
    else:  # pycls names renamed: s2.b1.bn -> layer2.0.downsample.1
        np.testing.assert_array_equal(flat["batch_stats/layer2_0/downsample_1/var"],
                                      sd["s2.b1.bn.running_var"])
