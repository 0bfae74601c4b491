"""Issue 14, acceptance 7: the Tunix adapter (zkd_jax/integrations/tunix_strategy.py).

The objective (JAX only) is checked always: it is ``alpha * kd_loss(standardize=True, where=mask)
+ (1 - alpha) * cross_entropy(where=mask)`` and padding does not leak. The adapter module must not
import Tunix at import time. With ``google-tunix`` installed (the ``tunix`` extra; CI does not
install it, docs/language_models.md), a few real steps of Tunix's
``DistillationTrainer`` with tiny Flax NNX models must lower the strategy's loss.
"""

from __future__ import annotations

import ast
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zkd_jax import cross_entropy, kd_loss
from zkd_jax.integrations import tunix_strategy

MODULE = pathlib.Path(tunix_strategy.__file__)


def _batch(seed=0, b=4, t=6, v=11):
    rng = np.random.default_rng(seed)
    s, te = (jnp.asarray(rng.standard_normal((b, t, v)), jnp.float32) for _ in range(2))
    y = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    mask = jnp.arange(t)[None, :] < jnp.array([6, 2, 4, 1])[:, None]
    return s, te, y, mask


def test_objective_is_masked_standardized_kd_plus_ce():
    s, t, y, mask = _batch()

    @jax.jit
    def everything(s, t, y, mask):
        objective = functools.partial(tunix_strategy.masked_kd_objective, temperature=2.0, alpha=0.7)
        garbage = jnp.where(mask[..., None], s, 1e4)  # padded positions must not count
        return (objective(s, t, (y, mask)), objective(garbage, t, (y, mask))[0],
                objective(s, t, y)[0], kd_loss(s, t, 2.0, standardize=True, where=mask),
                cross_entropy(s, y, where=mask))

    (loss, metrics), with_garbage, unmasked, kd, ce = everything(s, t, y, mask)
    np.testing.assert_allclose(loss, 0.7 * kd + 0.3 * ce, rtol=1e-6)
    np.testing.assert_allclose(metrics["distill/soft_loss"], kd, rtol=1e-6)
    np.testing.assert_allclose(with_garbage, loss, rtol=1e-6)
    assert abs(float(unmasked) - float(loss)) > 1e-3
    with pytest.raises(ValueError, match="integer token ids"):
        tunix_strategy.split_labels(jnp.eye(11)[y])


def test_adapter_imports_tunix_only_inside_the_factory():
    tree = ast.parse(MODULE.read_text())
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top_level for a in n.names] + [
        n.module or "" for n in top_level if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.split(".")[0] == "tunix"], names
    for bad in ({"temperature": 0.0}, {"alpha": 1.5}):
        with pytest.raises(ValueError, match="temperature must be positive|alpha must be in"):
            tunix_strategy.standardized_logit_strategy(None, None, None, **bad)


def test_tunix_trainer_runs_a_few_steps():
    pytest.importorskip("tunix", reason="google-tunix is not installed (the tunix extra)")
    import optax
    from flax import nnx
    from tunix.distillation import DistillationTrainer, TrainingConfig, TrainingInput

    class Tiny(nnx.Module):
        def __init__(self, vocab: int, width: int, seed: int):
            rngs = nnx.Rngs(seed)
            self.embed = nnx.Embed(vocab, width, rngs=rngs)
            self.out = nnx.Linear(width, vocab, rngs=rngs)

        def __call__(self, tokens):
            return self.out(jnp.tanh(self.embed(tokens)))

    vocab = 16
    student, teacher = Tiny(vocab, 8, 0), Tiny(vocab, 32, 1)
    forward = lambda model, input_tokens, input_mask: model(input_tokens)[:, :-1]  # noqa: E731
    labels = lambda input_tokens, input_mask: (input_tokens[:, 1:], input_mask[:, 1:] > 0)  # noqa: E731
    strategy = tunix_strategy.standardized_logit_strategy(forward, forward, labels, temperature=2.0,
                                                          alpha=0.9)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (8, 12)).astype(np.int32)
    mask = (np.arange(12)[None] < rng.integers(4, 13, 8)[:, None]).astype(np.int32)
    inputs = {"input_tokens": tokens, "input_mask": mask}

    def loss_of(model):
        return float(strategy.get_train_loss(model, strategy.get_teacher_outputs(teacher, inputs), inputs)[0])

    before = loss_of(student)
    trainer = DistillationTrainer(student, teacher, strategy, optax.adam(3e-2),
                                  TrainingConfig(eval_every_n_steps=1000, max_steps=5))
    trainer.train([TrainingInput(input_tokens=tokens, input_mask=mask)] * 5)
    assert loss_of(trainer.model) < 0.9 * before
