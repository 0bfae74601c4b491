"""The reference repository's training logs: ``read_worklog(path) -> list[Worklog]``.

The reference publishes one log per benchmark, ``logs/{KD,DKD,CTKD,MLKD}/NAME.txt`` with
``NAME = METHOD,TEACHER,STUDENT,BASE_TEMP,KD_WEIGHT[,BETA]``, in one of two formats:

* mdistiller's worklog: per epoch a block ``epoch: N``, ``lr: X``, ``train_acc: X``,
  ``train_loss: X``, ``test_acc: X``, ``test_acc_top5: X``, ``test_loss: X`` between lines of
  dashes, and at the end of a run a line ``best_acc<TAB>X`` (written without a newline, so the next
  run's dashes may follow on the same line);
* the CTKD tree's: a stream of JSON objects, one per epoch (``epoch``, ``test_acc``,
  ``test_acc_top5``, ``best_acc``, ``temp``, ...), one per line or spread over several.

A file may hold several runs one after another: a new run starts where the epoch number does not
increase (it starts again at 1) or after a ``best_acc`` line. Files only; no TensorFlow, no network.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

_FIELD = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*:\s*(\S+)\s*$")
_BEST = re.compile(r"best_acc\s+(-?[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?|nan|inf)")


@dataclasses.dataclass(frozen=True)
class Worklog:
    """One run of a reference log.

    Attributes:
      path: the file it was read from.
      run: its position in the file (0 for the first run).
      method, teacher, student: from the file name (None when the name has another form).
      settings: ``temperature``, ``kd_weight`` and ``beta`` (when given) from the file name.
      epochs: one dict per epoch with the file's fields (``epoch`` an int, the rest floats).
      best_acc: the run's best test top-1 (the file's ``best_acc``; else the largest ``test_acc``).
      finished: whether the file states the run's ``best_acc`` (a worklog's last line).
    """

    path: str
    run: int
    method: str | None
    teacher: str | None
    student: str | None
    settings: dict[str, float]
    epochs: list[dict[str, Any]]
    best_acc: float | None
    finished: bool

    @property
    def label(self) -> str:
        """``NAME`` (the file name without extension), with ``#run`` when the file has several."""
        stem = os.path.splitext(os.path.basename(self.path))[0]
        return stem if self.run == 0 else f"{stem}#{self.run + 1}"

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(epochs, values) of one field over the epochs that have it."""
        pairs = [(int(e["epoch"]), float(e[key])) for e in self.epochs if key in e and "epoch" in e]
        return [p[0] for p in pairs], [p[1] for p in pairs]


def parse_name(path: str) -> tuple[str | None, str | None, str | None, dict[str, float]]:
    """(method, teacher, student, settings) of ``METHOD,TEACHER,STUDENT,TEMP,WEIGHT[,BETA]``.

    A name of another form gives ``(None, None, None, {})``; numbers that do not parse are left out.
    """
    stem = os.path.splitext(os.path.basename(path))[0]
    parts = [p.strip() for p in stem.split(",")]
    if len(parts) < 3:
        return None, None, None, {}
    settings: dict[str, float] = {}
    for key, text in zip(("temperature", "kd_weight", "beta"), parts[3:6]):
        try:
            settings[key] = float(text)
        except ValueError:
            pass
    return parts[0], parts[1], parts[2], settings


def _number(text: str) -> float | int | str:
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def _split_runs(records: list[tuple[str, Any]]) -> list[tuple[list[dict], float | None]]:
    """Groups ("epoch", dict) / ("best", value) events into runs: (epochs, best_acc) each."""
    runs: list[tuple[list[dict], float | None]] = []
    epochs: list[dict] = []
    best: float | None = None
    for kind, value in records:
        if kind == "best":
            runs.append((epochs, value))
            epochs, best = [], None
            continue
        if epochs and "epoch" in value and "epoch" in epochs[-1] and (
                int(value["epoch"]) <= int(epochs[-1]["epoch"])):
            runs.append((epochs, best))
            epochs, best = [], None
        epochs.append(value)
    if epochs:
        runs.append((epochs, best))
    return runs


def _mdistiller_events(text: str) -> list[tuple[str, Any]]:
    events: list[tuple[str, Any]] = []
    block: dict[str, Any] = {}

    def close_block():
        nonlocal block
        if block:
            events.append(("epoch", block))
            block = {}

    for line in text.splitlines():
        for match in _BEST.finditer(line):
            close_block()
            events.append(("best", float(match.group(1))))
        if "best_acc" in line:
            continue
        if line.strip().startswith("---"):
            close_block()
            continue
        m = _FIELD.match(line)
        if m:
            key, value = m.group(1), _number(m.group(2))
            if key == "epoch" and "epoch" in block:
                close_block()
            block[key] = value
    close_block()
    return events


def _json_events(text: str) -> list[tuple[str, Any]]:
    decoder = json.JSONDecoder()
    events: list[tuple[str, Any]] = []
    pos = 0
    while True:
        pos = text.find("{", pos)
        if pos < 0:
            break
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            pos += 1
            continue
        if isinstance(obj, dict):
            events.append(("epoch", {k: (int(v) if k == "epoch" else v) for k, v in obj.items()}))
        pos = end
    return events


def _best_of(epochs: list[dict]) -> float | None:
    values = [float(e["best_acc"]) for e in epochs if isinstance(e.get("best_acc"), (int, float))]
    if values:
        return values[-1]
    accs = [float(e["test_acc"]) for e in epochs if isinstance(e.get("test_acc"), (int, float))]
    return max(accs) if accs else None


def read_worklog(path: str | os.PathLike) -> list[Worklog]:
    """Reads one reference log (either format); returns one :class:`Worklog` per run in the file.

    Raises:
      ValueError: the file does not exist or holds no epoch in either format.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"worklog {path!r} does not exist; pass the path of a reference log file.")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    is_json = text.lstrip().startswith("{")
    events = _json_events(text) if is_json else _mdistiller_events(text)
    method, teacher, student, settings = parse_name(path)
    out = []
    for i, (epochs, best) in enumerate(r for r in _split_runs(events) if r[0]):
        finished = best is not None
        if best is None:
            best = _best_of(epochs)
        if best is not None and not math.isfinite(best):
            best = None
        out.append(Worklog(path=path, run=i, method=method, teacher=teacher, student=student,
                           settings=dict(settings), epochs=epochs, best_acc=best,
                           finished=finished or is_json))
    if not out:
        raise ValueError(f"{path!r} holds no epoch record: expected mdistiller's worklog "
                         "('epoch: N' blocks) or one JSON object per epoch.")
    return out


def read_worklogs(directory: str | os.PathLike) -> tuple[list[Worklog], list[str]]:
    """Every ``*.txt`` / ``*.log`` / ``*.json(l)`` log under ``directory`` (recursively).

    Returns (worklogs, problems): a file that does not parse is named in ``problems``, not raised.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"--reference-logs {directory!r} is not a directory of reference logs.")
    logs: list[Worklog] = []
    problems: list[str] = []
    for root, _, files in sorted(os.walk(directory)):
        for name in sorted(files):
            if not name.endswith((".txt", ".log", ".json", ".jsonl")):
                continue
            try:
                logs.extend(read_worklog(os.path.join(root, name)))
            except ValueError as err:
                problems.append(str(err))
    return logs, problems
