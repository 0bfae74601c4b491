"""How far a run's config and one of its batches travel (``tools/call_path.py``), on a tiny run.

One ``zkd-train`` run in this process (its ``main``, tests/tiny_runs.py's resnet8 KD on 160 digits,
one epoch of 5 steps, the on-device input) under the tool's ``sys.setprofile`` hook: the config
visits at most 8 files of the package, one batch at most 5 from the feed to the step, and no function
outside ``configs/``, ``trainer/`` and ``cli/`` receives a ``ConfigDict`` (but for those another
change is moving behind the trainer, listed below).
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import ml_collections
import pytest

import tiny_runs

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("call_path", ROOT / "tools" / "call_path.py")
call_path = importlib.util.module_from_spec(_spec)
sys.modules["call_path"] = call_path  # dataclasses look their module up
_spec.loader.exec_module(call_path)

#: Where a whole config may go.
CONFIG_READERS = ("zkd_jax/configs/", "zkd_jax/trainer/", "zkd_jax/cli/")

#: Functions outside them allowed to receive a config: ``(file, function) -> the callers' files
#: allowed`` (None: any). None today.
ALLOWED: dict[tuple[str, str], set[str] | None] = {}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    root = tmp_path_factory.mktemp("call_path")
    teacher = tiny_runs.save_teacher(root / "teacher")
    config = call_path.tiny_config(teacher, input_pipeline="device")
    result = call_path.measure(config, str(root / "run"))
    print(result.report())
    return result


def test_the_paths_run_from_the_command_to_the_step(measured):
    """The tool saw the run: the config goes from the command line to the trainer's door; the
    batch comes out of the data package and ends in the step."""
    config_files = list(measured.config.files)
    assert config_files[0].startswith(("zkd_jax/cli/", "zkd_jax/trainer/")), config_files
    assert "zkd_jax/trainer/runs.py" in config_files, config_files  # the one door
    assert "zkd_jax/trainer/setup.py" in config_files
    batch_files = list(measured.batch.files)
    assert batch_files[0].startswith("zkd_jax/data/"), batch_files
    assert batch_files[-1] == "zkd_jax/step/train_step.py", batch_files
    assert "zkd_jax/trainer/loop.py" in batch_files


def test_the_config_visits_at_most_8_files(measured):
    assert measured.config.count <= 8, measured.report()


def test_one_batch_visits_at_most_5_files(measured):
    assert measured.batch.count <= 5, measured.report()


def _outside(path) -> dict:
    """``(file, function) -> callers`` of the config's visits outside the config readers that
    :data:`ALLOWED` does not excuse."""
    found = {}
    for (file, function), callers in path.callers.items():
        if file.startswith(CONFIG_READERS):
            continue
        allowed = ALLOWED.get((file, function), set())
        if allowed is None or callers <= allowed:
            continue
        found[(file, function)] = sorted(map(str, callers - allowed))
    return found


def test_no_function_below_the_trainer_receives_a_config(measured):
    assert not _outside(measured.config), measured.report()


def test_the_tracer_sees_a_config_handed_down(tmp_path):
    """A sub-config handed to a function of the package's lower layers is found (and so fails
    the check above), as is a batch returned by a data function."""

    def entry(config, workdir):  # pylint: disable=unused-argument
        import numpy as np  # pylint: disable=import-outside-toplevel

        from zkd_jax import methods  # pylint: disable=import-outside-toplevel
        from zkd_jax.data import device  # pylint: disable=import-outside-toplevel

        methods.from_config(config.method)
        device.normalize_batch({"image": np.zeros((1, 2, 2, 3), np.uint8),
                                "label": np.zeros((1,), np.int32)}, mean=(0, 0, 0), std=(1, 1, 1))

    config = ml_collections.ConfigDict({"method": {"name": "kd"}})
    got = call_path.measure(config, str(tmp_path), entry=entry)
    assert _outside(got.config) == {("zkd_jax/methods.py", "from_config"): ["None"]}
    assert list(got.batch.files) == ["zkd_jax/data/device.py"]
