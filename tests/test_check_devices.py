"""zkd_jax.cli.check_devices: the workers' refusal to train on the wrong (or no) accelerator."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import pytest

from zkd_jax.cli import check_devices

ROOT = Path(__file__).resolve().parents[1]


def _devices(n: int, platform: str = "tpu", kind: str = "TPU v4") -> list[SimpleNamespace]:
    return [SimpleNamespace(platform=platform, device_kind=kind, id=i) for i in range(n)]


def test_matching_devices_pass():
    assert check_devices.problem(_devices(16), _devices(4), platform="tpu", count=16,
                                 per_host=4, kind="v4") is None
    assert check_devices.problem(_devices(8, kind="TPU v6 lite"), _devices(8, kind="TPU v6 lite"),
                                 platform="tpu", count=8, per_host=8, kind="v6") is None


@pytest.mark.parametrize("local,devices,kwargs,expected", [
    (_devices(1, "cpu", "cpu"), _devices(1, "cpu", "cpu"), {}, "expected TPU devices, JAX found 1 cpu"),
    (_devices(4, kind="TPU v5 lite"), _devices(4, kind="TPU v5 lite"), {"kind": "v4"},
     "expected v4 devices, JAX found TPU v5 lite"),
    (_devices(2), _devices(8), {"per_host": 4}, "expected 4 TPU devices on this host, JAX found 2"),
    (_devices(4), _devices(4), {"per_host": 4}, "expected 16 TPU devices in all, JAX found 4"),
])
def test_wrong_devices_are_named_in_one_line(local, devices, kwargs, expected):
    message = check_devices.problem(devices, local, platform="tpu", count=16, **kwargs)
    assert message is not None and expected in message and "\n" not in message


def test_main_in_process_accepts_this_machine_and_refuses_a_tpu(capsys):
    n = jax.device_count()
    assert check_devices.main(["--platform=cpu", f"--count={n}", f"--per-host={n}"]) == 0
    assert check_devices.main(["--platform=tpu", "--count=4"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zkd-check-devices: expected TPU devices")
    assert check_devices.main(["--platform=cpu", "--count=0"]) == 2


def test_refuses_with_jax_platforms_cpu_in_one_line():
    """As on a worker whose JAX ends up on the CPU: one line on stderr, a non-zero exit."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("ZKD_DISTRIBUTED", None)
    result = subprocess.run([sys.executable, "-m", "zkd_jax.cli.check_devices", "--platform=tpu",
                             "--count=8", "--per-host=8", "--kind=v6"], capture_output=True,
                            text=True, env=env, timeout=120, check=False)
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("zkd-check-devices: expected TPU devices, JAX found")
