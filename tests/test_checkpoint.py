"""zkd_jax.io.checkpoint: asynchronous orbax saves that are complete when they count."""

from __future__ import annotations

import re
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


def test_a_committed_checkpoint_has_its_manifest_before_any_later_call(tmp_path, capsys):
    """A crash right after orbax's commit (no ``wait``, no ``close``, no next save) leaves the
    newest checkpoint verified: a restart resumes from it and calls nothing damaged."""
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(_state(2, 1.0), {"epoch": 1})
    ckpt.save(_state(4, 2.0), {"epoch": 1})
    ckpt.last.wait_until_finished()  # committed by orbax; the checkpointer did nothing after it
    assert manifest.verify(tmp_path / checkpoint.CHECKPOINTS / "4") is None
    again = checkpoint.Checkpointer(tmp_path)  # the restarted run
    assert again.latest_step() == 4
    again.close()
    ckpt.close()
    assert "damaged" not in capsys.readouterr().out
    assert not (tmp_path / checkpoint.DAMAGED).exists()


def test_a_crash_inside_the_commit_leaves_no_checkpoint_of_that_step(tmp_path, monkeypatch,
                                                                     capsys):
    """Killed while the manifest is written (before orbax's rename): step 4 does not exist; the
    restart resumes from step 2 and calls nothing damaged."""
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(_state(2, 1.0), {"epoch": 1})
    ckpt.wait()

    def crash(directory):
        raise OSError(28, "No space left on device")  # the commit stops here, as a kill would

    monkeypatch.setattr(manifest, "write", crash)
    ckpt.save(_state(4, 2.0), {"epoch": 1})
    try:
        ckpt.wait()
    except manifest.CheckpointSaveError as err:
        assert "No space left on device" in str(err)
    monkeypatch.undo()
    ckpt.close()
    assert not (tmp_path / checkpoint.CHECKPOINTS / "4").exists()
    again = checkpoint.Checkpointer(tmp_path)
    assert again.latest_step() == 2
    again.close()
    assert "damaged" not in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / checkpoint.CHECKPOINTS).iterdir()) == ["2"]


def test_damaged_checkpoints_kept_at_most_keep_damaged(tmp_path, capsys):
    for step in (3, 5, 7):  # three restarts, each finding its newest checkpoint damaged
        ckpt = checkpoint.Checkpointer(tmp_path, keep_damaged=1)
        ckpt.save(_state(step, 1.0), {"epoch": 1})
        ckpt.close()
        (tmp_path / checkpoint.CHECKPOINTS / str(step) / "meta" / "metadata").write_text("{}")
        again = checkpoint.Checkpointer(tmp_path, keep_damaged=1)
        assert again.latest_step() is None  # the only checkpoint was damaged
        again.close()
        damaged = sorted(p.name for p in (tmp_path / checkpoint.DAMAGED).iterdir())
        assert damaged == [f"checkpoints-{step}"]
        out = capsys.readouterr().out
        assert (f"checkpoint {step} in {tmp_path / checkpoint.CHECKPOINTS} is damaged (file "
                f"meta/metadata has 2 bytes instead of ") in out, out
        assert f"moved to {tmp_path / checkpoint.DAMAGED / f'checkpoints-{step}'}, " in out
        assert re.search(r", \d+\.\d KiB;", out), out
        if step > 3:
            assert "keeps the newest 1 (config.keep_damaged_checkpoints), 1 older deleted" in out
    first = checkpoint.Checkpointer(tmp_path / "zero")
    first.save(_state(1, 1.0), {})
    first.close()
    (tmp_path / "zero" / checkpoint.CHECKPOINTS / "1" / "meta" / "metadata").write_text("{}")
    none = checkpoint.Checkpointer(tmp_path / "zero", keep_damaged=0)
    assert none.latest_step() is None
    none.close()
    assert "passed over (deleted, " in capsys.readouterr().out
    assert not (tmp_path / "zero" / checkpoint.DAMAGED).exists()


def test_the_two_managers_name_their_barriers_apart(tmp_path):
    """orbax names the barrier of its "save in progress" flag alike in every manager; with
    several processes, one manager's background commit and the other's save met in it (a hang,
    or "Barrier ... is already ongoing"). Each manager's barriers carry their own prefix."""
    ckpt = checkpoint.Checkpointer(tmp_path)
    try:
        prefixes = [m._multiprocessing_options.barrier_sync_key_prefix  # pylint: disable=protected-access
                    for m in (ckpt.last, ckpt.best)]
    finally:
        ckpt.close()
    assert all(prefixes) and len(set(prefixes)) == 2, prefixes
