"""Issue 14: kd_loss chunked over rows and kd_loss_from_hidden (fused with the output layer).

Acceptance 1: chunked kd_loss equals the one-pass form (values, gradients) on the golden cases and
on random [B, T, V] with masks. Acceptance 2: the fused form equals kd_loss on materialized logits.
Acceptance 4: a memory bound from XLA's memory_analysis (compile only).
"""

from __future__ import annotations

import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zkd_jax
from zkd_jax import chunked_kd, losses

GOLDEN = np.load(pathlib.Path(__file__).parent / "fixtures" / "losses_golden.npz")
TOLERANCE = {"float64": 1e-6, "float32": 1e-5}


def relative_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _chain_to_raw(grad_temperature, raw, lam):
    """CTKD's ``T = 1 + 20 sigmoid(GRL(raw, lam))``: d/d raw = lam * 20 sigmoid' * dL/dT."""
    sig = 1.0 / (1.0 + np.exp(-np.float64(raw)))
    return lam * 20.0 * sig * (1.0 - sig) * np.float64(grad_temperature)


@pytest.mark.parametrize("standardize", [False, True], ids=["plain", "ls"])
def test_chunked_matches_golden_cases(standardize, precision="float64"):
    """Every golden KD and CTKD case through the chunked form (3 rows: divides none of 8, 64, 16).

    One compiled value-and-gradient in (logits, temperature) per family serves all of them; the
    CTKD temperature gradient is chained to the raw parameter here. float64: 1e-6 of the
    reference (as the one-pass form, tests/test_losses.py), so the two agree to 2e-6. float32
    against the one-pass form: the next test.
    """
    mode = "ls" if standardize else "plain"
    families, tol = ("small", "cifar", "imagenet"), 1e-6
    with jax.enable_x64(precision == "float64"):
        dtype = jnp.dtype(precision)
        fn = jax.jit(jax.value_and_grad(
            lambda s, t, temp: losses.kd_loss(s, t, temp, standardize=standardize, chunk_size=3),
            argnums=(0, 2)))
        for family in families:
            s, t = (jnp.asarray(GOLDEN[f"{family}/{n}"], dtype) for n in ("student", "teacher"))
            checks = []
            for temp in (1, 2, 4):
                value, (grad, _) = fn(s, t, dtype.type(temp))
                key = f"{family}/kd/{mode}/T{temp}"
                checks += [(value, f"{key}/value"), (grad, f"{key}/grad")]
            raw = float(GOLDEN[f"{family}/ctkd/global_t_init"])
            for lam in ("-0.5", "-1"):
                temp = 1.0 + 20.0 / (1.0 + np.exp(-raw))
                value, (grad, grad_temp) = fn(s, t, dtype.type(temp))
                key = f"{family}/ctkd/{mode}/lambda{lam}"
                checks += [(value, f"{key}/value"), (grad, f"{key}/grad_student"),
                           (_chain_to_raw(grad_temp, raw, float(lam)), f"{key}/grad_global_t")]
            for ours, key in checks:
                assert np.asarray(ours).dtype in (dtype, np.float64), key
                err = relative_error(ours, GOLDEN[key])
                assert err <= tol, f"{key}: {err:.3g}"


def _sequence_batch(seed, shape=(3, 5, 37)):
    rng = np.random.default_rng(seed)
    s, t = (3.0 * rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    where = np.arange(shape[1])[None, :] < np.array([5, 2, 4])[:, None]
    s = np.where(where[..., None], s, 1e3).astype(np.float32)  # garbage in padded rows must not leak
    return jnp.asarray(s), jnp.asarray(t), jnp.asarray(where)


@pytest.mark.parametrize("standardize", [False, True], ids=["plain", "ls"])
def test_chunked_random_sequences_with_mask_and_traced_temperature(standardize):
    """float32 [B, T, V] with padding, gradients in the logits and a traced temperature: 1e-5."""
    s, t, where = _sequence_batch(0)

    def both(x, temp):
        out = []
        for chunk in (4, None):  # 15 rows: chunks of 4 leave a partial one
            fn = lambda a, b, c=chunk: losses.kd_loss(  # noqa: E731
                a, t, b, standardize=standardize, where=where, chunk_size=c)
            out.append(jax.value_and_grad(fn, argnums=(0, 1))(x, temp))
        return out

    got, ref = jax.jit(both)(s, jnp.float32(2.5))
    for a, b, name in zip(jax.tree.leaves(got), jax.tree.leaves(ref), ("value", "grad", "temp")):
        assert relative_error(a, b) <= 1e-5, name
    np.testing.assert_array_equal(np.asarray(got[1][0])[~np.asarray(where)], 0.0)
    grad_teacher = jax.jit(jax.grad(
        lambda b: losses.kd_loss(s, b, 2.0, standardize=standardize, chunk_size=4)))(t)
    np.testing.assert_array_equal(grad_teacher, 0.0)


@pytest.mark.parametrize("half", ["bfloat16", "float16"])
def test_chunked_half_precision(half):
    s, t, where = _sequence_batch(1)
    s, t = s.astype(half), t.astype(half)

    def both(x):
        fn = lambda a, c: losses.kd_loss(a, t, 2.0, standardize=True, where=where, chunk_size=c)  # noqa: E731
        return [jax.value_and_grad(fn)(x, c) for c in (4, None)]

    (v, g), (v0, g0) = jax.jit(both)(s)
    chex.assert_type(v, jnp.float32)
    chex.assert_type(g, half)
    np.testing.assert_allclose(v, v0, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g0, np.float32), atol=1e-3)


def test_automatic_chunking_above_the_budget(monkeypatch):
    """Logits larger than DEFAULT_CHUNK_BYTES go through the chunked form with no chunk_size."""
    s, t, where = _sequence_batch(2)
    ref = losses.kd_loss(s, t, 2.0, standardize=True, where=where)
    monkeypatch.setattr(losses, "DEFAULT_CHUNK_BYTES", 4 * 37 * 4)  # 4 rows
    jaxpr = str(jax.make_jaxpr(lambda x: losses.kd_loss(x, t, 2.0, standardize=True, where=where))(s))
    assert "custom_vjp_call" in jaxpr and "scan" in jaxpr
    np.testing.assert_allclose(losses.kd_loss(s, t, 2.0, standardize=True, where=where), ref, rtol=1e-6)
    assert chunked_kd.default_chunk_rows(128256, 10**6) == chunked_kd.DEFAULT_CHUNK_BYTES // (4 * 128256)


def _hidden_batch(seed, lead=(3, 5), hs=6, ht=9, v=37):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    return (normal(*lead, hs), normal(hs, v), 0.5 * normal(v), normal(*lead, ht), normal(ht, v),
            0.5 * normal(v), jnp.asarray(rng.integers(0, v, lead), jnp.int32))


@pytest.mark.parametrize("standardize", [False, True], ids=["plain", "ls"])
def test_fused_equals_kd_loss_on_materialized_logits(standardize):
    hs, ws, bs, ht, wt, bt, y = _hidden_batch(3)
    where = jnp.arange(5)[None, :] < jnp.array([5, 2, 4])[:, None]

    def materialized(h, w, b, temp):
        s, t = h @ w + b, ht @ wt + bt
        kd = losses.kd_loss(s, t, temp, standardize=standardize, where=where, chunk_size=None)
        return kd + 0.3 * losses.cross_entropy(s, y, where=where)

    def fused(chunk):
        def fn(h, w, b, temp):
            return zkd_jax.kd_loss_from_hidden(
                h, w, ht, wt, temp, standardize=standardize, where=where, chunk_size=chunk,
                student_bias=b, teacher_bias=bt, labels=y, ce_weight=0.3)
        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))

    ref = jax.jit(jax.value_and_grad(materialized, argnums=(0, 1, 2, 3)))(hs, ws, bs, 2.5)
    got = fused(4)(hs, ws, bs, 2.5)  # 15 tokens: 4 leaves a partial chunk (and vocabulary block)
    for name, a, b in zip(("value", "hidden", "head", "bias", "temperature"),
                          jax.tree.leaves(got), jax.tree.leaves(ref)):
        assert relative_error(a, b) <= 1e-5, (name, relative_error(a, b))
    np.testing.assert_array_equal(np.asarray(got[1][0])[~np.asarray(where)], 0.0)

    teacher_grads = jax.jit(jax.grad(
        lambda h, w, b: zkd_jax.kd_loss_from_hidden(hs, ws, h, w, 2.0, standardize=standardize,
                                                    teacher_bias=b, chunk_size=4), argnums=(0, 1, 2)))(ht, wt, bt)
    for g in teacher_grads:
        np.testing.assert_array_equal(g, 0.0)


def test_fused_bfloat16_without_bias_or_labels():
    """bf16 hidden states and heads (automatic chunk): float32 result, bf16 gradients."""
    hs, ws, _, ht, wt, _, _ = (x.astype(jnp.bfloat16) for x in _hidden_batch(4, lead=(7,)))

    def both(h, w):
        fused = zkd_jax.kd_loss_from_hidden(h, w, ht, wt, 2.0, standardize=True)
        up = lambda x: x.astype(jnp.float32)  # noqa: E731
        return fused, losses.kd_loss(up(h) @ up(w), up(ht) @ up(wt), 2.0, standardize=True)

    def grads(h, w):
        return [jax.grad(lambda a, b, i=i: both(a, b)[i], argnums=(0, 1))(h, w) for i in (0, 1)]

    (value, ref), (got, want) = jax.jit(lambda h, w: (both(h, w), grads(h, w)))(hs, ws)
    chex.assert_type(value, jnp.float32)
    chex.assert_type(got, jnp.bfloat16)
    np.testing.assert_allclose(value, ref, rtol=1e-5)
    for a, b in zip(got, want):  # bf16 products and gradients: bf16's 8 bits of precision
        assert relative_error(np.asarray(a, np.float32), b) <= 2e-2


def test_user_errors_are_one_clear_value_error():
    hs, ws, _, ht, wt, _, _ = (np.asarray(x) for x in _hidden_batch(5, lead=(4,)))
    with pytest.raises(ValueError, match="chunk_size"):
        losses.kd_loss(hs @ ws, ht @ wt, 2.0, chunk_size=0)
    with pytest.raises(ValueError, match="must be equal|differ in shape"):
        losses.kd_loss(hs @ ws, (ht @ wt)[:2], 2.0)
    with pytest.raises(ValueError, match="labels"):
        zkd_jax.kd_loss_from_hidden(hs, ws, ht, wt, 2.0, ce_weight=0.5)
    with pytest.raises(ValueError, match=r"student_head \[Hs, V\]"):
        zkd_jax.kd_loss_from_hidden(hs, ws.T, ht, wt, 2.0)


def test_memory_bound_from_xla_memory_analysis(xla_optimized):
    """Compile only: value-and-gradient temporaries stay far below one float32 [N, V] buffer."""
    n, v, h = 4096, 65536, 64
    full_f32 = n * v * 4  # 1 GiB: the bound below is a quarter of it
    logits = jax.ShapeDtypeStruct((n, v), jnp.float32)
    kd = jax.jit(jax.value_and_grad(lambda s, t: losses.kd_loss(s, t, 2.0, standardize=True)))
    temp_kd = kd.lower(logits, logits).compile().memory_analysis().temp_size_in_bytes
    hidden, head = jax.ShapeDtypeStruct((n, h), jnp.float32), jax.ShapeDtypeStruct((h, v), jnp.float32)
    fused = jax.jit(jax.value_and_grad(
        lambda a, w, b, u: zkd_jax.kd_loss_from_hidden(a, w, b, u, 2.0, standardize=True), argnums=(0, 1)))
    temp_fused = fused.lower(hidden, head, hidden, head).compile().memory_analysis().temp_size_in_bytes
    assert temp_kd < full_f32 / 4, temp_kd
    assert temp_fused < full_f32 / 4, temp_fused


def test_inside_shard_map_with_check_vma_and_no_axis_names():
    """Each device's loss inside the caller's shard_map (check_vma=True, a one-device mesh): the
    loops' carries vary as their inputs do, and the values and gradients are the plain ones."""
    from jax.sharding import Mesh, PartitionSpec as P  # noqa: PLC0415

    s, t, where = _sequence_batch(6)
    hs, ws, bs, ht, wt, bt, y = _hidden_batch(7)
    mesh = Mesh(np.array(jax.devices()[:1]), ("x",))

    def losses_of(s, hs, ws, temp):
        kd = losses.kd_loss(s, t, temp, standardize=True, where=where, chunk_size=4)
        fused = zkd_jax.kd_loss_from_hidden(hs, ws, ht, wt, temp, standardize=True, where=where,
                                            chunk_size=4, labels=y, ce_weight=0.3)
        return kd + fused

    grad = jax.value_and_grad(losses_of, argnums=(0, 1, 2, 3))
    total = jax.value_and_grad(lambda *a: jax.lax.psum(losses_of(*a), "x"), argnums=(0, 1, 2, 3))
    args = (s, hs, ws, jnp.float32(2.5))
    inner = jax.shard_map(total, mesh=mesh, in_specs=(P("x"), P("x"), P(), P()),
                          out_specs=(P(), (P("x"), P("x"), P(), P())), check_vma=True)
    got, ref = jax.jit(inner)(*args), jax.jit(grad)(*args)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        assert relative_error(a, b) <= 1e-5
