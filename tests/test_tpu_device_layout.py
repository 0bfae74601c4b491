"""The on-device split on the TPU compiler: no dataset-sized temporary in the scanned step.

Compiled (never run) for ``v5e:2x2`` with ``libtpu`` on the CPU machine: the scanned step that
builds its batches from the split held as ``[N, 3072]`` uint8 (``zkd_jax.data.device``) needs
about the temporaries of the same step fed host batches; XLA:TPU would copy a ``[N, 32, 32, 3]``
split into another layout on every call (a temporary larger than the split itself).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # another process may hold libtpu

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import zkd_jax.data as zdata  # noqa: E402
from zkd_jax import methods, optim  # noqa: E402
from zkd_jax.models import layers  # noqa: E402
from zkd_jax.parallel import create_mesh  # noqa: E402
from zkd_jax.step import create_states, init_variables, make_train_step  # noqa: E402
from zkd_jax.step import scan as scan_lib  # noqa: E402

N, BATCH = 16384, 64  # a 50 MB split; per-chip batch 16


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = layers.Conv2d(32, 3, padding=1, name="conv")(x)
        x = layers.BatchNorm(name="bn")(x, train)
        return layers.Linear(10, name="fc")(jax.nn.relu(x).mean(axis=(1, 2)))


def _tpu_mesh():
    pytest.importorskip("libtpu")
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

    try:
        devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    except Exception as e:  # noqa: BLE001  (no usable libtpu here)
        pytest.skip(f"cannot compile for TPU here: {e}")
    return create_mesh(devices)


def test_scanned_device_fed_step_has_no_dataset_sized_temporary():
    mesh = _tpu_mesh()
    rep, sharded = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))

    def spec(shape, dtype, sharding=rep):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    def abstract(tree):
        return jax.tree.map(lambda s: spec(s.shape, s.dtype), tree)

    net, method = Net(), methods.KD(temperature=4.0, kd_weight=9.0, standardize=True)
    tx = optim.sgd(0.01, weight_decay=5e-4)
    step = make_train_step(net, net, method, tx, mesh)
    teacher = abstract(jax.eval_shape(lambda k: init_variables(net, k, (1, 32, 32, 3)),
                                      jax.random.PRNGKey(0)))
    state = abstract(jax.eval_shape(
        lambda: create_states(net, [method], [0], tx, input_shape=(1, 32, 32, 3))[0]))
    scalar = spec((), jnp.int32)
    batch = {"image": spec((BATCH, 32, 32, 3), jnp.float32, sharded),
             "label": spec((BATCH,), jnp.int32, sharded)}
    host_temp = step.lower(state, teacher, batch, scalar).compile().memory_analysis()
    info = zdata.info("cifar100")
    scanned = scan_lib.make_scanned_step(
        step.unjitted, mesh, 2, zdata.device.train_batch_builder(BATCH, info.mean, info.std))
    compiled = scanned.lower(state, teacher, spec((N, 3072), jnp.uint8), spec((N,), jnp.int32),
                             spec((2,), jnp.uint32), scalar, scalar, spec((N,), jnp.int32)).compile()
    extra = compiled.memory_analysis().temp_size_in_bytes - host_temp.temp_size_in_bytes
    # The per-batch work (gather, crop, flip, normalize of 64 images) needs a few MB; a relayout
    # of the split would need more than the split's 50 MB.
    assert extra < N * 3072 // 8, (extra, host_temp.temp_size_in_bytes)
