"""zkd_jax/integrations/tunix.py: Tunix's LogitStrategy with logit standardization.

Always (JAX only): the loss is ``alpha * kd_loss(standardize=True) + (1 - alpha) * CE`` as the
module documents, for one-hot (times mask) and integer labels, with and without padding, with
``distill_top_k`` (:func:`zkd_jax.topk_kd.topk_kd_loss` on the full teacher's statistics), and
importing the module does not import Tunix. With ``google-tunix`` installed (the ``tunix`` extra,
which ``.ci/run`` installs in a venv of its own): constructor, attributes, validation, metrics,
Tunix's numbers with ``standardize=False`` (padding and top-k included), and a few steps of
Tunix's ``DistillationTrainer``.
"""

from __future__ import annotations

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zkd_jax import kd_loss
from zkd_jax.integrations import tunix as zt
from zkd_jax.topk_kd import teacher_top_k, topk_kd_loss

V = 11


def _batch(seed=0, b=4, t=6):
    rng = np.random.default_rng(seed)
    s, te = (jnp.asarray(2 * rng.standard_normal((b, t, V)), jnp.float32) for _ in range(2))
    y = jnp.asarray(rng.integers(0, V, (b, t)), jnp.int32)
    mask = jnp.arange(t)[None, :] < jnp.array([6, 2, 4, 1])[:, None]
    return s, te, y, mask


def _ce_rows(s, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(s), y[..., None], -1)[..., 0]


@pytest.mark.parametrize("top_k", [0, 4])
def test_standardized_loss_is_kd_loss_combined_as_documented(top_k):
    s, t, y, mask = _batch()
    one_hot = jax.nn.one_hot(y, V) * mask[..., None]

    @jax.jit
    def everything(s, t):
        out = {}
        for mean in zt.TOKEN_MEANS:
            for name, labels in (("one_hot", one_hot), ("ids", (y, mask)), ("no_padding", y)):
                out[mean, name] = zt.logit_objective(s, t, labels, temperature=2.0, alpha=0.7,
                                                     distill_top_k=top_k, token_mean=mean)
        return out

    @jax.jit
    def references(s, t):
        out = {}
        for mean, name in everything_keys:
            m = jnp.ones_like(mask) if name == "no_padding" else mask
            where = m if mean == "valid" else None
            if top_k:
                idx, top, st = teacher_top_k(t, top_k, 2.0, standardize=True)
                kd = topk_kd_loss(s, idx, top, 2.0, stats=st, standardize=True, tail="renormalize",
                                  where=where)
            else:
                kd = kd_loss(s, t, 2.0, standardize=True, where=where)
            ce = jnp.where(m, _ce_rows(s, y), 0.0)
            out[mean, name] = (kd, jnp.mean(ce) if mean == "all" else jnp.sum(ce) / jnp.sum(m))
        return out

    got = everything(s, t)
    everything_keys = list(got)
    want = references(s, t)
    for key, (loss, metrics) in got.items():
        kd, ce = want[key]
        np.testing.assert_allclose(loss, 0.7 * kd + 0.3 * ce, rtol=2e-6, err_msg=str(key))
        np.testing.assert_allclose(metrics["distill/kl_div"], kd / 4.0, rtol=2e-6)
        assert set(metrics) == {"distill/soft_loss", "distill/hard_loss", "distill/kl_div",
                                "distill/teacher_loss"}
    # one-hot times the mask and (ids, mask) are the same labels; padding changes the mean
    np.testing.assert_allclose(got["all", "one_hot"][0], got["all", "ids"][0], rtol=1e-6)
    np.testing.assert_allclose(got["valid", "one_hot"][0], got["valid", "ids"][0], rtol=1e-6)
    assert abs(float(got["all", "ids"][0]) - float(got["valid", "ids"][0])) > 1e-2


def test_bad_labels_are_refused_and_tunix_is_not_imported_by_the_module():
    s, t, y, _ = _batch()
    with pytest.raises(ValueError, match="one-hot float labels"):
        zt.logit_objective(s, t, y[:, :2], temperature=2.0, alpha=0.5)
    tree = ast.parse(pathlib.Path(zt.__file__).read_text())
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top_level for a in n.names] + [n.module or "" for n in top_level
                                                             if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.split(".")[0] == "tunix"], names


# ----------------------------------------------------------------------------- with Tunix installed


@pytest.fixture(scope="module")
def tunix_logit():
    pytest.importorskip("tunix", reason="google-tunix is not installed (the tunix extra)")
    from tunix.distillation.strategies import logit  # noqa: PLC0415

    return logit


def _noop(*a, **k):
    return None


def test_constructor_attributes_and_validation(tunix_logit):
    cls = zt.StandardizedLogitStrategy
    strategy = cls(_noop, _noop, _noop, temperature=3, alpha=0.25, distill_top_k=5)
    assert isinstance(strategy, tunix_logit.LogitStrategy)
    assert (strategy.temperature, strategy.alpha, strategy.distill_top_k) == (3.0, 0.25, 5)
    assert (strategy.standardize, strategy.token_mean, strategy.top_k_tail) == (True, "all", "renormalize")
    assert cls(_noop, _noop, _noop, 2.0, 0.5, 0, standardize=False).standardize is False
    for bad in ({"temperature": 0}, {"temperature": -1.0}, {"alpha": -0.1}, {"alpha": 1.1},
                {"token_mean": "tokens"}, {"top_k_tail": "drop"}, {"distill_top_k": -1},
                {"chunk_size": 0}):
        with pytest.raises(ValueError):
            cls(_noop, _noop, _noop, **bad)


@pytest.mark.parametrize("top_k", [0, 3])
def test_unstandardized_is_tunix_number_for_number(tunix_logit, top_k):
    s, t, y, mask = _batch(1)
    labels = jax.nn.one_hot(y, V) * mask[..., None]  # Tunix's convention, with padding
    ours = zt.StandardizedLogitStrategy(_noop, _noop, _noop, temperature=3.0, alpha=0.4,
                                        distill_top_k=top_k, standardize=False)
    theirs = tunix_logit.LogitStrategy(_noop, _noop, _noop, temperature=3.0, alpha=0.4, distill_top_k=top_k)
    (a, ma), (b, mb) = ours.compute_loss(s, t, labels), theirs.compute_loss(s, t, labels)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert ma.keys() == mb.keys()
    for key in ma:
        np.testing.assert_allclose(ma[key], mb[key], rtol=1e-6, err_msg=key)
    np.testing.assert_allclose(ours.compute_loss(s, t, (y, mask))[0], b, rtol=1e-6)  # ids + mask
    np.testing.assert_allclose(ours.compute_eval_loss(s, labels)[0], theirs.compute_eval_loss(s, labels)[0],
                               rtol=1e-6)
    if top_k:  # the top-k loss differs from the full one, standardized or not
        full = zt.StandardizedLogitStrategy(_noop, _noop, _noop, temperature=3.0, alpha=0.4)
        topk = zt.StandardizedLogitStrategy(_noop, _noop, _noop, temperature=3.0, alpha=0.4, distill_top_k=top_k)
        assert abs(float(full.compute_loss(s, t, labels)[0]) - float(topk.compute_loss(s, t, labels)[0])) > 1e-3
        # the class computes the documented objective (checked against kd_loss above)
        want = zt.logit_objective(s, t, (y, mask), temperature=3.0, alpha=0.4, distill_top_k=top_k)[0]
        np.testing.assert_allclose(topk.compute_loss(s, t, (y, mask))[0], want, rtol=1e-6)


def test_tunix_trainer_runs_a_few_steps(tunix_logit):
    import optax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415
    from tunix.distillation import DistillationTrainer, TrainingConfig, TrainingInput  # noqa: PLC0415

    class Tiny(nnx.Module):
        def __init__(self, vocab: int, width: int, seed: int):
            rngs = nnx.Rngs(seed)
            self.embed = nnx.Embed(vocab, width, rngs=rngs)
            self.out = nnx.Linear(width, vocab, rngs=rngs)

        def __call__(self, tokens, positions=None, attention_mask=None):
            return self.out(jnp.tanh(self.embed(tokens)))

    vocab = 16

    def forward(model, input_tokens, input_mask, **_):
        return model(input_tokens)[:, :-1]

    def labels(input_tokens, input_mask, **_):
        return jax.nn.one_hot(input_tokens[:, 1:], vocab) * input_mask[:, 1:, None]

    student, teacher = Tiny(vocab, 8, 0), Tiny(vocab, 32, 1)
    strategy = zt.StandardizedLogitStrategy(forward, forward, labels, temperature=2.0, alpha=0.9,
                                            distill_top_k=8)
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
    # the earlier factory still builds the strategy (valid-token mean)
    from zkd_jax.integrations.tunix_strategy import standardized_logit_strategy  # noqa: PLC0415

    old = standardized_logit_strategy(forward, forward, labels, temperature=2.0, alpha=0.9)
    assert isinstance(old, zt.StandardizedLogitStrategy) and old.token_mean == "valid"
