"""Acceptance 5 (issue 5): a train step on a batch sharded over 8 CPU devices equals one device.

Runs in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the flag must be
set before JAX starts). The student has a convolution and BatchNorm over batch and space, so the
batch statistics must be reduced across devices for the numbers to agree. The same process checks
that a global batch not divisible by the device count is refused with one clear ValueError
(acceptance 6).
"""

from __future__ import annotations

import textwrap

from cpu_devices import run_on_cpu_devices

SCRIPT = textwrap.dedent(
    """
    import json
    import flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np
    from zkd_jax import methods, optim
    from zkd_jax.configs import demo
    from zkd_jax.parallel import create_mesh, host_to_global
    from zkd_jax.step import make_train_step
    from zkd_jax.trainer import train_and_evaluate
    from zkd_jax.step.state import create_train_state, init_variables

    class Net(nn.Module):
        width: int = 4
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.Conv(self.width, (3, 3))(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x).mean(axis=(1, 2))
            return nn.Dense(10)(x)

    student, teacher = Net(4), Net(6)
    method = methods.KD(temperature=2.0, ce_weight=0.1, kd_weight=9.0, standardize=True)
    schedule = optim.step_decay_schedule(0.1, steps_per_epoch=2, milestones=(1,))
    tx = optim.sgd(schedule, momentum=0.9, weight_decay=5e-4)
    teacher_vars = init_variables(teacher, jax.random.PRNGKey(7), (1, 8, 8, 3))
    rng = np.random.default_rng(0)
    batches = [{"image": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
                "label": rng.integers(0, 10, 16).astype(np.int32)} for _ in range(3)]

    def run(devices):
        mesh = create_mesh(devices)
        state = create_train_state(student, method, tx, init_rng=jax.random.PRNGKey(0),
                                   step_rng=jax.random.PRNGKey(1), input_shape=(1, 8, 8, 3),
                                   mesh=mesh)
        step = make_train_step(student, teacher, method, tx, mesh, learning_rate_fn=schedule)
        losses = []
        for i, b in enumerate(batches):
            g = host_to_global(b, mesh)
            assert len(g["image"].sharding.device_set) == len(devices)
            state, m = step(state, teacher_vars, g, np.int32(i // 2 + 1))
            losses.append(float(m["loss"]))
        leaves = [np.asarray(x) for x in jax.tree.leaves((state.params, state.batch_stats))]
        shard_shapes = {s.data.shape for s in jax.tree.leaves(state.params)[0].addressable_shards}
        return losses, leaves, len(shard_shapes) == 1

    out = {"devices": jax.device_count()}
    l1, p1, _ = run(jax.devices()[:1])
    l8, p8, replicated = run(jax.devices())
    out["loss_1"], out["loss_8"], out["params_replicated"] = l1, l8, replicated
    out["max_param_diff"] = max(float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1.0)))
                                for a, b in zip(p1, p8))
    out["max_param_scale"] = max(float(np.max(np.abs(a))) for a in p1)

    errors = []
    try:
        host_to_global({"image": np.zeros((12, 8, 8, 3), np.float32)}, create_mesh())
    except ValueError as e:
        errors.append(str(e))
    config = demo.get_config()
    config.batch_size = 12
    try:
        train_and_evaluate(config, "/nonexistent/never/written")
    except ValueError as e:
        errors.append(str(e))
    out["errors"] = errors
    print("RESULT " + json.dumps(out))
    """
)


def test_eight_devices_match_one_device(tmp_path):
    out = run_on_cpu_devices(SCRIPT, 8, tmp_path)
    assert out["devices"] == 8
    for a, b in zip(out["loss_1"], out["loss_8"], strict=True):
        assert abs(a - b) <= 1e-5 * abs(a), (out["loss_1"], out["loss_8"])
    assert out["max_param_diff"] <= 1e-5, out
    assert out["params_replicated"]
    # Acceptance 6: a global batch that does not split over 8 devices -> one clear ValueError.
    assert len(out["errors"]) == 2, out["errors"]
    for message in out["errors"]:
        assert "is not divisible by the 8 devices" in message and "multiple of 8" in message
    assert out["errors"][1].startswith("config.batch_size=12")
