"""Suite-wide set-up for CI time: JAX's persistent compilation cache, and long modules first.

Every run of the trainer compiles its own programs (no process-wide caches of compiled code), so
tests that train several runs of the same models (resume, K students, the demo) would compile the
same step again and again. JAX's persistent compilation cache, shared by the two xdist workers and
the subprocesses the tests start (they inherit the environment), loads them instead. The cache is
keyed by the program, the JAX version and the devices: it changes no result.

pytest-xdist hands tests to its two workers in collection order; a long test collected late leaves
one worker idle at the end. Moving these modules to the front (stable sort: nothing else changes
order, every worker collects the same order) lets the workers finish together.
"""

import os
import pathlib
import tempfile

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(pathlib.Path(tempfile.gettempdir()) / f"zkd_jax_test_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

LONG_MODULES = (
    "test_demo.py",
    "test_multi_student.py",
    "test_benchmark_epoch_time.py",
    "test_train_resume.py",
    "test_multihost.py",
    "test_feed.py",
    "test_epoch_loop.py",
    "test_scan_steps.py",
    "test_benchmark.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_MODULES)))
