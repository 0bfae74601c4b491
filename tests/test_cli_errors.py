"""Issue 16, acceptance 5 (the cases of point 6): one ``zkd-...: error:`` line, exit code 2.

``zkd-train`` runs as a subprocess (``python -m zkd_jax.cli.train``, the entry point); ``zkd-convert``'s
``run`` in process. ``ZKD_TRACEBACK=1`` shows the traceback as well.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import tiny_runs
from zkd_jax.cli import convert
from zkd_jax.io import torch_weights
from zkd_jax.io import lock as workdir_lock

ROOT = pathlib.Path(__file__).resolve().parents[1]
CIFAR = f"--config={ROOT / 'configs' / 'cifar100.py'}:kd,resnet8,resnet8"


def _train(*args, cwd, extra_env=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ZKD_TRACEBACK"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **(extra_env or {}))
    return subprocess.run([sys.executable, "-m", "zkd_jax.cli.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _one_line(proc, pattern: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("zkd-train: error: ")]
    assert len(errors) == 1, lines
    assert re.search(pattern, errors[0]), errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return tiny_runs.save_teacher(tmp_path_factory.mktemp("teacher") / "resnet8")


def test_workdir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    proc = _train(CIFAR, "--workdir=file", cwd=tmp_path)
    _one_line(proc, r"workdir .*file exists and is not a directory")
    shown = _train(CIFAR, "--workdir=file", cwd=tmp_path, extra_env={"ZKD_TRACEBACK": "1"})
    assert shown.returncode == 2 and "Traceback" in shown.stderr
    assert shown.stderr.rstrip().splitlines()[-1].startswith("zkd-train: error: workdir")


def test_workdir_that_cannot_be_created(tmp_path):
    proc = _train(CIFAR, "--workdir=/proc/self/zkd_workdir", cwd=tmp_path)
    _one_line(proc, r"/proc/self/zkd_workdir; check the paths given")


def test_missing_config_file(tmp_path):
    proc = _train("--config=nowhere.py", "--workdir=w", cwd=tmp_path)
    _one_line(proc, r"cannot load the --config file: .*nowhere\.py")


def test_field_of_the_wrong_type_is_named(tmp_path):
    proc = _train(CIFAR, "--workdir=w", "--config.batch_size=abc", cwd=tmp_path)
    _one_line(proc, r"--config\.batch_size=abc is not a valid value of config\.batch_size")


def test_value_that_makes_no_sense(tmp_path):
    proc = _train(CIFAR, "--workdir=w", "--config.epochs=0", cwd=tmp_path)
    _one_line(proc, r"config\.epochs=0 is invalid: it must be an integer >= 1")
    assert not (tmp_path / "w").exists()


def test_damaged_teacher_export(tmp_path, teacher_dir):
    damaged = tmp_path / "teacher"
    shutil.copytree(teacher_dir, damaged)
    data = tiny_runs.largest_file(damaged)
    data.write_bytes(data.read_bytes()[:100])
    proc = _train(CIFAR, "--workdir=w", "--config.dataset=digits",
                  f"--config.teacher.checkpoint={damaged}", cwd=tmp_path)
    _one_line(proc, r"teacher.* is damaged \(file .*\); convert or export it again")
    (damaged / "zkd_manifest.json").unlink()  # no manifest and damaged bytes: refused unverified
    proc = _train(CIFAR, "--workdir=w", "--config.dataset=digits",
                  f"--config.teacher.checkpoint={damaged}", cwd=tmp_path)
    _one_line(proc, r"teacher.* has no zkd_manifest\.json, so it cannot be verified; .* pass "
                    r"--config\.teacher\.allow_unverified=True\.$")


def test_locked_workdir(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (tmp_path / "w").mkdir()
        (tmp_path / "w" / workdir_lock.LOCK_FILE).write_text(
            f'{{"host": "{__import__("socket").gethostname()}", "pid": {holder.pid}, '
            '"started": "now"}')
        proc = _train(CIFAR, "--workdir=w", cwd=tmp_path)
    finally:
        holder.kill()
        holder.wait()
    _one_line(proc, rf"workdir .*w is in use by pid {holder.pid} on host ")


def _fake_state_dict(_path):
    layout = torch_weights.torch_layout("resnet8", dataset="cifar100", num_classes=10)
    return {k: np.zeros(shape, np.float32) for k, (_, shape) in layout.items()}


def test_convert_errors_are_one_line(tmp_path, capsys, monkeypatch):
    assert convert.run([str(tmp_path), str(tmp_path / "out"), "--arch", "resnet8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zkd-convert: error: Is a directory"), err
    from zkd_jax.io import torch_weights as convert_io

    monkeypatch.setattr(convert_io, "load_torch_checkpoint", _fake_state_dict)
    (tmp_path / "file").write_text("")
    code = convert.run(["x.pth", str(tmp_path / "file" / "out"), "--arch", "resnet8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("zkd-convert: error: "), err
    assert convert.run(["x.pth", str(tmp_path / "ok"), "--arch", "resnet8"]) == 0


def _tensorstore_disk_full(target, *args, **kwargs):
    """What orbax raises when TensorStore meets a full disk (after its temporary directory)."""
    (pathlib.Path(f"{target}.orbax-checkpoint-tmp") / "variables").mkdir(parents=True)
    raise ValueError(f'RESOURCE_EXHAUSTED: Error writing local file "{target}.orbax-checkpoint-'
                     'tmp/manifest.ocdbt": Failed to write 113 bytes to file 7: No space left on '
                     "device [os_error_code='28']")


def test_convert_on_a_full_disk_and_with_nan_weights(tmp_path, capsys, monkeypatch):
    """Disk full (an injected ENOSPC, after orbax wrote its files; and TensorStore's form of it):
    one line naming DST and "No space left on device", no temporary left. NaN/inf weights: refused
    naming the tensor."""
    from zkd_jax.io import torch_weights as convert_io
    from zkd_jax.io import manifest

    monkeypatch.setattr(convert_io, "load_torch_checkpoint", _fake_state_dict)

    def full(directory):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(manifest, "write", full)
        assert convert.run(["x.pth", str(tmp_path / "out"), "--arch", "resnet8"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"zkd-convert: error: No space left on device while writing "
                   f"{tmp_path / 'out'}; free disk space, then rerun the same command (a "
                   "training run resumes from its last checkpoint)"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the staged copy removed
    ocp, real = convert_io._checkpointer()
    monkeypatch.setattr(real, "save", _tensorstore_disk_full)
    monkeypatch.setattr(convert_io, "_checkpointer", lambda: (ocp, real))
    assert convert.run(["x.pth", str(tmp_path / "out"), "--arch", "resnet8"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"No space left on device while writing {tmp_path / 'out'};" \
        in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # orbax's temporary removed too
    monkeypatch.undo()

    def poisoned(_path):
        sd = _fake_state_dict(_path)
        sd["layer1.0.conv1.weight"][0, 0, 0, :2] = [np.nan, np.inf]
        return sd

    monkeypatch.setattr(convert_io, "load_torch_checkpoint", poisoned)
    assert convert.run(["x.pth", str(tmp_path / "nan"), "--arch", "resnet8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["zkd-convert: error: x.pth holds non-finite values in layer1.0.conv1.weight "
                   "(1 NaN, 1 inf of 2304); it is damaged or from a run that diverged: use an "
                   "intact checkpoint."], err
    assert not (tmp_path / "nan").exists()


@pytest.mark.parametrize("text,pattern", [
    ("def get_config(:\n    pass\n", r"cannot load the --config file: invalid syntax \(.*bad\.py, line 1\)"),
    ("def get_config():\n    return None\n", r"gave no config .*must return an ml_collections"),
    ("", r"the --config file defines no get_config\(\) function"),
])
def test_broken_config_files(tmp_path, text, pattern):
    (tmp_path / "bad.py").write_text(text)
    proc = _train("--config=bad.py", "--workdir=w", cwd=tmp_path)
    _one_line(proc, pattern)
    assert not (tmp_path / "w").exists()
