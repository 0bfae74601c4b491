"""The core install (no extras) is enough for the losses, models and train step: importing them
pulls in no module of an extra, and the core dependencies name none of them."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXTRA_MODULES = ("matplotlib", "tensorboardX", "orbax", "tensorflow", "tensorflow_datasets",
                 "sklearn", "ml_collections", "tqdm", "tunix")


def test_losses_models_and_step_import_no_extra():
    code = (
        "import sys\n"
        "import zkd_jax, zkd_jax.losses, zkd_jax.models, zkd_jax.step, zkd_jax.methods\n"
        "import zkd_jax.optim, zkd_jax.parallel, zkd_jax.step.state\n"
        f"print(sorted(m for m in {EXTRA_MODULES!r} if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu",
                                                PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout


def test_core_dependencies_are_the_core():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"]).lower()
    for name in ("matplotlib", "tensorboardx", "tensorflow", "scikit-learn", "ml-collections",
                 "tqdm"):
        assert name not in core, name
    extras = project["optional-dependencies"]
    assert {"train", "report", "data", "tpu", "tunix", "docs", "all", "test"} <= set(extras)
    test = " ".join(extras["test"])
    assert all(extra in test for extra in ("train", "report", "data", "tpu"))
    assert "zkd_jax[train]" in extras["tpu"]  # zkd-compile reads zkd-train's configs
