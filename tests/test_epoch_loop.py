"""``zkd_jax.trainer.loop``: host fetches and the lagged metrics fetch lose or repeat no step.

The loop fetches metrics every ``config.log_every_steps`` but leaves the newest
``LOG_LAG_STEPS`` pending (checkpoints and epoch ends fetch all). Whatever the cadence, every step
must be counted exactly once: the epoch means in ``metrics.jsonl`` are the same for a fetch every
step (cadence below the lag: lagged fetches, then full ones before saves) and once per epoch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zkd_jax.io import metrics as metrics_io
from zkd_jax.trainer import loop as epoch_loop
from zkd_jax.trainer import train_and_evaluate


def test_to_host_copies_a_tree_to_numpy():
    tree = {"a": jnp.arange(3), "b": [jnp.float32(2.5), 7]}
    out = epoch_loop.to_host(tree)
    assert isinstance(out["a"], np.ndarray) and isinstance(out["b"][0], np.ndarray)
    np.testing.assert_array_equal(out["a"], [0, 1, 2])
    assert out["b"][0] == 2.5 and out["b"][1] == 7
    assert jax.tree.structure(out) == jax.tree.structure(tree)


@pytest.fixture(scope="module")
def records_by_cadence(tmp_path_factory):
    from zkd_jax.configs import demo

    root = tmp_path_factory.mktemp("cadence")
    out = {}
    for every in (1, 1000):
        c = demo.teacher_config()  # cross-entropy only: the run is about the loop
        c.input_pipeline = "device"
        c.student.arch = "resnet8"
        c.batch_size = 32
        c.train_examples = 11 * 32  # 11 steps per epoch
        c.epochs = 2
        c.optimizer.milestones = ()
        c.max_steps = 17  # the second epoch stops inside: a partial flush and a save
        c.checkpoint_every_steps = 7  # full fetches before in-epoch saves
        c.log_every_steps = every
        c.progress_bar = False
        c.export = False
        train_and_evaluate(c, root / f"every_{every}")
        out[every] = metrics_io.read_metrics(root / f"every_{every}")
    return out


def test_epoch_means_do_not_depend_on_the_fetch_cadence(records_by_cadence):
    assert epoch_loop.LOG_LAG_STEPS > 1  # cadence 1 runs below the lag
    reference = records_by_cadence[1000]
    assert [r["epoch"] for r in reference] == [1]  # epoch 2 stopped at step 17: no record
    for every in (1,):
        got = records_by_cadence[every]
        assert len(got) == len(reference)
        for a, b in zip(got, reference):
            for key in ("train_loss", "train_ce", "step", "top1", "test_loss"):
                assert a[key] == b[key], (every, key)
