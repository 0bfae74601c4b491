"""Issue 14, acceptance 3: the chunked and fused KD losses on a (data x model) = (2 x 4) mesh.

Runs in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the flag must be
set before JAX starts). The layout is a tensor-parallel output layer as in MaxText: tokens over
``data``, the head's vocabulary axis (and the logits' last axis) over ``model``. Values and the
gradients (logits; hidden states, head, bias; a traced temperature) equal the unsharded ones to
1e-5, so the standardization's mean and std are over the whole vocabulary, not one shard of it.
"""

from __future__ import annotations

import textwrap

from cpu_devices import run_on_cpu_devices

SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from zkd_jax import kd_loss, kd_loss_from_hidden

    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
    rng = np.random.default_rng(0)
    normal = lambda *s: rng.standard_normal(s).astype(np.float32)
    b, t, h_s, h_t, v = 4, 6, 8, 12, 64  # 24 tokens; chunks of 5 leave a remainder of 4
    where = np.arange(t)[None, :] < np.array([6, 3, 5, 1])[:, None]
    # vocabulary-wide offsets and scales: a per-shard mean/std would differ from the global one
    spread = np.linspace(-3.0, 3.0, v).astype(np.float32)
    s_logits, t_logits = 2.0 * normal(b, t, v) + spread, 3.0 * normal(b, t, v) - spread
    hs, ws, bs = normal(b, t, h_s), normal(h_s, v), spread
    ht, wt, bt = normal(b, t, h_t), normal(h_t, v), -spread
    labels = rng.integers(0, v, (b, t)).astype(np.int32)

    def logits_loss(s, tl, temp, mask):
        return kd_loss(s, tl, temp, standardize=True, where=mask, chunk_size=5)

    def hidden_loss(h, w, bias, temp, a, u, c, y, mask):
        return kd_loss_from_hidden(h, w, a, u, temp, standardize=True, where=mask, chunk_size=5,
                                   student_bias=bias, teacher_bias=c, labels=y, ce_weight=0.3)

    grad_logits = jax.jit(jax.value_and_grad(logits_loss, argnums=(0, 2)))
    grad_hidden = jax.jit(jax.value_and_grad(hidden_loss, argnums=(0, 1, 2, 3)))
    temp = np.float32(2.5)
    plain = {"logits": grad_logits(s_logits, t_logits, temp, where),
             "hidden": grad_hidden(hs, ws, bs, temp, ht, wt, bt, labels, where)}
    sharded_in = {
        "logits": (put(s_logits, "data", None, "model"), put(t_logits, "data", None, "model"),
                   temp, put(where, "data", None)),
        "hidden": (put(hs, "data"), put(ws, None, "model"), put(bs, "model"), temp, put(ht, "data"),
                   put(wt, None, "model"), put(bt, "model"), put(labels, "data"), put(where, "data")),
    }
    out = {"devices": jax.device_count(), "errors": {}, "shard_shape": {}}
    for name, args in sharded_in.items():
        fn = grad_logits if name == "logits" else grad_hidden
        got = fn(*args)
        out["shard_shape"][name] = list(args[1].sharding.shard_shape(args[1].shape))
        for i, (a, r) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(plain[name]))):
            a, r = np.asarray(a, np.float64), np.asarray(r, np.float64)
            out["errors"][f"{name}/{i}"] = float(np.max(np.abs(a - r)) / np.max(np.abs(r)))
    # the same losses without standardization's global statistics would not match: a guard that
    # the data really has per-shard statistics different from the vocabulary's
    shard_means = s_logits[..., : v // 4].mean(-1) - s_logits.mean(-1)
    out["shard_mean_gap"] = float(np.max(np.abs(shard_means)))
    print("RESULT " + json.dumps(out))
    """
)


def test_sharded_data_by_model_equals_unsharded(tmp_path):
    # compiling is most of this test's time: XLA's backend optimization level 0 halves it, and
    # sharded and unsharded programs are compiled alike
    out = run_on_cpu_devices(SCRIPT, 8, tmp_path, xla_flags="--xla_backend_optimization_level=0")
    assert out["devices"] == 8
    # teacher logits [4, 6, 64] in 2 x 4 shards; the student head [8, 64] in 4 along the vocabulary
    assert out["shard_shape"] == {"logits": [2, 6, 16], "hidden": [8, 16]}
    assert out["shard_mean_gap"] > 1.0
    # logits: value, d/ds, d/dtau; hidden: value, d/dh, d/dW, d/db, d/dtau
    assert len(out["errors"]) == 8, out["errors"]
    for name, err in out["errors"].items():
        assert err <= 1e-5, (name, err)
