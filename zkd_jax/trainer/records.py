"""Where a resume starts so that ``metrics.jsonl`` ends complete: lost records are recomputed.

A run writes an epoch's record once the epoch's checkpoint is committed, so a crash (or a damaged
line: ``zkd_jax.io.metrics.read_records`` keeps the good ones and names the bad) can leave a
checkpoint newer than the last record. Resuming from it would skip the missing epochs' records
for good. :func:`resume_for_records` moves the resume back to the newest checkpoint inside the
first epoch whose record is missing (its start, or a mid-epoch checkpoint, which carries the epoch's
running loss sums), so the epoch is trained again from there, bit-identically, and its record
computed as an uninterrupted run computes it. When no such checkpoint is kept (``keep_checkpoints``
pruned it), the resume stays where it was and the record stays missing, with a line that says so:
a record is never made up.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from etils import epath

from zkd_jax.io import metrics as metrics_io
from zkd_jax.trainer.loop import log_main


def evaluated_epochs(step: int, *, steps_per_epoch: int, epochs: int,
                     eval_every_epochs: int) -> list[int]:
    """The epochs completed by ``step`` that have a record (evaluated: every
    ``eval_every_epochs``-th and the last).

    >>> evaluated_epochs(10, steps_per_epoch=5, epochs=3, eval_every_epochs=1)
    [1, 2]
    >>> evaluated_epochs(15, steps_per_epoch=5, epochs=3, eval_every_epochs=2)
    [2, 3]
    """
    return [e for e in range(1, step // steps_per_epoch + 1)
            if e % eval_every_epochs == 0 or e == epochs]


def _choose(resume: int, checkpointers: Sequence, dirs: Sequence[epath.Path], *,
            steps_per_epoch: int, epochs: int, eval_every_epochs: int) -> int:
    evaluated = evaluated_epochs(resume, steps_per_epoch=steps_per_epoch, epochs=epochs,
                                 eval_every_epochs=eval_every_epochs)
    first, where = None, None
    for d in dirs:
        path = epath.Path(d) / metrics_io.METRICS
        records, problems = metrics_io.read_records(path)
        for problem in problems:
            log_main(f"{problem}; skipped, its {len(records)} good records are kept")
        have = {r.get("epoch") for r in records}
        missing = [e for e in evaluated if e not in have]
        if missing and (first is None or missing[0] < first):
            first, where = missing[0], path
    if first is None:
        return resume
    start, end = (first - 1) * steps_per_epoch, first * steps_per_epoch
    common = set.intersection(*(set(c.last.all_steps()) for c in checkpointers))
    inside = [s for s in common if start <= s < end and s <= resume]
    if not inside:
        log_main(f"{where}: the record of epoch {first} is missing and no checkpoint of that epoch "
                 f"is kept to compute it again; it stays missing")
        return resume
    log_main(f"{where}: the record of epoch {first} is missing; resuming from checkpoint "
             f"{max(inside)} to compute it again")
    return max(inside)


def resume_for_records(resume: int | None, checkpointers: Sequence, dirs: Sequence[epath.Path],
                       *, steps_per_epoch: int, epochs: int, eval_every_epochs: int) -> int | None:
    """The step to resume from: ``resume`` (the newest checkpoint every student has; None: a fresh
    start), or an older checkpoint where a record of ``dirs``' ``metrics.jsonl`` is missing (see the
    module docstring). Process 0 reads the files and decides; the other processes follow it."""
    if resume is None:
        return None
    choice = resume
    if jax.process_index() == 0:
        choice = _choose(resume, checkpointers, dirs, steps_per_epoch=steps_per_epoch,
                         epochs=epochs, eval_every_epochs=eval_every_epochs)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        choice = int(multihost_utils.broadcast_one_to_all(np.int32(choice)))
    return choice
