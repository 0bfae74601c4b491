"""The README's Python snippets run as written, and the README stays a user's front door.

Every ```python block of README.md runs, in order, in one namespace (as a reader pasting them into
one session); a block that imports Tunix runs only where the ``tunix`` extra is installed.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zkd_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_python_snippets_of_the_readme_run():
    blocks = _python_blocks()
    assert len(blocks) >= 3
    namespace: dict = {}
    for code in blocks:
        if "tunix" in code and importlib.util.find_spec("tunix") is None:
            continue  # the Tunix extra (a large install) is not part of the test extra
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 (the README's own code)
    # What the first block computes is what it says: 0.1 CE + 9 KD on standardized logits.
    student, teacher = jax.random.normal(jax.random.key(0), (2, 8, 100))
    expected = (0.1 * zkd_jax.cross_entropy(student, jnp.arange(8))
                + 9.0 * zkd_jax.kd_loss(student, teacher, 2.0, standardize=True))
    value, grads = jax.value_and_grad(namespace["loss_fn"])(student, teacher, jnp.arange(8))
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    assert np.isfinite(grads).all() and float(np.abs(grads).sum()) > 0
    assert np.isfinite(float(namespace["loss"])) and float(namespace["loss"]) > 0
    assert namespace["mask"].shape == (4, 16) and not bool(namespace["mask"].all())


def test_readme_is_for_users():
    text = README.read_text()
    assert len(text.splitlines()) < 250
    assert not re.search(r"[Ii]ssue [0-9]|SPEC(_VIT)?\.md|20\d\d-\d\d-\d\d", text)
    for needed in ("arxiv.org/abs/2403.01427", "sunshangquan/logit-standardization-KD",
                   "megvii-research/mdistiller", "@inproceedings{sun2024logit", "bash run_demo.sh",
                   "bash run_tests.sh", "python -m sphinx -W --keep-going -b html docs"):
        assert needed in text, needed
    for target in re.findall(r"\]\(((?:docs/[\w/]+\.md|LICENSE|CITATION\.cff))(?:#[\w-]+)?\)", text):
        assert (ROOT / target).exists(), target


def test_nothing_cites_a_missing_reference_or_an_issue_number():
    """No file of the package, the configs or the docs cites a spec file or a tracker issue."""
    proc = subprocess.run(["grep", "-rlE", r"SPEC(_VIT)?\.md|[Ii]ssue [0-9]", "README.md", "docs",
                           "zkd_jax", "configs", "--include=*.py", "--include=*.md"],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.stdout.strip() == "", proc.stdout


@pytest.mark.parametrize("name", zkd_jax.__all__)
def test_every_public_loss_is_documented(name):
    doc = getattr(zkd_jax, name).__doc__
    assert doc and len(doc.strip().splitlines()) >= 1, name
