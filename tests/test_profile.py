"""Issue 18 acceptance 2: ``config.profile_steps`` writes a jax.profiler trace (CPU, 2 steps)."""

from __future__ import annotations

import pytest

from test_train_resume import _config, _save_teacher  # noqa: F401  (same tiny digits run)
from zkd_jax.trainer import train_and_evaluate
from zkd_jax.trainer.profile import StepProfiler


def test_trace_on_disk(tmp_path):
    config = _config(_save_teacher(tmp_path / "teacher"), max_steps=4)
    config.profile_steps, config.profile_start_step = 2, 1
    train_and_evaluate(config, tmp_path / "run")
    traces = list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0


def test_bad_values():
    with pytest.raises(ValueError, match="profile_steps"):
        StepProfiler("x", steps=-1, start=0)
