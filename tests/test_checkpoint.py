"""zkd_jax.io.checkpoint: asynchronous orbax saves that are complete when they count."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from zkd_jax.io import checkpoint, manifest
from zkd_jax.step.state import TrainState


def _state(step: int, scale: float) -> TrainState:
    return TrainState(step=jnp.asarray(step, jnp.int32),
                      params={"student": {"w": scale * jnp.arange(6.0).reshape(2, 3)}, "method": {}},
                      batch_stats={}, opt_state=(), rng=jax.random.PRNGKey(3))


def test_async_save_keeps_the_values_of_save_time_and_is_complete_when_asked(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, keep=2)
    state = _state(5, 1.0)
    ckpt.save(state, {"epoch": 1}, best=True)
    # The train step donates the state right after a save: its buffers may be reused at once.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # backends without donation say so, then copy
        jax.jit(lambda s: jax.tree.map(lambda x: x * 0, s), donate_argnums=0)(state)
    ckpt.save(_state(9, 2.0), {"epoch": 2})
    assert ckpt.latest_step() == 9  # waits for the writes in flight
    assert ckpt.best.latest_step() == 5
    restored, meta = ckpt.restore(_state(0, 0.0), 5)
    ckpt.close()
    assert meta == {"epoch": 1, "step": 5}
    np.testing.assert_array_equal(restored.params["student"]["w"], np.arange(6.0).reshape(2, 3))
    again = checkpoint.Checkpointer(tmp_path, keep=2)
    restored, meta = again.restore(_state(0, 0.0))
    again.close()
    assert meta["step"] == 9 and float(restored.params["student"]["w"][1, 2]) == 10.0


def test_a_checkpoint_written_before_train_states_had_buffers_restores(tmp_path):
    """Resuming a run whose checkpoints predate ``TrainState.buffers`` (issue 17)."""
    import orbax.checkpoint as ocp

    old = _state(4, 3.0)
    fields = {k: getattr(old, k) for k in ("step", "params", "batch_stats", "opt_state", "rng")}
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.last.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(fields),
                                              meta=ocp.args.JsonSave({"step": 4})))
    ckpt.close()
    manifest.write(tmp_path / checkpoint.CHECKPOINTS / "4")  # as Checkpointer.save does
    again = checkpoint.Checkpointer(tmp_path)
    restored, meta = again.restore(_state(0, 0.0), 4)
    again.close()
    assert meta == {"step": 4} and restored.buffers == {} and int(restored.step) == 4
    np.testing.assert_array_equal(restored.params["student"]["w"], 3.0 * np.arange(6.0).reshape(2, 3))
