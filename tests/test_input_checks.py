"""Issue 16, acceptance 5 (the values of point 5): each refused with one clear ``ValueError``.

Config fields are checked before any training (``zkd_jax.trainer.validate``; the demo's teacher
recipe and suite too); the loss functions check their arguments eagerly and, for shapes and dtypes,
while ``jit`` traces; under ``jit`` traced values behave as ``zkd_jax.loss_checks`` documents.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zkd_jax import losses
from zkd_jax.configs import demo
from zkd_jax.trainer import validate
from zkd_jax.trainer import train_and_evaluate

B, C = 4, 10
S = jnp.asarray(np.random.default_rng(0).normal(size=(B, C)), jnp.float32)
T = jnp.asarray(np.random.default_rng(1).normal(size=(B, C)), jnp.float32)
Y = jnp.asarray([0, 3, 9, 2])


@pytest.mark.parametrize("field, value", [
    ("epochs", 0), ("epochs", -1), ("optimizer.lr", 0.0), ("optimizer.lr", -0.1),
    ("batch_size", 0), ("batch_size", 2000), ("eval_batch_size", -8),
    ("optimizer.momentum", 1.5), ("optimizer.milestones", (4, 2)), ("keep_checkpoints", 0),
    ("log_every_steps", 0), ("method.temperature", 0.0), ("suite.kd_ls.temperature", -2.0),
    ("teacher.recipe.epochs", 0), ("teacher.recipe.optimizer.lr", -1.0),
    ("train_examples", 0), ("train_examples", 1501), ("train_examples", -2),
])
def test_config_values_that_make_no_sense(field, value):
    config = demo.get_config()
    node = config
    *parents, leaf = field.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError, match=rf"^config\.{field}=.* is invalid: it must be "):
        validate.check_config(config, devices=1)


def test_batch_larger_than_the_capped_train_split_is_refused():
    config = demo.get_config()
    config.train_examples, config.batch_size = 64, 128
    with pytest.raises(ValueError, match=r"config.batch_size=128 is invalid: it must be at most "
                                         r"the 64 training examples"):
        validate.check_config(config, devices=1)


def test_the_demo_config_is_valid():
    validate.check_config(demo.get_config(), devices=1)
    validate.check_config(demo.get_config(), devices=8)


def test_refused_before_the_teacher_trains_and_before_anything_is_written(tmp_path):
    config = demo.get_config()
    config.batch_size = 0
    with pytest.raises(ValueError, match=r"config\.batch_size=0 is invalid"):
        train_and_evaluate(config, tmp_path / "demo")  # a suite: the teacher, then students
    config = demo.get_config()
    config.epochs = 0
    with pytest.raises(ValueError, match=r"config\.epochs=0 is invalid"):
        train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "demo").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("temperature", [0, 0.0, -1.0, float("nan"), jnp.float32(0.0)])
def test_kd_temperature_must_be_positive(temperature):
    with pytest.raises(ValueError, match=r"temperature=.* must be finite and > 0"):
        losses.kd_loss(S, T, temperature)
    with pytest.raises(ValueError, match=r"temperature=.* must be finite and > 0"):
        losses.dkd_loss(S, T, Y, alpha=1.0, beta=8.0, temperature=temperature)


def test_teacher_of_another_shape_is_not_broadcast():
    with pytest.raises(ValueError, match=r"teacher_logits has shape \(1, 10\) but student_logits "
                                         r"has shape \(4, 10\)"):
        losses.kd_loss(S, T[:1], 4.0)
    with pytest.raises(ValueError, match="teacher_logits has shape"):
        jax.jit(lambda s, t: losses.kd_loss(s, t, 4.0))(S, T[:1])  # shapes: also under jit


@pytest.mark.parametrize("bad", [-1, C, 100])
def test_labels_out_of_range(bad):
    labels = Y.at[1].set(bad)
    with pytest.raises(ValueError, match=rf"labels holds {bad}, outside \[0, {C}\)"):
        losses.cross_entropy(S, labels)
    with pytest.raises(ValueError, match=rf"labels holds {bad}, outside \[0, {C}\)"):
        losses.dkd_loss(S, T, labels, alpha=1.0, beta=8.0, temperature=4.0)


def test_labels_of_wrong_dtype_or_shape():
    with pytest.raises(ValueError, match="labels must be integer class indices"):
        losses.cross_entropy(S, Y.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"labels has shape \(3,\)"):
        losses.cross_entropy(S, Y[:3])


def test_where_must_be_boolean_of_the_rows_shape():
    with pytest.raises(ValueError, match="where must be a boolean mask, got dtype int32"):
        losses.kd_loss(S, T, 4.0, where=jnp.asarray([1, 0, 2, 1], jnp.int32))
    with pytest.raises(ValueError, match=r"where has shape \(1, 4\)"):
        losses.kd_loss(S, T, 4.0, where=jnp.ones((1, B), bool))
    with pytest.raises(ValueError, match="where must be a boolean mask"):  # dtype: under jit too
        jax.jit(lambda w: losses.cross_entropy(S, Y, where=w))(jnp.ones(B, jnp.float32))


def test_empty_batch():
    with pytest.raises(ValueError, match=r"has no rows \(shape \(0, 10\)\)"):
        losses.kd_loss(S[:0], T[:0], 4.0)
    with pytest.raises(ValueError, match="has no rows"):
        losses.cross_entropy(S[:0], Y[:0])


def test_under_jit_traced_values_behave_as_documented():
    """Traced values are not inspected (zkd_jax.loss_checks): no error, the documented result."""
    kd = jax.jit(lambda tau: losses.kd_loss(S, T, tau))
    assert np.isfinite(float(kd(4.0)))
    float(kd(0.0))  # tau = 0 traced: not refused; the value means nothing (documented)
    ce = jax.jit(losses.cross_entropy)
    last = Y.at[1].set(C - 1)
    assert float(ce(S, Y.at[1].set(-1))) == pytest.approx(float(ce(S, last)))  # -1 is C - 1
    assert np.isnan(float(ce(S, Y.at[1].set(C))))  # >= C: NaN
