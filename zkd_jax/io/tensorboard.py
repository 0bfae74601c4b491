"""A run's TensorBoard events, kept equal to its ``metrics.jsonl``.

TensorBoard event files can only be appended to, so a resume that falls back to an older
checkpoint (one that crosses an epoch end) would add the re-run epochs' points a second time.
Instead, :func:`open_writer` starts the events over whenever the run (re)starts: the event files
of earlier starts are deleted and the records ``metrics.jsonl`` keeps (those up to the checkpoint
the run resumes from) are written again, then training appends as usual. ``metrics.jsonl`` is the
record; TensorBoard shows exactly its points, each once.

Uses tensorboardX (no TensorFlow); paths go through ``etils.epath``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from etils import epath

EVENTS_PREFIX = "events.out.tfevents."


def add_record(writer, record: Mapping[str, Any]) -> None:
    """Adds one evaluation record's numeric fields at its ``step`` (not ``step``/``epoch``)."""
    step = int(record["step"])
    for key, value in record.items():
        if key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(
                value, bool):
            writer.add_scalar(key, value, step)


def open_writer(directory: epath.PathLike, records: Iterable[Mapping[str, Any]]):
    """A tensorboardX ``SummaryWriter`` on ``directory`` holding exactly ``records``.

    Raises whatever tensorboardX raises when it cannot write there (the caller decides).
    """
    from tensorboardX import SummaryWriter  # noqa: PLC0415

    directory = epath.Path(directory)
    if directory.exists():
        for old in directory.iterdir():
            if old.name.startswith(EVENTS_PREFIX):
                old.unlink()
    writer = SummaryWriter(str(directory))
    for record in records:
        add_record(writer, record)
    writer.flush()
    return writer
