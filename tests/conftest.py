"""Suite-wide set-up for CI time: JAX's persistent compilation cache, and long modules first.

Every run of the trainer compiles its own programs (no process-wide caches of compiled code), so
tests that train several runs of the same models (resume, K students, the demo) would compile the
same step again and again. JAX's persistent compilation cache, shared by the two xdist workers and
the subprocesses the tests start (they inherit the environment), loads them instead. The cache is
keyed by the program, the JAX version and the devices: it changes no result.

Most of the suite's time is XLA compiling small programs (losses, models, runs of a few steps), so
the tests compile with ``jax_disable_most_optimizations`` (XLA's backend optimization level 0; the
setting is part of the compile options, so cached programs never mix): compiling is about a fifth
faster and running a few steps costs little more. They also use XLA:CPU's classic fusion emitters
(``TEST_XLA_FLAGS``, in ``XLA_FLAGS``; the subprocesses the tests start append their own flags to
it): the same fused HLO, compiled about a third faster than by the newer MLIR emitters.
Comparisons within a test (resume, sharding, K students) compile both sides with the same settings;
the golden tests keep their tolerances. Tests that measure a compiled program's memory
(``memory_analysis``, from the buffer assignment of the optimized HLO, which the emitters do not
change) compile with every optimization (``xla_optimized``), and so do test_multi_student's
training runs (``every_xla_optimization``): they compare the K-student program with the single one
after 11 steps, and on some CPUs (an AVX-512 AMD EPYC), level 0 with the classic emitters rounds
the two programs differently and training grows that past the test's float32 bounds, where every
optimization (or level 0 with the default emitters) gives both the same bits. The demo's subprocess
(hundreds of steps: compute-bound) runs as users run it, without either setting.

The suite runs on JAX's CPU backend (``JAX_PLATFORMS=cpu``). The ``tpu`` extra installs libtpu (for
tests/test_chunked_kd_tpu.py, which compiles for TPU topologies without a TPU); with libtpu
installed and no ``JAX_PLATFORMS``, the first ``jax.devices()`` of every process also tries to
start a TPU backend: libtpu prints its errors about the missing TPU (accelerator type, worker
hostnames) and JAX falls back to the CPU (0.15 s instead of 0.02 s here). libtpu keeps a lockfile
(/tmp/libtpu_lockfile) that makes a second process loading it fail; ``ALLOW_MULTIPLE_LIBTPU_LOAD=1``
lets both xdist workers (and their subprocesses) load it for compiling.

run_tests.sh gives each xdist worker whole files (``--dist loadfile``): a module's fixtures (the
training runs most end-to-end modules share) run once, not once per worker that got some of its
tests. Files go out in collection order (``--no-loadscope-reorder``), each to the first free
worker, so the longest files are moved to the front here (a stable sort: nothing else changes
order); a long file collected late would leave the other worker idle at the end.
"""

import os
import pathlib
import sys
import tempfile

import pytest

from cpu_devices import TEST_XLA_FLAGS, every_xla_optimization

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # read when JAX first starts a backend (see above)
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(pathlib.Path(tempfile.gettempdir()) / f"zkd_jax_test_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")  # read when JAX is imported
# XLA:CPU's classic fusion emitters (see above); read when JAX's CPU backend starts.
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
if "jax" in sys.modules:  # a plugin imported JAX before this file: set it there too
    sys.modules["jax"].config.update(
        "jax_disable_most_optimizations", os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] == "1")

LONG_MODULES = (  # longest first, from --durations of a whole run
    "test_demo.py",
    "test_models_golden.py",
    "test_aot.py",  # TPU compiles (libtpu) in child processes
    "test_vit_train.py",
    "test_losses.py",
    "test_report_runs.py",
    "test_scan_steps.py",
    "test_multi_student.py",
    "test_models.py",
    "test_layers.py",
    "test_run_guards.py",
    "test_faults_multihost.py",
    "test_faults.py",
    "test_run_identity.py",
    "test_benchmark_epoch_time.py",
    "test_train_resume.py",
    "test_multihost.py",
    "test_manifest.py",
    "test_benchmark.py",
    "test_tempered_kl.py",
    "test_chunked_kd.py",
    "test_chunked_kd_tpu.py",
    "test_feed.py",
    "test_workdir_lock.py",
    "test_cli_errors.py",
    "test_cli_help.py",
    "test_models_vit.py",
    "test_data_pipelines.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_MODULES)))


@pytest.fixture
def xla_optimized():
    """Compiles with every XLA optimization inside the test (conftest's docstring), e.g. to read
    a compiled program's memory as users get it."""
    with every_xla_optimization():
        yield
