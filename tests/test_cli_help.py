"""Every ``zkd-*`` command helps: its own ``--help`` (exit 0), one line and exit code 2 for a usage
error with the closest names, a missing extra named, and ``zkd-train --print_config``.

Each command runs as a subprocess (its flags are absl's process-wide ``FLAGS``); the ones that
import no JAX cost about a second.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from zkd_jax.cli import usage
from zkd_jax.configs import cifar100, cifar100_vit, common, demo, fields, imagenet

ROOT = pathlib.Path(__file__).resolve().parents[1]
CIFAR = f"--config={ROOT / 'configs' / 'cifar100.py'}:ctkd_ls,resnet32x4,resnet8x4"


def _run(module: str, *args: str, prelude: str = "pass") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ZKD_TRACEBACK"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    code = (f"import sys; {prelude}; sys.argv = [{module!r}, *{list(args)!r}]; "
            f"import runpy; runpy.run_module({module!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def _one_error_line(proc, prog: str) -> str:
    assert proc.returncode == usage.EXIT_USAGE, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), lines
    return lines[0]


@pytest.mark.parametrize("module, prog, flags", [
    ("zkd_jax.cli.train", "zkd-train", ["--config", "--workdir", "--print_config", "--verbose"]),
    ("zkd_jax.cli.convert", "zkd-convert", ["--arch", "--dataset", "--num-classes", "--force"]),
    ("zkd_jax.cli.report", "zkd-report", ["--out", "--layout", "--reference-logs", "--figures"]),
    ("zkd_jax.cli.analyze", "zkd-analyze", ["--teacher", "--student", "--out", "--split"]),
    ("zkd_jax.cli.compile", "zkd-compile", ["--config", "--topology", "--per_chip_batch", "--json"]),
])
def test_help_lists_the_commands_own_flags(module, prog, flags):
    proc = _run(module, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith(f"usage: {prog}") and "examples:" in out and usage.EXIT_CODES in out
    for flag in flags:
        line = next((ln for ln in out.splitlines() if ln.startswith(f"  {flag}:")), None)
        assert line is not None and len(line) > len(flag) + 8, (flag, out)
    assert "Try --helpfull" not in out and "absl.logging" not in out


def test_check_devices_help_has_an_example_and_the_exit_codes():
    proc = _run("zkd_jax.cli.check_devices", "--help")
    assert proc.returncode == 0 and "--platform" in proc.stdout and "example:" in proc.stdout


def test_misspelled_config_field_suggests_the_closest():
    line = _one_error_line(_run("zkd_jax.cli.train", "--config.sed=1", "--workdir=w"), "zkd-train")
    assert "did you mean 'seed'?" in line
    nested = _one_error_line(_run("zkd_jax.cli.train", CIFAR, "--config.optimizer.lrr=1",
                                  "--workdir=w"), "zkd-train")
    assert "'optimizer.lrr'" in nested and "did you mean 'optimizer.lr'" in nested
    line = _one_error_line(_run("zkd_jax.cli.compile", "--config.sed=1", "--topology=cpu"),
                           "zkd-compile")
    assert "did you mean 'seed'?" in line


def test_misspelled_flag_and_missing_arguments_exit_2():
    line = _one_error_line(_run("zkd_jax.cli.report", "--ot=x", "runs"), "zkd-report")
    assert "did you mean 'out'?" in line
    _one_error_line(_run("zkd_jax.cli.report"), "zkd-report")
    _one_error_line(_run("zkd_jax.cli.analyze", "--teacher=nowhere", "--student=nowhere",
                         "--out=nowhere"), "zkd-analyze")


def test_missing_extra_is_named(tmp_path):
    line = _one_error_line(_run("zkd_jax.cli.report", str(tmp_path),
                                prelude="sys.modules['matplotlib'] = None"), "zkd-report")
    assert "pip install 'zkd_jax[report]'" in line


def test_print_config_lists_every_field_with_its_help():
    proc = _run("zkd_jax.cli.train", CIFAR, "--config.seed=3", "--print_config")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.strip() == ""
    config = cifar100.get_config("ctkd_ls,resnet32x4,resnet8x4")
    lines = proc.stdout.splitlines()
    assert len(lines) == len(list(fields.flatten(config)))
    assert any(ln.startswith("seed = 3 ") and "# random seed" in ln for ln in lines)
    assert any(ln.startswith("method.ctkd.t_end = 20.0") for ln in lines)
    assert all(" # " in ln for ln in lines), [ln for ln in lines if " # " not in ln]


def _all_configs():
    yield demo.get_config()
    for variant in common.METHODS:
        yield cifar100.get_config(f"{variant},resnet32x4,resnet8x4")
        yield imagenet.get_config(f"{variant},ResNet34,ResNet18")
    yield cifar100.get_config("teacher,resnet32x4")
    for arg in ("kd_ls,resnet56,deit_ti", "kd,resnet56,pvt_ti", "base,pit_ti", "teacher,resnet56"):
        yield cifar100_vit.get_config(arg)


def test_every_config_field_has_one_line_of_help():
    missing = sorted({name for config in _all_configs() for name, _ in fields.flatten(config)
                      if not fields.help_for(name)})
    assert not missing, f"add these to zkd_jax/configs/fields.py FIELDS: {missing}"
    assert all("\n" not in text and len(text) <= 100 for text in fields.FIELDS.values())


def test_did_you_mean_and_missing_modules():
    assert usage.closest("epohcs", ["epochs", "seed"]) == ["epochs"]
    assert usage.did_you_mean("zzz", ["epochs"]) == ""
    assert usage.missing(["json", "surely_not_a_module_zkd"]) == ["surely_not_a_module_zkd"]
    assert usage.install_hint("matplotlib.pyplot") == "pip install 'zkd_jax[report]'"


def test_analyze_prints_only_its_own_lines(tmp_path):
    """At the default verbosity no library log (orbax, absl, TensorFlow) reaches the terminal."""
    import tiny_runs

    for run in ("teacher", "student"):
        tiny_runs.save_teacher(tmp_path / run / "export", seed=len(run))
    proc = _run("zkd_jax.cli.analyze", f"--teacher={tmp_path / 'teacher'}",
                f"--student={tmp_path / 'student'}", f"--out={tmp_path / 'out'}",
                "--dataset=digits", "--limit=32", "--tsne_samples=16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.strip() == "", proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("student: agreement "), lines
    assert lines[1].startswith("wrote ") and (tmp_path / "out" / "analysis.json").exists()
