"""The README's loss example runs as written and computes the loss it says it does."""

from __future__ import annotations

import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import zkd_jax

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_block(section: str) -> str:
    """The first ```python block after the heading ``section``."""
    text = README.read_text()
    start = text.index(section)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_loss_example_of_the_readme_runs():
    code = _python_block("## Use the loss in your own code")
    model = nn.Dense(10)
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    params = model.init(jax.random.key(0), x)
    teacher_logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 10)), jnp.float32)
    namespace = {"model": model}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 (the README's own code)
    loss, grads = jax.value_and_grad(namespace["loss_fn"])(params, {"image": x}, teacher_logits)
    expected = zkd_jax.kd_loss(model.apply(params, x), teacher_logits, 2.0, standardize=True)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert float(loss) > 0 and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_readme_lists_only_exported_loss_names():
    text = README.read_text()
    listed = re.search(r"imports nothing but JAX: (.*?)\. Logits", text, re.S).group(1)
    names = re.findall(r"`(\w+)`", listed)
    assert "cross_entropy" in names
    for name in names:
        assert name in zkd_jax.__all__ and callable(getattr(zkd_jax, name)), name
