"""Test ordering for CI time: the long end-to-end modules start first.

pytest-xdist hands tests to its two workers in collection order; a long test collected late leaves
one worker idle at the end. Moving these modules to the front (stable sort: nothing else changes
order, every worker collects the same order) lets the workers finish together.
"""

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
