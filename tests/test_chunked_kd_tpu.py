"""The language-model losses compiled for TPU topologies from this CPU process (nothing runs).

libtpu (the ``tpu`` extra) compiles for a TPU slice that is not there
(``jax.experimental.topologies``): the tests read XLA:TPU's ``memory_analysis()`` and the optimized
HLO of ``value_and_grad`` of :func:`zkd_jax.kd_loss` and :func:`zkd_jax.kd_loss_from_hidden` on
abstract bf16 inputs. The bounds are those of the full-size shape ``[8192, 128256]``, H = 4096
(docs/lm_sharding.md, ``benchmarks/llm_loss.py --topology``), at a CI-sized shape with the same
proportions: ``H / V`` as there, chunks of the fused form the same fraction of the rows, and a
vocabulary whose shard on each of 4 chips (4000 columns) is not a multiple of 128 lanes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import zkd_jax

N, V, H = 2048, 16000, 256  # H / V = 0.016, as 4096 / 128256 = 0.032 over 2
KD_CHUNK = 128  # rows: aligned, as the automatic chunks are
FUSED_CHUNK = 8  # 1/256 of the rows, as the automatic chunk of [8192, 128256]


@pytest.fixture(autouse=True)
def no_persistent_cache():
    """JAX's persistent compilation cache (tests/conftest.py) cannot load an executable compiled
    for devices that are not there: it would store each one and warn on reading it back."""
    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", before)


@functools.cache
def tpu_devices(topology: str):
    return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices


def lowered(devices, form: str, row_axis=None, vocab_axis=None, n=N, v=V, h=H):
    """``jit(value_and_grad(form))`` lowered for ``devices`` (a mesh with one axis ``x``)."""
    mesh = Mesh(np.array(devices), ("x",))
    sds = lambda shape, *spec: jax.ShapeDtypeStruct(  # noqa: E731
        shape, jnp.bfloat16, sharding=NamedSharding(mesh, P(*spec)))
    axes = {"row_axis": row_axis, "vocab_axis": vocab_axis} if row_axis or vocab_axis else {}
    with jax.set_mesh(mesh):
        if form == "kd_loss":
            logits = sds((n, v), row_axis, vocab_axis)
            fn = jax.value_and_grad(lambda s, t: zkd_jax.kd_loss(
                s, t, 2.0, standardize=True, chunk_size=KD_CHUNK, **axes))
            return jax.jit(fn).lower(logits, logits)
        hidden, head = sds((n, h), row_axis), sds((h, v), None, vocab_axis)
        fn = jax.value_and_grad(lambda a, w, b, u: zkd_jax.kd_loss_from_hidden(
            a, w, b, u, 2.0, standardize=True, chunk_size=FUSED_CHUNK, **axes), argnums=(0, 1))
        return jax.jit(fn).lower(hidden, head, hidden, head)


def temporaries(compiled, chips: int) -> float:
    """Temporary bytes per chip over one chip's bf16 logits (its shard on several chips)."""
    return compiled.memory_analysis().temp_size_in_bytes / (N * V * 2 / chips)


@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1", "v6e:2x2"])
def test_one_chip_temporaries(topology):
    for form, bound in (("kd_loss", 0.05), ("fused", 0.1)):
        compiled = lowered(tpu_devices(topology)[:1], form).compile()
        ratio = temporaries(compiled, 1)
        assert ratio <= bound, (topology, form, ratio)
        # the 16-bit logits are sliced natively: no uint16 view (XLA:CPU's workaround) on TPU
        assert "u16[" not in compiled.as_text(), (topology, form)


@pytest.mark.parametrize("layout", ["rows", "vocab"])
def test_four_chips_rows_or_vocabulary_sharded(layout):
    axes = {"row_axis": "x"} if layout == "rows" else {"vocab_axis": "x"}
    for form in ("kd_loss", "fused"):
        compiled = lowered(tpu_devices("v5e:2x2"), form, **axes).compile()
        ratio = temporaries(compiled, 4)
        assert ratio <= 0.25, (layout, form, ratio)
        hlo = compiled.as_text()
        # neither logits nor heads nor hidden states are gathered; the vocabulary's statistics
        # are all-reduces of [rows] vectors
        assert "all-gather" not in hlo, (layout, form)
        assert "all-reduce" in hlo, (layout, form)


def test_slices_are_chosen_for_the_platform_lowered_for():
    """The same process lowers the uint16 view of bf16 slices for XLA:CPU, not for TPU."""
    tpu = lowered(tpu_devices("v5e:2x2")[:1], "kd_loss", n=256, v=384).as_text()
    cpu = lowered(jax.devices("cpu")[:1], "kd_loss", n=256, v=384).as_text()
    assert "ui16" in cpu and "ui16" not in tpu
