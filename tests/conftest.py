"""Suite-wide set-up for CI time: JAX's persistent compilation cache, and long modules first.

Every run of the trainer compiles its own programs (no process-wide caches of compiled code), so
tests that train several runs of the same models (resume, K students, the demo) would compile the
same step again and again. JAX's persistent compilation cache, shared by the two xdist workers and
the subprocesses the tests start (they inherit the environment), loads them instead. The cache is
keyed by the program, the JAX version and the devices: it changes no result.

run_tests.sh gives each xdist worker whole files (``--dist loadfile``): a module's fixtures (the
training runs most end-to-end modules share) run once, not once per worker that got some of its
tests. Files go out in collection order (``--no-loadscope-reorder``), each to the first free
worker, so the longest files are moved to the front here (a stable sort: nothing else changes
order); a long file collected late would leave the other worker idle at the end.
"""

import os
import pathlib
import tempfile

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(pathlib.Path(tempfile.gettempdir()) / f"zkd_jax_test_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

LONG_MODULES = (  # longest first, from --durations of a whole run
    "test_demo.py",
    "test_report_runs.py",
    "test_models_golden.py",
    "test_benchmark_epoch_time.py",
    "test_scan_steps.py",
    "test_vit_train.py",
    "test_losses.py",
    "test_run_guards.py",
    "test_manifest.py",
    "test_multi_student.py",
    "test_workdir_lock.py",
    "test_feed.py",
    "test_models.py",
    "test_tempered_kl.py",
    "test_cli_errors.py",
    "test_multihost.py",
    "test_layers.py",
    "test_train_resume.py",
    "test_lm_distill_example.py",
    "test_chunked_kd_sharded.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_MODULES)))
