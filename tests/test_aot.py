"""zkd-compile (``zkd_jax.aot``): the trainer's programs compiled for a TPU topology without a TPU.

The compiles run in a child process (``zkd_jax.aot.worker``) that inherits this suite's
environment (its compile options and cache); TPU topologies need libtpu (the ``tpu`` extra) and
are skipped without it. Nothing here runs a program on a device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from zkd_jax import aot  # noqa: E402
from zkd_jax.aot import chips  # noqa: E402
from zkd_jax.configs import cifar100  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = "kd_ls,resnet8,resnet8"
needs_libtpu = pytest.mark.skipif(not aot.libtpu_installed(),
                                  reason="libtpu not installed (pip install 'zkd_jax[tpu]')")


def _cli(*args: str, cwd, prelude: str = "") -> subprocess.CompletedProcess:
    code = (f"{prelude}\nimport sys\nsys.argv = ['zkd-compile', *{list(args)!r}]\n"
            "from zkd_jax.cli.compile import run\nrun()")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (
        str(ROOT), os.environ.get("PYTHONPATH")))))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600, check=False)


def test_cpu_topology_end_to_end_prints_one_json_object_per_program(tmp_path):
    result = _cli(f"--config={ROOT}/configs/cifar100.py:{SMALL}", "--topology=cpu:2",
                  "--per_chip_batch=2", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["program"] for r in records] == ["train_step", "eval_step"]
    for r in records:
        assert tuple(r) == aot.KEYS and r["status"] == "ok"
        assert r["chips"] == 2 and r["topology"] == "cpu:2" and r["libtpu_version"] is None
        assert r["total_bytes"] == (r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"]
                                    + r["temp_bytes"] + r["code_bytes"]) > 0
        assert r["flops_per_step"] > 0 and r["bytes_per_step"] > 0
        assert r["hbm_fraction"] is None and r["images_per_sec_per_chip"] is None  # no chip
    train = records[0]
    assert train["per_chip_batch"] == 2 and train["global_batch"] == 4
    assert train["alias_bytes"] > 0  # the donated state
    assert list(tmp_path.iterdir()) == []  # nothing written


@needs_libtpu
@pytest.mark.parametrize("topology,chips_,kind", [("v5e:2x2", 4, "TPU v5 lite"),
                                                 ("v5p:2x2x1", 4, "TPU v5")])
def test_a_small_cifar_step_compiles_for_tpu(topology, chips_, kind):
    report = aot.compile_programs(cifar100.get_config(SMALL).to_dict(), topology,
                                  per_chip_batch=2, only=["train_step"])
    (r,) = report.records
    assert r["status"] == "ok", r["error"]
    assert set(aot.KEYS) <= set(r) and r["device_kind"] == kind and r["chips"] == chips_
    chip = chips.CHIPS[topology.split(":")[0]]
    assert r["hbm_bytes"] == chip.hbm_bytes and 0 < r["hbm_fraction"] < 0.05
    assert r["bound"] in ("memory", "compute") and r["images_per_sec_per_chip"] > 0
    assert r["images_per_sec_slice"] == pytest.approx(chips_ * r["images_per_sec_per_chip"])
    # An epoch: 50,000 // 8 steps of 2 images per chip.
    assert r["epoch_seconds"] == pytest.approx(
        50_000 // 8 * 2 / r["images_per_sec_per_chip"])
    assert r["libtpu_version"] and report.plan["programs"] == ["train_step"]


def test_unknown_topology_lists_the_known_ones(tmp_path):
    result = _cli("--topology=v9:2x2", cwd=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("zkd-compile: error: --topology='v9:2x2' is not a known topology")
    for name in ("v5e:2x2", "v5p:2x2x1", "v5p:2x2x2", "v6e:2x2", "cpu"):
        assert name in line


def _hiding(module: str) -> str:
    """A prelude for :func:`_cli` under which ``module`` looks not installed."""
    return ("import importlib.util as u\n_find = u.find_spec\n"
            f"u.find_spec = lambda n, *a: None if n == {module!r} else _find(n, *a)")


def test_without_libtpu_one_line_names_the_extra(tmp_path):
    result = _cli("--topology=v5e:2x2", cwd=tmp_path, prelude=_hiding("libtpu"))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "needs libtpu" in line and "pip install 'zkd_jax[tpu]'" in line


def test_without_the_train_extra_one_line_names_the_tpu_extra(tmp_path):
    result = _cli("--topology=v5e:2x2", cwd=tmp_path, prelude=_hiding("ml_collections"))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("zkd-compile: error: this needs the 'tpu' extra (ml_collections")
    assert "pip install 'zkd_jax[tpu]'" in line


@needs_libtpu
def test_a_config_that_does_not_fit_exits_1_in_one_line(tmp_path):
    result = _cli(f"--config={ROOT}/configs/cifar100.py:kd,resnet8x4,resnet8x4",
                  "--topology=v5e:2x2", "--per_chip_batch=12000", cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("zkd-compile")]
    assert line.startswith("zkd-compile: error: train_step needs ")
    assert "GiB of HBM per chip at 12000 images per chip, a v5e chip has 16 GiB" in line
    assert "--per_chip_batch=" in line and "should fit" in line
    assert result.stdout == "" and list(tmp_path.iterdir()) == []


def test_a_program_that_does_not_fit_is_refused_in_one_line():
    """The refusal names the bytes needed, the chip's HBM and a per-chip batch that fits."""
    record = {"program": "train_step", "status": "does_not_fit", "total_bytes": 40 * 2**30,
              "fixed_bytes": 2**30, "per_chip_batch": 8192, "compiler_limit_bytes": None}
    with pytest.raises(aot.DoesNotFitError) as err:
        aot._refuse_if_too_big([record], chips.CHIPS["v5e"])  # pylint: disable=protected-access
    message = str(err.value)
    assert "\n" not in message
    assert "train_step needs 40.00 GiB of HBM per chip at 8192 images per chip" in message
    assert "a v5e chip has 16 GiB" in message
    # (0.9 * 16 - 1) / 39 GiB of batch-dependent bytes: 2815 images -> a power of two below.
    assert "--per_chip_batch=2048 should fit" in message
    state_only = dict(record, fixed_bytes=20 * 2**30)
    with pytest.raises(aot.DoesNotFitError, match="no batch fits: the state and teacher alone"):
        aot._refuse_if_too_big([state_only], chips.CHIPS["v5e"])  # pylint: disable=protected-access


def test_the_tpu_compilers_out_of_memory_message_is_read():
    from zkd_jax.aot.figures import out_of_memory

    text = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
            "space hbm. Used 20.50G of 15.75G hbm. Exceeded hbm capacity by 4.75G.")
    assert out_of_memory(text) == (int(20.5 * 2**30), int(15.75 * 2**30))
    other = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
             "temporaries (19.27G) exceeds available HBM (15.75G).")
    assert out_of_memory(other) == (int(19.27 * 2**30), int(15.75 * 2**30))
    assert out_of_memory("INVALID_ARGUMENT: something else") is None


def test_topologies_parse_and_chip_figures_are_sane():
    assert chips.parse_topology("v5p:2x2x2").chip.name == "v5p"
    assert chips.parse_topology("cpu:8").cpu_devices == 8
    for bad in ("v5e", "v5e:2", "tpu:2x2", "v7x:2x2"):
        with pytest.raises(ValueError, match="not a known topology"):
            chips.parse_topology(bad)
    for chip in chips.CHIPS.values():
        assert chip.source.startswith("https://cloud.google.com/tpu/docs/")
        # Every TPU generation here is memory-bound below ~100-600 FLOP per HBM byte.
        assert 100 < chip.peak_flops / chip.hbm_bandwidth < 600


def test_the_plan_holds_every_program_zkd_train_runs_with_abstract_arguments():
    """Scanned steps, K-student forms, eval: built by the trainer's setup, nothing executed."""
    import jax

    from zkd_jax.parallel import create_mesh
    from zkd_jax.trainer.programs import compile_plan

    config = cifar100.get_config(SMALL)
    config.batch_size, config.input_pipeline, config.steps_per_call = 4, "device", 2
    config.students = ({"seed": 0}, {"seed": 1, "temperature": 2.0})
    plan = compile_plan(config, create_mesh(jax.devices("cpu")[:1]), all_forms=True)
    assert [p.name for p in plan.programs] == [
        "train_step[loop]", "scanned_steps", "train_step[vmap]", "train_step[vmap_matmul]",
        "eval_step"]
    assert [p.runs for p in plan.programs] == [True, True, False, False, True]
    assert all(isinstance(x, jax.ShapeDtypeStruct)
               for x in jax.tree.leaves([p.args for p in plan.programs]))
    state, teacher, batch, _ = plan.programs[0].args
    assert state.step.shape == (2,) and batch["image"].shape == (4, 32, 32, 3)
    assert teacher["params"] and plan.programs[1].steps == 2 and plan.students == 2
    images = plan.programs[1].args[2]
    assert images.shape == (50_000, 32 * 32 * 3) and images.dtype == "uint8"  # device layout
    assert plan.steps_per_epoch == 12_500 and plan.programs[-1].args[1]["mask"].shape[0] == \
        plan.eval_batch


FAKE_WORKER = '''
import json, os, pickle, signal, sys
request = pickle.load(sys.stdin.buffer)
def emit(event, **f):
    print("ZKD_AOT " + json.dumps({"event": event, **f}), flush=True)
emit("plan", programs=["train_step", "eval_step"], topology="v6e:2x2", chips=4,
     libtpu_version="0.0.42.1", jax_version="0.10.2")
for name in ("train_step", "eval_step"):
    if name in request["skip"]:
        continue
    emit("start", program=name)
    if name == "train_step":
        os.kill(os.getpid(), signal.SIGSEGV)
    emit("program", program=name, status="ok", error=None)
'''


def test_a_compiler_crash_becomes_one_line_and_the_other_programs_still_compile(tmp_path):
    """A child that dies while compiling: its program's row says so, a fresh child goes on."""
    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\n{FAKE_WORKER}")
    fake.chmod(0o755)
    report = aot.compile_programs(cifar100.get_config(SMALL).to_dict(), "cpu", python=str(fake))
    crashed, evaluated = report.records
    assert crashed["status"] == "crashed" and evaluated["status"] == "ok"
    assert crashed["error"] == ("the compiler crashed (SIGSEGV) compiling train_step for cpu "
                                "(libtpu 0.0.42.1, jax 0.10.2)")
    assert [r["program"] for r in report.failed] == ["train_step"]


def test_the_tpu_table_script_writes_its_table_into_a_page_and_names_the_versions(tmp_path):
    """benchmarks/tpu_compile.py rewrites a page's marked block from the records (no compile)."""
    record = {"case": "v5e:2x2|cifar100:kd_ls,a,b|64|bf16|K1", "program": "train_step",
              "status": "ok", "jax_version": "0.10.2", "libtpu_version": "0.0.42.1",
              "per_chip_batch": 64, "total_bytes": 2**30, "hbm_fraction": 1 / 16,
              "flops_per_step": 2e11, "bytes_per_step": 2e9, "bound": "memory",
              "images_per_sec_per_chip": 25000.0}
    (tmp_path / "r.jsonl").write_text(json.dumps(record) + "\n")
    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- bench -->\nold table\n<!-- /bench -->\nafter\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "tpu_compile.py"), "--out=r.jsonl",
         "--table=t.md", "--only=no-such-case", f"--into={page}:bench"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    text = page.read_text()
    assert text.startswith("intro\n<!-- bench -->\nCompiled by `benchmarks/tpu_compile.py`")
    assert "(jax 0.10.2, libtpu 0.0.42.1)" in text and "old table" not in text
    assert "| v5e:2x2 | cifar100:kd_ls,a,b K1 | 64 | bf16 | train_step | 1.000 (6.2 %) |" in text
    assert text.endswith("<!-- /bench -->\nafter\n")
    assert (tmp_path / "t.md").read_text() in text
