"""The chunked and fused KD losses on a (data x model) = (2 x 4) mesh of 8 CPU devices.

Runs in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the flag must be
set before JAX starts). The layout is a tensor-parallel output layer as in MaxText: tokens over
``data``, the head's vocabulary axis (and the logits' last axis) over ``model``. The vocabulary,
300 classes, is 75 columns a device: not a multiple of 128 lanes (the loss pads each block and
leaves the padding out of every statistic). Values and gradients (logits; hidden states, head,
bias; a traced temperature), with a mask, standardization and the cross-entropy, equal the
unsharded ones to 1e-5 in float32, called

- without axis names, whatever GSPMD makes of the sharded arguments;
- under ``jit`` with ``row_axis="data"``, with ``vocab_axis="model"`` and with both (a
  ``shard_map`` inside);
- inside the caller's ``jax.shard_map`` with ``check_vma=True``, on each device's blocks.

The standardization's mean and std are over the whole vocabulary, not one shard of it.
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
    rng = np.random.default_rng(0)
    normal = lambda *s: rng.standard_normal(s).astype(np.float32)
    b, t, h_s, h_t, v = 4, 6, 8, 12, 300  # 24 tokens; chunks of 5 leave a remainder
    where = np.arange(t)[None, :] < np.array([6, 3, 5, 1])[:, None]
    # vocabulary-wide offsets and scales: a per-shard mean/std would differ from the global one
    spread = np.linspace(-3.0, 3.0, v).astype(np.float32)
    s_logits, t_logits = 2.0 * normal(b, t, v) + spread, 3.0 * normal(b, t, v) - spread
    hs, ws, bs = normal(b, t, h_s), normal(h_s, v), spread
    ht, wt, bt = normal(b, t, h_t), normal(h_t, v), -spread
    labels = rng.integers(0, v, (b, t)).astype(np.int32)
    temp = np.float32(2.5)

    def logits_grad(**axes):
        def loss(s, tl, temp, mask):
            return kd_loss(s, tl, temp, standardize=True, where=mask, chunk_size=5, **axes)
        return jax.value_and_grad(loss, argnums=(0, 2))

    def hidden_grad(**axes):
        def loss(h, w, bias, temp, a, u, c, y, mask):
            return kd_loss_from_hidden(h, w, a, u, temp, standardize=True, where=mask, chunk_size=5,
                                       student_bias=bias, teacher_bias=c, labels=y, ce_weight=0.3,
                                       **axes)
        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))

    def specs(row, voc):
        return {"logits": (P(row, None, voc), P(row, None, voc), P(), P(row)),
                "hidden": (P(row), P(None, voc), P(voc), P(), P(row), P(None, voc), P(voc), P(row),
                           P(row))}

    args = {"logits": (s_logits, t_logits, temp, where),
            "hidden": (hs, ws, bs, temp, ht, wt, bt, labels, where)}
    grads = {"logits": logits_grad, "hidden": hidden_grad}
    plain = {name: jax.jit(grads[name]())(*a) for name, a in args.items()}
    out = {"devices": jax.device_count(), "errors": {}, "shard_shape": {}}

    def compare(case, name, got):
        for i, (a, r) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(plain[name]))):
            a, r = np.asarray(a, np.float64), np.asarray(r, np.float64)
            out["errors"][f"{case}/{name}/{i}"] = float(np.max(np.abs(a - r)) / np.max(np.abs(r)))

    with jax.set_mesh(mesh):
        for case, row, voc in [("gspmd", None, None), ("rows", "data", None),
                               ("vocab", None, "model"), ("both", "data", "model")]:
            sp = specs("data", "model") if case == "gspmd" else specs(row, voc)
            for name, a in args.items():
                placed = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(a, sp[name])]
                out["shard_shape"][f"{case}/{name}"] = list(placed[1].sharding.shard_shape(a[1].shape))
                compare(case, name, jax.jit(grads[name](row_axis=row, vocab_axis=voc))(*placed))
        sp = specs("data", "model")
        for name, a in args.items():
            arg_specs = sp[name]
            grad_specs = (arg_specs[0], P()) if name == "logits" else arg_specs[:3] + (P(),)
            inner = jax.shard_map(grads[name](row_axis="data", vocab_axis="model"), in_specs=arg_specs,
                                  out_specs=(P(), grad_specs), check_vma=True)
            compare("shard_map", name, jax.jit(inner)(*a))
    # a guard that the data really has per-shard statistics different from the vocabulary's
    out["shard_mean_gap"] = float(np.max(np.abs(s_logits[..., : v // 4].mean(-1) - s_logits.mean(-1))))
    print("RESULT " + json.dumps(out))
    """
)


def test_sharded_equals_unsharded(tmp_path):
    # compiling is most of this test's time: XLA's backend optimization level 0 halves it, and
    # sharded and unsharded programs are compiled alike
    out = run_on_cpu_devices(SCRIPT, 8, tmp_path, xla_flags="--xla_backend_optimization_level=0")
    assert out["devices"] == 8
    # teacher logits [4, 6, 300]: 75 classes a device along model; the student head [8, 300] too
    assert out["shard_shape"]["gspmd/logits"] == [2, 6, 75]
    assert out["shard_shape"]["vocab/hidden"] == [8, 75]
    assert out["shard_shape"]["rows/logits"] == [2, 6, 300]
    # 5 cases; logits: value, d/ds, d/dtau; hidden: value, d/dh, d/dW, d/db, d/dtau
    assert out["shard_mean_gap"] > 1.0
    assert len(out["errors"]) == 5 * 8, out["errors"]
    for name, err in out["errors"].items():
        assert err <= 1e-5, (name, err)
