"""Measures how far a run's config and one of its batches travel through ``zkd_jax``.

Runs ``zkd-train``'s ``main`` in this process on a given config (its flags set directly, no
command line parsed) under ``sys.setprofile`` and records, for every call of a Python function
defined in the ``zkd_jax`` package:

* **the config path**: the files whose functions receive a config, i.e. a
  ``ml_collections.ConfigDict`` (``FrozenConfigDict`` included, and every sub-config such as
  ``config.method`` or ``config.optimizer``) as an argument or a closure variable, directly or one
  level down (an item of a tuple, list or dict, or a field of a dataclass). Every call of the run
  counts, from the command's entry to the last summary (a superset of the way to the train step);
  ``before_step`` lists the files reached before the first train step.
* **the batch path**: the files whose functions hold one training batch: receive it (as an
  argument, a closure variable or a default of a function they are handed), bind it to a local
  name (seen when they return or yield), or return or yield it. A batch is a mapping with the
  entries ``"image"`` and ``"label"`` and no ``"mask"`` (evaluation batches carry one) whose
  ``"image"`` is an array, NumPy (the host batch tf.data hands over) or ``jax.Array`` (the global
  batch on the devices, and its traced form inside a jitted function that builds or reads it);
  again directly or one level down. The path ends at the step: the first function of
  ``zkd_jax/step/`` that receives a batch is its last file, and nothing it calls is counted (the
  model, the method and the losses are the step's own business). The tf.data graph functions that
  compute a batch hold TensorFlow tensors, not arrays: they make the batch, they are not on its
  path.

Files are listed in the order of their first such call, each with the functions that did it.

Usage (the tiny runs of ``tests/tiny_runs.py`` on the offline digits)::

    python tools/call_path.py [--input_pipeline=device|tfdata] [--steps_per_call=N]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import pathlib
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Path:
    """The files of one path in call order, each with the functions (``name``) that put it there."""

    files: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    #: ``(file, function) -> {file of the nearest zkd_jax caller}`` (None: called from outside).
    callers: dict[tuple[str, str], set] = dataclasses.field(default_factory=dict)

    def add(self, file: str, function: str, caller: str | None = None) -> None:
        names = self.files.setdefault(file, [])
        if function not in names:
            names.append(function)
        self.callers.setdefault((file, function), set()).add(caller)

    @property
    def count(self) -> int:
        return len(self.files)


@dataclasses.dataclass
class Measurement:
    """What :func:`measure` found: the config path (and its part before the first train step) and
    the batch path, files relative to the repository root (``zkd_jax/...``)."""

    config: Path
    config_before_step: Path
    batch: Path

    def report(self) -> str:
        lines = []
        for title, path in (("config (whole run)", self.config),
                            ("config (before the first train step)", self.config_before_step),
                            ("batch (feed to step)", self.batch)):
            calls = sum(len(v) for v in path.files.values())
            lines.append(f"{title}: {path.count} files, {calls} functions")
            lines += [f"  {f}: {', '.join(names)}" for f, names in path.files.items()]
        return "\n".join(lines)


def _is_config(x: Any) -> bool:
    return isinstance(x, ml_collections.ConfigDict)


def _is_batch(x: Any) -> bool:
    if not isinstance(x, Mapping) or isinstance(x, ml_collections.ConfigDict):
        return False
    try:
        if "image" not in x or "label" not in x or "mask" in x:
            return False
        image = x["image"]
    except Exception:  # pylint: disable=broad-except
        return False
    import jax  # pylint: disable=import-outside-toplevel

    return isinstance(image, (np.ndarray, jax.Array))


def _one_level(x: Any):
    """``x`` and the values one level inside it (sequence items, mapping values, dataclass fields,
    a function's defaults and closure cells)."""
    yield x
    if isinstance(x, (tuple, list)):
        yield from x[:64]
    elif isinstance(x, dict) and not _is_batch(x):
        yield from list(x.values())[:64]
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        for f in dataclasses.fields(x):
            yield getattr(x, f.name, None)
    elif inspect.isfunction(x):
        yield from x.__defaults__ or ()
        for cell in x.__closure__ or ():
            with contextlib.suppress(ValueError):  # an empty cell
                yield cell.cell_contents


def _holds(values, predicate: Callable[[Any], bool]) -> bool:
    return any(predicate(v) for x in values for v in _one_level(x))


def _arguments(frame) -> list:
    """The values of a frame's arguments (``*args`` and ``**kwargs`` spread) and closure
    variables, at its call."""
    code, local = frame.f_code, frame.f_locals
    n = code.co_argcount + code.co_kwonlyargcount
    star = code.co_varnames[n] if code.co_flags & inspect.CO_VARARGS else None
    n += star is not None
    starstar = code.co_varnames[n] if code.co_flags & inspect.CO_VARKEYWORDS else None
    n += starstar is not None
    values = []
    for name in code.co_varnames[:n] + code.co_freevars:
        if name not in local:
            continue
        v = local[name]
        if name == star and isinstance(v, tuple):
            values += list(v)
        elif name == starstar and isinstance(v, dict):
            values += list(v.values())
        else:
            values.append(v)
    return values


class _Tracer:
    """The ``sys.setprofile`` hook: records the two paths (module docstring)."""

    def __init__(self, package: pathlib.Path):
        self.package = str(package) + "/"
        self.step_dir = str(package / "step") + "/"
        self.root = str(package.parent) + "/"
        self.result = Measurement(Path(), Path(), Path())
        self.step_frame = None  # the step's frame while the step runs
        self.stepped = False  # a train step was reached
        self.lock = threading.Lock()

    def __call__(self, frame, event: str, arg) -> None:
        if event not in ("call", "return"):
            return
        file = frame.f_code.co_filename
        if not file.startswith(self.package):
            return
        with self.lock:
            self._event(frame, event, arg, file)

    def _event(self, frame, event: str, arg, file: str) -> None:
        name = frame.f_code.co_qualname
        rel = file[len(self.root):]
        if event == "return":
            if frame is self.step_frame:
                self.step_frame = None
            elif self.step_frame is None and _holds([arg, *frame.f_locals.values()], _is_batch):
                self.result.batch.add(rel, name)
            return
        args = _arguments(frame)
        if _holds(args, _is_config):
            caller = self._caller(frame)
            self.result.config.add(rel, name, caller)
            if not self.stepped:
                self.result.config_before_step.add(rel, name, caller)
        if self.step_frame is None and _holds(args, _is_batch):
            self.result.batch.add(rel, name)
            if file.startswith(self.step_dir):
                self.step_frame, self.stepped = frame, True


    def _caller(self, frame) -> str | None:
        """The file of the nearest caller of ``frame`` defined in the package."""
        frame = frame.f_back
        while frame is not None and not frame.f_code.co_filename.startswith(self.package):
            frame = frame.f_back
        return None if frame is None else frame.f_code.co_filename[len(self.root):]


@contextlib.contextmanager
def _flags(module, **values):
    """``zkd-train``'s flags set to ``values`` (its ``_FLAGS`` holders), restored after."""

    class Holder:  # pylint: disable=too-few-public-methods
        def __init__(self, value):
            self.value = value

    saved = dict(module._FLAGS)  # pylint: disable=protected-access
    module._FLAGS.update({k: Holder(v) for k, v in values.items()})  # pylint: disable=protected-access
    try:
        yield
    finally:
        module._FLAGS.clear()  # pylint: disable=protected-access
        module._FLAGS.update(saved)  # pylint: disable=protected-access


@contextlib.contextmanager
def _logging_restored():
    """The log levels ``zkd-train`` quiets (``cli.usage.quiet_logs``) put back after the run, so
    that measuring in a test process leaves the other tests' logging as it was."""
    import logging  # pylint: disable=import-outside-toplevel
    import os  # pylint: disable=import-outside-toplevel

    from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel

    names = ("absl", "orbax", "jax", "tensorflow")
    levels = {n: logging.getLogger(n).level for n in names}
    verbosity, tf_level = absl_logging.get_verbosity(), os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    try:
        yield
    finally:
        absl_logging.set_verbosity(verbosity)
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)
        if tf_level is None:
            os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
        else:
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = tf_level


def run_main(config: ml_collections.ConfigDict, workdir: str) -> None:
    """``zkd-train --workdir=WORKDIR`` on ``config``, in this process."""
    from zkd_jax.cli import train  # pylint: disable=import-outside-toplevel

    with _logging_restored(), _flags(train, config=config, workdir=str(workdir), verbose=True,
                                     print_config=False, allow_config_change=False):
        train.main(["zkd-train"])


def measure(config: ml_collections.ConfigDict, workdir: str,
            entry: Callable[[ml_collections.ConfigDict, str], Any] = run_main) -> Measurement:
    """The config and batch paths (module docstring) of ``entry(config, workdir)``."""
    import zkd_jax  # pylint: disable=import-outside-toplevel

    tracer = _Tracer(pathlib.Path(zkd_jax.__file__).resolve().parent)
    threading.setprofile(tracer)
    sys.setprofile(tracer)
    try:
        entry(config, workdir)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    return tracer.result


def tiny_config(teacher_dir: str, *, input_pipeline: str = "device",
                steps_per_call: int = 1) -> ml_collections.ConfigDict:
    """``tests/tiny_runs.py``'s run (resnet8 KD on 160 digits) for one epoch of 5 steps."""
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_runs  # pylint: disable=import-outside-toplevel

    config = tiny_runs.config(teacher_dir)
    config.epochs = 1
    config.checkpoint_every_steps = 0
    config.input_pipeline = input_pipeline
    config.steps_per_call = steps_per_call
    return config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--input_pipeline", default="device", choices=("device", "tfdata"))
    parser.add_argument("--steps_per_call", type=int, default=1)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_runs  # pylint: disable=import-outside-toplevel

    with tempfile.TemporaryDirectory() as tmp:
        teacher = tiny_runs.save_teacher(pathlib.Path(tmp) / "teacher")
        config = tiny_config(teacher, input_pipeline=args.input_pipeline,
                             steps_per_call=args.steps_per_call)
        print(measure(config, str(pathlib.Path(tmp) / "run")).report())


if __name__ == "__main__":
    main()
