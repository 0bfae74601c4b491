"""zkd_jax/io/teacher_cache.py: the offline top-k teacher cache.

A writer killed with SIGKILL in the middle of a shard resumes and leaves files byte for byte those
of an uninterrupted write; a damaged shard is refused with one line naming it; the cached values
are the teacher's top-k and full-vocabulary statistics; hosts write their own files.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zkd_jax.io.teacher_cache import TeacherCache, TeacherCacheError, write_teacher_cache
from zkd_jax.topk_kd import teacher_top_k, topk_kd_loss

SETUP = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    W = jnp.asarray(np.random.default_rng(0).standard_normal((8, 40)), jnp.float32)
    def teacher(tokens):
        return jnp.tanh(jax.nn.one_hot(tokens, 8)) @ W
    BATCHES = [np.random.default_rng(i).integers(0, 8, (2, 5)).astype(np.int32) for i in range(8)]
    SETTINGS = dict(top_k=4, temperature=2.0, standardize=True, batches_per_shard=3)
    """
)
KILLED = SETUP + textwrap.dedent(
    """
    import os, signal, sys
    from zkd_jax.io.teacher_cache import write_teacher_cache
    def batches():
        for n, b in enumerate(BATCHES):
            if n == 4:  # one shard written, the next one half full
                os.kill(os.getpid(), signal.SIGKILL)
            yield b
    write_teacher_cache(sys.argv[1], teacher, batches(), process_index=0, **SETTINGS)
    """
)


def _setup():
    scope: dict = {}
    exec(SETUP, scope)  # noqa: S102  (the same teacher and data as the subprocess)
    return scope


def _files(directory):
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}


def test_killed_write_resumes_bit_identical_and_damage_is_refused(tmp_path):
    s = _setup()
    killed, whole = str(tmp_path / "killed"), str(tmp_path / "whole")
    proc = subprocess.run([sys.executable, "-c", KILLED, killed], capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(os.listdir(killed)) == ["host-00000-shard-00000.npz", "host-00000.json"]
    with pytest.raises(TeacherCacheError, match="incomplete"):
        TeacherCache(killed, process_index=0)
    write_teacher_cache(killed, s["teacher"], s["BATCHES"], process_index=0, **s["SETTINGS"])
    write_teacher_cache(whole, s["teacher"], s["BATCHES"], process_index=0, **s["SETTINGS"])
    assert _files(killed) == _files(whole)
    assert len(_files(whole)) == 4  # 3 + 3 + 2 batches and the manifest

    cache = TeacherCache(whole, process_index=0)
    assert len(cache) == 8
    idx, top, stats = teacher_top_k(s["teacher"](s["BATCHES"][5]), 4, 2.0, standardize=True)
    got = cache[5]
    np.testing.assert_array_equal(got["indices"], idx)
    np.testing.assert_allclose(got["logits"], top, rtol=1e-2)  # stored in bfloat16
    for a, b in zip(got["stats"], stats):
        np.testing.assert_array_equal(a, b)
    cache.check(temperature=2.0, standardize=True)
    with pytest.raises(TeacherCacheError, match="temperature 2.0"):
        cache.check(temperature=4.0, standardize=True)
    with pytest.raises(TeacherCacheError, match="written with"):
        write_teacher_cache(whole, s["teacher"], s["BATCHES"], process_index=0, top_k=8, temperature=2.0,
                            batches_per_shard=3)

    shard = os.path.join(whole, "host-00000-shard-00001.npz")
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 1
    open(shard, "wb").write(bytes(data))
    fresh = TeacherCache(whole, process_index=0)
    fresh[0]  # shard 0 is fine
    with pytest.raises(TeacherCacheError) as err:
        fresh[3]
    assert "host-00000-shard-00001.npz is damaged" in str(err.value) and "\n" not in str(err.value)
    # the writer rewrites a damaged shard (and those after it) when rerun
    write_teacher_cache(whole, s["teacher"], s["BATCHES"], process_index=0, **s["SETTINGS"])
    assert _files(killed) == _files(whole)


def test_hosts_write_their_own_shards_and_the_loss_reads_them(tmp_path):
    s = _setup()
    d = str(tmp_path / "cache")
    for host in (0, 1):
        write_teacher_cache(d, s["teacher"], s["BATCHES"][host::2], process_index=host, top_k=40,
                            temperature=2.0, logits_dtype="float32", batches_per_shard=8)
    assert sorted(os.listdir(d)) == ["host-00000-shard-00000.npz", "host-00000.json",
                                     "host-00001-shard-00000.npz", "host-00001.json"]
    cached = TeacherCache(d, process_index=1)[2]  # host 1's third batch: dataset batch 5
    tokens = s["BATCHES"][5]
    student = jnp.asarray(np.random.default_rng(9).standard_normal((2, 5, 40)), jnp.float32)
    from zkd_jax import kd_loss  # noqa: PLC0415

    loss = topk_kd_loss(student, cached["indices"], cached["logits"], 2.0, stats=cached["stats"],
                        standardize=True)
    want = kd_loss(student, s["teacher"](tokens), 2.0, standardize=True)  # k = V: the dense loss
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    with pytest.raises(TeacherCacheError, match="host 2"):
        TeacherCache(d, process_index=2)
    jax.clear_caches()
