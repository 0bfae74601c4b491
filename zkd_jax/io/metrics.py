"""What a run writes for people: metrics.jsonl, TensorBoard events, summary.json, a progress bar.

* ``metrics.jsonl``: one JSON object per evaluation: ``epoch``, ``step``, ``lr``, the epoch's mean
  train loss terms (``train_loss``, ``train_ce``, ``train_kd``, ...), ``top1``, ``top5`` (test, %),
  ``images_per_sec`` (training throughput of the epoch), ``epoch_seconds`` (training time of the
  epoch), ``eval_seconds`` (its evaluation) and ``run`` (the run's identity:
  dataset, method, teacher, student, seed; ``zkd_jax.trainer.identity.run_identity``).
* TensorBoard event files (tensorboardX; no TensorFlow) with the same scalars, rewritten from
  ``metrics.jsonl`` when a run resumes (``zkd_jax.io.tensorboard``): each point once.
* ``summary.json``: ``best_top1``, ``best_epoch``, ``last_top1``, ``last_epoch``, the run's
  identity (``run``: dataset, method, teacher, student, seed; also ``seed``), ``wall_seconds``
  (training and evaluation, summed over the epochs of ``metrics.jsonl``), ``images_per_sec``
  (median epoch) and the config.

Only process 0 writes. Paths go through ``etils.epath`` (``gs://`` works); files are rewritten whole
rather than appended, which object stores support, and atomically (``zkd_jax.io.atomic``: a
temporary file, ``fsync``, rename), so a crash never leaves a cut file. A ``metrics.jsonl`` damaged
anyway (a cut or garbled line, e.g. copied by hand or from an older version) is read line by line:
:func:`read_records` keeps the good records and names the file and each bad line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from absl import logging
from etils import epath

from zkd_jax.io import atomic, tensorboard

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
TENSORBOARD = "tensorboard"


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Keeps metrics.jsonl and the TensorBoard events of a run."""

    def __init__(self, workdir: epath.PathLike, *, enabled: bool = True, resume_step: int = 0):
        """Opens the writers; records of steps after ``resume_step`` (a crashed run's) are dropped."""
        self.enabled = enabled
        self.path = epath.Path(workdir) / METRICS
        self.records: list[dict] = []
        self._tb = None
        if not enabled:
            return
        records, _ = read_records(self.path)  # the trainer names the damage (trainer.records)
        self.records = [r for r in records if r.get("step", 0) <= resume_step]
        try:  # rewritten from the records kept: no point twice after a fallback (io.tensorboard)
            self._tb = tensorboard.open_writer(epath.Path(workdir) / TENSORBOARD, self.records)
        except Exception as err:  # pylint: disable=broad-except
            # e.g. gs:// without google-cloud-storage installed: keep training, say so once.
            logging.warning("TensorBoard events are not written (%s); metrics.jsonl still is.", err)
            self._tb = None

    def write(self, record: Mapping[str, Any]) -> None:
        """Adds one evaluation record (rewrites metrics.jsonl) and its scalars to TensorBoard."""
        if not self.enabled:
            return
        record = {k: _json_value(v) for k, v in record.items()}
        self.records.append(record)
        atomic.write_text(self.path,
                          "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records))
        if self._tb is not None:
            tensorboard.add_record(self._tb, record)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def run_totals(records: list[Mapping[str, Any]]) -> dict[str, Any]:
    """``wall_seconds`` (sum of the records' ``epoch_seconds`` + ``eval_seconds``) and
    ``images_per_sec`` (median over the records) of a run's metrics records."""
    rates = sorted(float(r["images_per_sec"]) for r in records
                   if isinstance(r.get("images_per_sec"), (int, float)))
    wall = sum(float(r.get("epoch_seconds", 0.0)) + float(r.get("eval_seconds", 0.0))
               for r in records)
    median = None
    if rates:
        mid = len(rates) // 2
        median = rates[mid] if len(rates) % 2 else 0.5 * (rates[mid - 1] + rates[mid])
    return {"wall_seconds": wall if records else None, "images_per_sec": median}


def write_summary(workdir: epath.PathLike, summary: Mapping[str, Any]) -> None:
    """Writes ``summary.json`` (indented, keys sorted) atomically."""
    path = epath.Path(workdir) / SUMMARY
    atomic.write_text(path, json.dumps(dict(summary), indent=2, sort_keys=True, default=str) + "\n")


def read_summary(workdir: epath.PathLike) -> dict | None:
    """``summary.json`` of ``workdir`` (None: there is none).

    Raises:
      ValueError: it is not a JSON object (the message names the file).
    """
    path = epath.Path(workdir) / SUMMARY
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path} is damaged ({_short(err)}); rerun the run to write it "
                         "again.") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{path} is damaged (not a JSON object); rerun the run to write it again.")
    return summary


def _short(err: Exception) -> str:
    return " ".join(str(err).split())[:120] or type(err).__name__


def read_records(path: epath.PathLike) -> tuple[list[dict], list[str]]:
    """The good records of a ``metrics.jsonl`` file and one message per damaged line.

    A line is damaged when it is not UTF-8, not JSON or not a JSON object (a cut last line, binary
    garbage); it is skipped and named: ``"<path> line 3 is damaged (not JSON: ...)"``. A missing
    file has no records.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "metrics.jsonl")
    >>> _ = open(p, "wb").write(b'{"epoch": 1}\\n{"epo')
    >>> records, problems = read_records(p)
    >>> records, problems[0][len(p):len(p) + 37]
    ([{'epoch': 1}], ' line 2 is damaged (not JSON: Untermi')
    """
    path = epath.Path(path)
    if not path.exists():
        return [], []
    records, problems = [], []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            problems.append(f"{path} line {number} is damaged (not UTF-8 text)")
            continue
        except ValueError as err:
            problems.append(f"{path} line {number} is damaged (not JSON: {_short(err)})")
            continue
        if not isinstance(record, dict):
            problems.append(f"{path} line {number} is damaged (not a JSON object)")
            continue
        records.append(record)
    return records, problems


def read_metrics(workdir: epath.PathLike) -> list[dict]:
    """The good records of ``workdir/metrics.jsonl`` (damaged lines skipped)."""
    return read_records(epath.Path(workdir) / METRICS)[0]


class Progress:
    """A tqdm bar per epoch showing loss, lr and images/s (silent when disabled)."""

    def __init__(self, *, epoch: int, epochs: int, total: int, initial: int, enabled: bool):
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total, initial=initial, desc=f"epoch {epoch}/{epochs}", unit="step",
                leave=False, dynamic_ncols=True,
            )

    def update(self, n: int, **postfix: float) -> None:
        if self._bar is None:
            return
        self._bar.update(n)
        if postfix:
            self._bar.set_postfix(
                {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                refresh=False,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
