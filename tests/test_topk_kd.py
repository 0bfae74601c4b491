"""zkd_jax/topk_kd.py: KD from a teacher's top-k logits with the full vocabulary's statistics.

With k = V it is the dense ``kd_loss`` (values and gradients, 1e-5 float32), standardized or not,
with either tail; with k < V the teacher's probabilities are the full teacher's softmax on its
top-k (not renormalized); the fused form equals the logits form; row- and vocabulary-sharded forms
on 8 CPU devices equal the unsharded one.
"""

from __future__ import annotations

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cpu_devices import run_on_cpu_devices

from zkd_jax import cross_entropy, kd_loss, standardize
from zkd_jax import topk_kd as tk

V = 24


def _data(seed=0, b=3, t=4, h=5):
    rng = np.random.default_rng(seed)
    spread = np.linspace(-2, 2, V).astype(np.float32)
    s = jnp.asarray(2 * rng.standard_normal((b, t, V)) + spread, jnp.float32)
    te = jnp.asarray(3 * rng.standard_normal((b, t, V)) - spread, jnp.float32)
    where = jnp.arange(t)[None] < jnp.array([4, 1, 3])[:, None]
    hid = jnp.asarray(rng.standard_normal((b, t, h)), jnp.float32)
    head = jnp.asarray(rng.standard_normal((h, V)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, V, (b, t)), jnp.int32)
    return s, te, where, hid, head, labels


@pytest.mark.parametrize("std", [False, True])
def test_k_equal_v_is_the_dense_loss(std):
    s, t, where, *_ = _data()
    idx, top, st = tk.teacher_top_k(t, V, 2.0, standardize=std)

    @jax.jit
    def everything(s):
        dense = jax.value_and_grad(lambda x: kd_loss(x, t, 2.0, standardize=std, where=where))(s)
        out = [dense]
        for tail in tk.TAILS:
            f = lambda x: tk.topk_kd_loss(x, idx, top, 2.0, stats=st, standardize=std,  # noqa: B023,E731
                                          tail=tail, where=where)
            out.append(jax.value_and_grad(f)(s))
        return out

    (ref, gref), *rest = everything(s)
    for value, grad in rest:
        np.testing.assert_allclose(value, ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(grad, gref, atol=1e-5 * float(jnp.max(jnp.abs(gref))))


def test_top_k_probabilities_are_the_full_teachers_and_tails_differ():
    s, t, where, *_ = _data(1)

    @jax.jit
    def everything(s, t):
        out = {}
        for std in (False, True):
            idx, top, st = tk.teacher_top_k(t, 6, 2.0, standardize=std)
            z = standardize(t) if std else t
            out[std] = (jnp.take_along_axis(jax.nn.log_softmax(z / 2.0), idx, axis=-1),
                        tk.teacher_topk_log_probs(top, st, 2.0, standardize=std))
        losses = [tk.topk_kd_loss(s, idx, top, 2.0, stats=st, standardize=True, tail=tail,
                                  where=where) for tail in tk.TAILS]
        # without statistics: renormalization on the subset's own z-score (an approximation)
        losses.append(tk.topk_kd_loss(s, idx, top, 2.0, standardize=True, tail="renormalize",
                                      where=where))
        return out, losses

    out, (bucket, renorm, approx) = everything(s, t)
    for full, got in out.values():
        np.testing.assert_allclose(got, full, atol=2e-6)
        assert float(jnp.max(jnp.sum(jnp.exp(got), -1))) < 0.99  # not renormalized over the subset
    assert abs(float(bucket) - float(renorm)) > 1e-3
    assert abs(float(approx) - float(renorm)) > 1e-3
    idx, top, _ = tk.teacher_top_k(t, 6, 2.0, standardize=True)
    with pytest.raises(ValueError, match="renormalize"):
        tk.topk_kd_loss(s, idx, top, 2.0, standardize=True)


def test_flat_tail_stats_are_exact_for_a_flat_tail():
    rng = np.random.default_rng(2)
    logits = np.full((2, V), -1.5, np.float32)
    logits[:, :5] = rng.standard_normal((2, 5)) + 3

    @jax.jit
    def both(logits):
        lp = jax.nn.log_softmax(logits)
        top, _ = jax.lax.top_k(lp, 5)
        return tk.flat_tail_stats(top, V, 2.0, standardize=True), tk.teacher_stats(lp, 2.0, standardize=True)

    got, want = both(jnp.asarray(logits))
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tail", tk.TAILS)
def test_fused_from_hidden_equals_logits_form(tail):
    s, t, where, hid, head, labels = _data(3)
    bias = jnp.linspace(-1, 1, V)
    idx, top, st = tk.teacher_top_k(t, 7, 2.0, standardize=True)

    def dense(h, w, b):
        lg = h @ w + b
        return (tk.topk_kd_loss(lg, idx, top, 2.0, stats=st, standardize=True, tail=tail, where=where)
                + 0.3 * cross_entropy(lg, labels, where=where))

    def fused(h, w, b):
        return tk.topk_kd_loss_from_hidden(h, w, idx, top, 2.0, stats=st, standardize=True, tail=tail,
                                           where=where, chunk_size=5, student_bias=b, labels=labels,
                                           ce_weight=0.3)

    both = jax.jit(lambda *a: (jax.value_and_grad(dense, (0, 1, 2))(*a),
                               jax.value_and_grad(fused, (0, 1, 2))(*a)))
    ref, got = both(hid, head, bias)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_bad_arguments_are_one_line_errors():
    s, t, *_ = _data()
    idx, top, st = tk.teacher_top_k(t, 4, 2.0, standardize=True)
    with pytest.raises(ValueError, match="tail must be"):
        tk.topk_kd_loss(s, idx, top, 2.0, stats=st, tail="drop")
    with pytest.raises(ValueError, match="leading axes"):
        tk.topk_kd_loss(s[:1], idx, top, 2.0, stats=st)


SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from zkd_jax import topk_kd as tk

    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    rng = np.random.default_rng(0)
    v = 32
    spread = np.linspace(-3.0, 3.0, v).astype(np.float32)  # per-shard statistics differ
    s = 2.0 * rng.standard_normal((4, 6, v)).astype(np.float32) + spread
    t = 3.0 * rng.standard_normal((4, 6, v)).astype(np.float32) - spread
    where = np.arange(6)[None, :] < np.array([6, 3, 5, 1])[:, None]
    out = {"errors": {}}
    CASES = {"bucket": (("rows", {"row_axis": "data"}), ("vocab", {"vocab_axis": "model"}),
                        ("both", {"row_axis": "data", "vocab_axis": "model"})),
             "renormalize": (("both", {"row_axis": "data", "vocab_axis": "model"}),)}
    std = True
    idx, top, st = tk.teacher_top_k(t, 5, 2.0, standardize=std)
    for tail in tk.TAILS:
        if True:
            def loss(x, **axes):
                return tk.topk_kd_loss(x, idx, top, 2.0, stats=st, standardize=std, tail=tail,
                                       where=where, **axes)
            ref = jax.jit(jax.value_and_grad(loss))(s)
            with jax.set_mesh(mesh):
                for name, axes in CASES[tail]:
                    x = jax.device_put(s, NamedSharding(mesh, P("data", None, "model")))
                    got = jax.jit(jax.value_and_grad(lambda x: loss(x, **axes)))(x)
                    for i, (a, r) in enumerate(zip(got, ref)):
                        a, r = np.asarray(a, np.float64), np.asarray(r, np.float64)
                        key = f"{std}/{tail}/{name}/{i}"
                        out["errors"][key] = float(np.max(np.abs(a - r)) / np.max(np.abs(r)))
    # the fused form under jit with sharded inputs (GSPMD): tokens over data, the head over model
    h = rng.standard_normal((4, 6, 8)).astype(np.float32)
    w, b = rng.standard_normal((8, v)).astype(np.float32), spread
    def fused(h, w, b):
        return tk.topk_kd_loss_from_hidden(h, w, idx, top, 2.0, stats=st, standardize=True,
                                           where=where, chunk_size=5, student_bias=b)
    grad = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2)))
    ref = grad(h, w, b)
    got = grad(jax.device_put(h, NamedSharding(mesh, P("data"))),
               jax.device_put(w, NamedSharding(mesh, P(None, "model"))),
               jax.device_put(b, NamedSharding(mesh, P("model"))))
    for i, (a, r) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(ref))):
        a, r = np.asarray(a, np.float64), np.asarray(r, np.float64)
        out["errors"][f"fused/{i}"] = float(np.max(np.abs(a - r)) / np.max(np.abs(r)))
    print("RESULT " + json.dumps(out))
    """
)


def test_row_and_vocab_sharded_equal_unsharded(tmp_path):
    # logits form: rows, vocabulary, both (shard_map); fused form: jit with sharded inputs
    out = run_on_cpu_devices(SCRIPT, 8, tmp_path, xla_flags="--xla_backend_optimization_level=0")
    assert len(out["errors"]) == 12
    bad = {k: e for k, e in out["errors"].items() if not e < 1e-5}
    assert not bad, bad
