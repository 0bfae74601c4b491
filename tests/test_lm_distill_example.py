"""Issue 14, acceptance 6: examples/lm_distill.py in a short setting; the student's KD loss falls.

The example trains a small causal transformer teacher on generated text, then distils a smaller
student with ``kd_loss_from_hidden(standardize=True, where=padding mask)``. Here both are tiny and
train for a few dozen steps; the KD loss on a held-out batch must fall well below its start, and
the teacher must have learned the text first (its cross-entropy falls), so the distillation is real.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import numpy as np

PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "lm_distill.py"


def load_example():
    spec = importlib.util.spec_from_file_location("lm_distill", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # the Flax modules are dataclasses: their module must be known
    spec.loader.exec_module(module)
    return module


def test_example_distils_a_small_lm():
    example = load_example()
    data = example.batch(np.random.default_rng(0), 16, 24)
    assert data["mask"].any(axis=1).all() and not data["mask"].all()  # padding exists
    np.testing.assert_array_equal(data["targets"][~data["mask"]], example.PAD)

    log = example.run(teacher_steps=60, student_steps=40, batch_size=16, seq_len=24,
                      teacher_width=32, teacher_depth=1, student_width=16, student_depth=1,
                      learning_rate=1e-2, log_every=20, optimize=False, verbose=False)
    assert len(log["student_kd"]) == 3 and len(log["teacher_ce"]) == 3
    assert log["teacher_ce"][-1] < 0.5 * log["teacher_ce"][0], log["teacher_ce"]
    assert log["student_kd"][-1] < 0.7 * log["student_kd"][0], log["student_kd"]
    assert all(np.isfinite(log["student_kd"] + log["student_ce"]))


def test_compare_runs_from_a_top_k_cache(tmp_path):
    example = load_example()
    methods = ("KD+LS", "KD+LS top-16 cache")
    results = example.compare(teacher_steps=10, student_steps=4, batch_size=8, seq_len=16, seeds=1,
                              vocab=40, methods=methods, teacher_width=16, teacher_depth=1,
                              student_width=8, cache_dir=str(tmp_path), optimize=False, verbose=False)
    assert tuple(results) == methods
    for (ce, agree), in results.values():
        assert np.isfinite(ce) and 0.0 <= agree <= 1.0
    assert (tmp_path / "top16" / "host-00000.json").exists()
    table = example.comparison_table(results)
    assert table.count("±") == 4 and "KD+LS top-16 cache" in table
