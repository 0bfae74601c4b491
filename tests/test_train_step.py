"""Acceptance 2 (issue 5): 3 train steps of zkd_jax vs. an independent NumPy computation.

A tiny student (BatchNorm over the flattened input, then a dense classifier) distills from a fixed
dense teacher with KD + logit standardization. NumPy (float64) recomputes the forward pass, the loss
terms, the gradient (central finite differences, no autodiff) and PyTorch's SGD update (coupled
weight decay on every parameter, BatchNorm's included, then momentum 0.9, lr by epoch).
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zkd_jax import methods, optim
from zkd_jax.parallel import create_mesh, host_to_global
from zkd_jax.step import make_eval_step, make_train_step
from zkd_jax.step.state import create_train_state, init_variables

B, H, W, CH, C = 8, 4, 4, 1, 5
LR, WD, MOMENTUM, MILESTONES = 0.2, 0.01, 0.9, (2,)  # steps_per_epoch = 1: step 3 is epoch 3
TAU, CE_W, KD_W = 2.0, 0.1, 9.0


class TinyStudent(nn.Module):
    num_classes: int = C
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1)).astype(self.dtype)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         dtype=self.dtype, name="bn")(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x).astype(jnp.float32)


class TinyTeacher(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(C, name="fc")(x.reshape((x.shape[0], -1)))


# ---------------------------------------------------------------- the NumPy reference (float64)

def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_standardize(x):
    return (x - x.mean(-1, keepdims=True)) / (x.std(-1, ddof=1, keepdims=True) + 1e-7)


def np_terms(p, x, t_logits, labels):
    """(ce, kd) of KD+LS for the tiny student with flat params dict p (train-mode BatchNorm)."""
    x = x.reshape(len(x), -1)
    mean, var = x.mean(0), x.var(0)
    h = (x - mean) / np.sqrt(var + 1e-5) * p["scale"] + p["bn_bias"]
    s = h @ p["kernel"] + p["bias"]
    ce = -np_log_softmax(s)[np.arange(len(s)), labels].mean()
    lp_t = np_log_softmax(np_standardize(t_logits) / TAU)
    lp_s = np_log_softmax(np_standardize(s) / TAU)
    kd = TAU**2 * (np.exp(lp_t) * (lp_t - lp_s)).sum(-1).mean()
    return ce, kd


def np_loss(p, x, t, y):
    ce, kd = np_terms(p, x, t, y)
    return CE_W * ce + KD_W * kd


def np_grad(p, x, t, y, eps=1e-6):
    grads = {}
    for k, v in p.items():
        g = np.zeros_like(v)
        for i in np.ndindex(v.shape):
            plus, minus = {**p, k: v.copy()}, {**p, k: v.copy()}
            plus[k][i] += eps
            minus[k][i] -= eps
            g[i] = (np_loss(plus, x, t, y) - np_loss(minus, x, t, y)) / (2 * eps)
        grads[k] = g
    return grads


def np_sgd(p, v, g, epoch, wd):
    """PyTorch SGD: g + wd * p, v = momentum * v + g, p -= lr(epoch) * v."""
    lr = LR * 0.1 ** sum(epoch > m for m in MILESTONES)
    new_p, new_v = {}, {}
    for k in p:
        d = g[k] + wd * p[k]
        new_v[k] = MOMENTUM * v[k] + d
        new_p[k] = p[k] - lr * new_v[k]
    return new_p, new_v, lr


def _flat(params):
    s = params["student"]
    return {"scale": s["bn"]["scale"], "bn_bias": s["bn"]["bias"], "kernel": s["fc"]["kernel"],
            "bias": s["fc"]["bias"]}


def _batches(n):
    rng = np.random.default_rng(42)
    return [{"image": rng.normal(size=(B, H, W, CH)).astype(np.float32) * 2 + 0.5,
             "label": rng.integers(0, C, B).astype(np.int32)} for _ in range(n)]


@pytest.fixture(scope="module")
def setup():
    mesh = create_mesh()
    student, teacher = TinyStudent(), TinyTeacher()
    method = methods.KD(temperature=TAU, ce_weight=CE_W, kd_weight=KD_W, standardize=True)
    schedule = optim.step_decay_schedule(LR, steps_per_epoch=1, milestones=MILESTONES)
    tx = optim.sgd(schedule, momentum=MOMENTUM, weight_decay=WD)
    state = create_train_state(student, method, tx, init_rng=jax.random.PRNGKey(0),
                               step_rng=jax.random.PRNGKey(1), input_shape=(1, H, W, CH),
                               mesh=mesh)
    teacher_vars = init_variables(teacher, jax.random.PRNGKey(2), (1, H, W, CH))
    return mesh, student, teacher, method, schedule, tx, state, teacher_vars


def test_three_steps_match_numpy(setup):
    mesh, student, teacher, method, schedule, tx, state, teacher_vars = setup
    p = {k: np.asarray(v, np.float64) for k, v in _flat(state.params).items()}
    p0 = dict(p)
    vel = {k: np.zeros_like(v) for k, v in p.items()}
    step = make_train_step(student, teacher, method, tx, mesh, learning_rate_fn=schedule)
    for i, batch in enumerate(_batches(3)):
        epoch = i + 1
        t_logits = np.asarray(teacher.apply(teacher_vars, batch["image"]), np.float64)
        x = batch["image"].astype(np.float64)
        ce, kd = np_terms(p, x, t_logits, batch["label"])
        grads = np_grad(p, x, t_logits, batch["label"])
        p, vel, lr = np_sgd(p, vel, grads, epoch, WD)

        state, metrics = step(state, teacher_vars, host_to_global(batch, mesh), np.int32(epoch))
        chex.assert_type(list(metrics.values()), jnp.float32)
        chex.assert_shape(list(metrics.values()), ())
        np.testing.assert_allclose(metrics["ce"], ce, rtol=1e-5)
        np.testing.assert_allclose(metrics["kd"], kd, rtol=1e-5)
        np.testing.assert_allclose(metrics["loss"], CE_W * ce + KD_W * kd, rtol=1e-5)
        np.testing.assert_allclose(metrics["lr"], lr, rtol=1e-7)
        got = _flat(state.params)
        for k in p:
            np.testing.assert_allclose(got[k], p[k], rtol=1e-5, atol=1e-6, err_msg=f"{k} {epoch}")
    assert int(state.step) == 3
    # The comparison can tell coupled weight decay apart: without it the parameters differ.
    q, vq = p0, {k: np.zeros_like(v) for k, v in p0.items()}
    for i, batch in enumerate(_batches(3)):
        t_logits = np.asarray(teacher.apply(teacher_vars, batch["image"]), np.float64)
        g = np_grad(q, batch["image"].astype(np.float64), t_logits, batch["label"])
        q, vq, _ = np_sgd(q, vq, g, i + 1, 0.0)
    assert max(np.abs(q[k] - p[k]).max() for k in p) > 100 * 1e-6


def test_eval_step_counts_masked_top1_top5(setup):
    mesh, student, *_ = setup
    variables = init_variables(student, jax.random.PRNGKey(3), (1, H, W, CH))
    batch = _batches(1)[0]
    mask = np.array([True] * 5 + [False] * 3)
    out = make_eval_step(student, mesh)(variables, host_to_global({**batch, "mask": mask}, mesh))
    logits = np.asarray(student.apply(variables, batch["image"]))
    order = np.argsort(-logits, axis=-1)
    top1 = (order[:, 0] == batch["label"])[mask].sum()
    top5 = (order[:, :5] == batch["label"][:, None]).any(-1)[mask].sum()
    assert (int(out["correct1"]), int(out["correct5"]), int(out["count"])) == (top1, top5, 5)


def test_mixed_precision_keeps_float32_state(setup):
    mesh, _, teacher, method, schedule, tx, _, teacher_vars = setup
    student = TinyStudent(dtype=jnp.bfloat16)
    state = create_train_state(student, method, tx, init_rng=jax.random.PRNGKey(0),
                               step_rng=jax.random.PRNGKey(1), input_shape=(1, H, W, CH),
                               mesh=mesh)
    step = make_train_step(student, teacher, method, tx, mesh, learning_rate_fn=schedule)
    state, metrics = step(state, teacher_vars, host_to_global(_batches(1)[0], mesh), np.int32(1))
    chex.assert_type(jax.tree.leaves(state.params), jnp.float32)
    floats = [x for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    chex.assert_type(floats, jnp.float32)  # momentum buffers (the schedule's count is int32)
    chex.assert_type(list(metrics.values()), jnp.float32)
    assert np.isfinite(float(metrics["loss"]))


def test_method_without_teacher_needs_no_teacher_module(setup):
    mesh, student, _, _, schedule, tx, *_ = setup
    with pytest.raises(ValueError, match="pass the teacher module"):
        make_train_step(student, None, methods.KD(), tx, mesh)
    ce = methods.CrossEntropy()
    state = create_train_state(student, ce, tx, init_rng=jax.random.PRNGKey(0),
                               step_rng=jax.random.PRNGKey(1), input_shape=(1, H, W, CH))
    step = make_train_step(student, None, ce, tx, mesh)
    _, metrics = step(state, {}, host_to_global(_batches(1)[0], mesh), np.int32(1))
    assert set(metrics) == {"loss", "ce", "grad_norm", "teacher_finite", "params_finite"}


def test_trainer_imports_and_steps_without_tensorflow():
    """TensorFlow is blocked: the trainer's modules import and a train step runs."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import sys
        sys.modules["tensorflow"] = None  # any import of TensorFlow now fails
        sys.modules["tensorflow_datasets"] = None
        import numpy as np, jax, flax.linen as nn
        import zkd_jax.trainer, zkd_jax.cli.train, zkd_jax.trainer.suite, zkd_jax.io.checkpoint
        from zkd_jax import methods, optim
        from zkd_jax.configs import cifar100, demo, imagenet
        from zkd_jax.parallel import create_mesh, host_to_global
        from zkd_jax.step import make_train_step
        from zkd_jax.step.state import create_train_state
        cifar100.get_config(); demo.get_config(); imagenet.get_config()
        class M(nn.Module):
            @nn.compact
            def __call__(self, x, train=False):
                return nn.Dense(3)(x.reshape((x.shape[0], -1)))
        mesh, method = create_mesh(), methods.KD(standardize=True)
        tx = optim.sgd(0.1, momentum=0.9, weight_decay=5e-4)
        state = create_train_state(M(), method, tx, init_rng=jax.random.PRNGKey(0),
                                   step_rng=jax.random.PRNGKey(1), input_shape=(1, 2, 2, 1))
        teacher_vars = M().init(jax.random.PRNGKey(2), np.zeros((1, 2, 2, 1)))
        batch = {"image": np.ones((4, 2, 2, 1), np.float32), "label": np.zeros(4, np.int32)}
        step = make_train_step(M(), M(), method, tx, mesh)
        state, metrics = step(state, teacher_vars, host_to_global(batch, mesh), np.int32(1))
        assert np.isfinite(float(metrics["loss"]))
        print("OK")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-2000:]
