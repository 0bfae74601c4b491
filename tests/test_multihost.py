"""The multi-host path, proven with CPU processes on this machine.

* Two processes joined by ``jax.distributed`` (coordinator on 127.0.0.1, a free port, gloo
  collectives, two CPU devices each: a 4-device mesh) each read their half of every global batch of
  a fabricated dataset and train a small KD+LS student with the trainer's step; the parameters equal
  those of one process (one device) fed the same global batches.
* The on-device feed (``zkd_jax.data.feeds``, digits) builds the same global batches in two processes as
  in one.
* The checkpoint the two processes wrote restores in one process, and training continues there to
  the same parameters as an uninterrupted one-process run.
* ``zkd_jax.parallel.distributed.initialize``'s decisions (with ``jax.distributed.initialize`` replaced by
  a recorder: this pytest process stays single-process).

The processes run tests/multihost_worker.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from cpu_devices import with_devices
from zkd_jax.parallel import distributed

ZKD_VARS = (distributed.ENV_ENABLED, distributed.ENV_COORDINATOR_ADDRESS,
            distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID)


class FakeJax:
    """Stands in for ``jax.distributed.initialize``: records every call and, asked without a
    coordinator, does what JAX does: joins the cluster it detects (``cluster``) or raises the
    ValueError of no cluster; ``backend_started`` raises JAX's too-late RuntimeError."""

    def __init__(self):
        self.calls: list[dict] = []
        self.cluster = False
        self.backend_started = False

    def initialize(self, **kw):
        self.calls.append(kw)
        if self.backend_started:
            raise RuntimeError("jax.distributed.initialize() must be called before any JAX calls "
                               "that might initialise the XLA backend.")
        if "coordinator_address" not in kw and not self.cluster:
            raise ValueError("coordinator_address should be defined.")


@pytest.fixture
def fake(monkeypatch):
    """A FakeJax in place of jax.distributed, in an environment without ZKD_* variables."""
    for name in ZKD_VARS:
        monkeypatch.delenv(name, raising=False)
    jax_fake = FakeJax()
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", jax_fake.initialize)
    return jax_fake


@pytest.fixture
def calls(fake):
    return fake.calls


def test_auto_on_one_host_asks_jax_and_stays_single_process(fake):
    distributed.initialize()
    distributed.initialize(enabled="auto")
    assert fake.calls == [dict(initialization_timeout=300)] * 2  # JAX found no cluster: no error


def test_auto_joins_the_cluster_jax_detects(fake):
    fake.cluster = True  # e.g. a TPU pod's metadata, Slurm, Open MPI: JAX's own detection
    distributed.initialize(enabled="auto", timeout_s=9)
    assert fake.calls == [dict(initialization_timeout=9)]


def test_auto_after_the_backend_started_stays_single_process(fake):
    fake.backend_started = True
    distributed.initialize()
    assert len(fake.calls) == 1
    with pytest.raises(RuntimeError, match="before any JAX computation"):
        distributed.initialize(enabled=True)


def test_explicit_arguments_are_passed_on(calls):
    distributed.initialize(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=1)
    assert calls == [dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=1,
                          initialization_timeout=300)]


def test_environment_variables_of_the_launcher(calls, monkeypatch):
    monkeypatch.setenv("ZKD_COORDINATOR_ADDRESS", "10.0.0.2:8476")
    monkeypatch.setenv("ZKD_NUM_PROCESSES", "4")
    monkeypatch.setenv("ZKD_PROCESS_ID", "3")
    distributed.initialize(enabled="auto", timeout_s=7)
    assert calls == [dict(coordinator_address="10.0.0.2:8476", num_processes=4, process_id=3,
                          initialization_timeout=7)]


@pytest.mark.parametrize("enabled,env", [(True, None), ("True", None), ("auto", "1")])
def test_enabled_requires_the_cluster_jax_detects(fake, monkeypatch, enabled, env):
    if env is not None:
        monkeypatch.setenv("ZKD_DISTRIBUTED", env)
    with pytest.raises(ValueError, match="found no cluster"):
        distributed.initialize(enabled=enabled)
    fake.cluster = True
    distributed.initialize(enabled=enabled)
    assert fake.calls == [dict(initialization_timeout=300)] * 2


@pytest.mark.parametrize("enabled,env", [(False, None), ("false", None), ("auto", "0"), (True, "0")])
def test_switched_off_wins(calls, monkeypatch, enabled, env):
    if env is not None:
        monkeypatch.setenv("ZKD_DISTRIBUTED", env)
    distributed.initialize(enabled=enabled, coordinator_address="h:1", num_processes=2, process_id=0)
    assert calls == []


@pytest.mark.parametrize("kwargs,message", [
    (dict(coordinator_address="h:1"), "together"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), "process_id=2"),
    (dict(coordinator_address="nohost", num_processes=2, process_id=0), "host:port"),
    (dict(enabled="sometimes"), "True, False or 'auto'"),
])
def test_bad_arguments_are_value_errors(calls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        distributed.initialize(**kwargs)
    assert calls == []


def test_second_call_is_a_no_op(monkeypatch, calls):
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    distributed.initialize(coordinator_address="127.0.0.1:1", num_processes=2, process_id=0)
    assert calls == []


def test_module_does_not_import_tensorflow():
    code = ("import sys; import zkd_jax.parallel.distributed; "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --------------------------------------------------------------------------------------------------
# Real processes
# --------------------------------------------------------------------------------------------------

WORKER = Path(__file__).with_name("multihost_worker.py")
FIRST_STEPS = 3   # the two-process run: steps 1..3, then a checkpoint
TOTAL_STEPS = 5   # the one-process runs go on to step 5
TOLERANCE = 1e-5


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: The suite's compile settings (tests/conftest.py) go through; every other JAX_ variable (a
#: coordinator, a process id) is dropped so only the flags below start the processes.
SUITE_JAX_SETTINGS = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                      "JAX_DISABLE_MOST_OPTIMIZATIONS")


def _start(args: list[str], devices: int, **extra_env: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ZKD_", "TPU_", "MEGASCALE_", "SLURM_", "OMPI_", "JAX_"))
           or k in SUITE_JAX_SETTINGS}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=with_devices(devices),
               PYTHONPATH=str(WORKER.parents[1]), **extra_env)
    return subprocess.Popen([sys.executable, str(WORKER), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait(procs: list[subprocess.Popen]) -> None:
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=240)
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    failed = [(p.returncode, o) for p, o in zip(procs, outputs) if p.returncode != 0]
    assert not failed, "\n\n".join(f"exit {rc}:\n{out[-4000:]}" for rc, out in failed)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict[str, np.ndarray]]:
    """Runs the reference, the two-process run and the resumed run once for the tests below."""
    tmp = tmp_path_factory.mktemp("multihost")
    data = tmp / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    np.save(data / "image.npy", rng.normal(size=(8 * TOTAL_STEPS, 16, 16, 3)).astype(np.float32))
    np.save(data / "label.npy", rng.integers(0, 10, size=8 * TOTAL_STEPS).astype(np.int32))
    common = ["--data", str(data)]
    coordinator = f"127.0.0.1:{_free_port()}"
    two = [
        _start([*common, "--out", str(tmp / "two.npz"), "--steps", str(FIRST_STEPS),
                "--save-dir", str(tmp / "workdir"), "--coordinator", coordinator, "--device-feed",
                "--num-processes", "2", "--process-id", str(i)], devices=2,
               # JAX's default binds the coordinator to [::]; IPv4 loopback works everywhere.
               JAX_COORDINATOR_BIND_ADDRESS=coordinator)
        for i in range(2)
    ]
    reference = _start([*common, "--out", str(tmp / "one.npz"), "--steps", str(TOTAL_STEPS),
                        "--record-at", str(FIRST_STEPS), "--device-feed"], devices=1)
    _wait([*two, reference])
    resumed = _start([*common, "--out", str(tmp / "resumed.npz"), "--steps", str(TOTAL_STEPS),
                      "--restore-dir", str(tmp / "workdir")], devices=1)
    _wait([resumed])
    return {name: dict(np.load(tmp / f"{name}.npz")) for name in ("two", "one", "resumed")}


def _state(record: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in record.items() if k.startswith(prefix)}


def _assert_close(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(actual) == sorted(expected) and actual
    for key in expected:
        np.testing.assert_allclose(actual[key], expected[key], rtol=TOLERANCE, atol=TOLERANCE,
                                   err_msg=key)


def test_two_processes_train_like_one_with_the_same_global_batch(runs):
    two, one = runs["two"], runs["one"]
    assert int(two["process_count"]) == 2 and int(two["device_count"]) == 4
    assert int(one["process_count"]) == 1 and int(one["device_count"]) == 1
    # Same start, and training moved the parameters (the comparison below is not vacuous).
    _assert_close(_state(two, "start/"), _state(one, "start/"))
    moved = max(np.abs(two[f"end/{k}"] - v).max() for k, v in _state(two, "start/").items())
    assert moved > 1e-3
    np.testing.assert_allclose(two["losses"], one["losses"][:FIRST_STEPS], rtol=TOLERANCE)
    _assert_close(_state(two, "end/"), _state(one, "at/"))


def test_device_feed_gives_the_same_global_batches_in_two_processes(runs):
    two, one = _state(runs["two"], "feed/"), _state(runs["one"], "feed/")
    assert sorted(two) == sorted(one) and len(two) == 7  # 2 x (image, label) + eval's 3
    for key, value in one.items():
        assert two[key].shape == value.shape and two[key].shape[0] == 8, key
        np.testing.assert_array_equal(two[key], value, err_msg=key)
    assert not np.array_equal(one["train0/label"], one["train1/label"])


def test_two_process_checkpoint_restores_in_one_process_and_training_continues(runs):
    two, one, resumed = runs["two"], runs["one"], runs["resumed"]
    assert int(resumed["start_step"]) == FIRST_STEPS and int(resumed["process_count"]) == 1
    restored = _state(resumed, "start/")
    for key, value in _state(two, "end/").items():
        np.testing.assert_array_equal(restored[key], value, err_msg=key)  # bit-exact restore
    assert len(resumed["losses"]) == TOTAL_STEPS - FIRST_STEPS
    assert np.all(np.isfinite(resumed["losses"]))
    np.testing.assert_allclose(resumed["losses"], one["losses"][FIRST_STEPS:], rtol=TOLERANCE)
    _assert_close(_state(resumed, "end/"), _state(one, "end/"))


# --------------------------------------------------------------------------------------------------
# gs:// workdirs and TFDS data directories (no network: gs:// only reaches a recorder; the real
# reads and writes go through the same code with local paths)
# --------------------------------------------------------------------------------------------------

GCS_WORKDIR = "gs://zkd-bucket/runs/kd_ls"
GCS_DATA_DIR = "gs://zkd-bucket/tensorflow_datasets"


def test_checkpointer_keeps_gs_paths_and_round_trips_locally(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    from zkd_jax.io import checkpoint as ckpt_lib
    from zkd_jax.step.state import TrainState

    opened = []

    class RecordingManager:
        def __init__(self, directory, options=None):
            opened.append(directory)
            self.directory = directory

        def wait_until_finished(self):
            pass

        def all_steps(self):
            return []

        def close(self):
            pass

    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(ocp, "CheckpointManager", RecordingManager)
        ckpt_lib.Checkpointer(GCS_WORKDIR).close()
    # The directories orbax receives still name the bucket (pathlib would have made "gs:/...").
    assert [str(d) for d in opened] == [f"{GCS_WORKDIR}/checkpoints", f"{GCS_WORKDIR}/checkpoints_best"]
    assert not (tmp_path / "gs:").exists()

    # The same code on a local directory writes and restores a state.
    state = TrainState(step=jax.numpy.asarray(7, jax.numpy.int32),
                       params={"student": {"w": jax.numpy.arange(6.0).reshape(2, 3)}, "method": {}},
                       batch_stats={}, opt_state=(), rng=jax.random.PRNGKey(3))
    checkpointer = ckpt_lib.Checkpointer(tmp_path / "run")
    assert checkpointer.latest_step() is None
    checkpointer.save(state, {"epoch": 2})
    checkpointer.close()
    template = state.replace(params={"student": {"w": jax.numpy.zeros((2, 3))}, "method": {}})
    again = ckpt_lib.Checkpointer(str(tmp_path / "run"))
    restored, meta = again.restore(template)
    again.close()
    assert meta == {"epoch": 2, "step": 7}
    np.testing.assert_array_equal(restored.params["student"]["w"], np.arange(6.0).reshape(2, 3))


def test_workdir_code_uses_no_local_only_path_calls():
    """Workdir files go through etils.epath (gs:// capable): no open(), os.*, os.path.*, pathlib."""
    import ast

    import zkd_jax

    package = Path(zkd_jax.__file__).parent
    for name in ("trainer/setup.py", "trainer/students.py", "trainer/loop.py", "trainer/runs.py",
                 "trainer/bookkeeping.py", "trainer/cohort.py", "trainer/epoch_metrics.py",
                 "trainer/teacher_runs.py", "trainer/suite.py", "io/checkpoint.py",
                 "io/metrics.py"):
        tree = ast.parse((package / name).read_text())
        for node in ast.walk(tree):
            where = f"{name}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                    node.module]
                assert "pathlib" not in modules, f"{where} imports pathlib; use etils.epath"
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            assert not (isinstance(func, ast.Name) and func.id == "open"), (
                f"{where} calls open(); use epath.Path(...).open / read_text / write_text")
            if isinstance(func, ast.Attribute):
                owner = ast.unparse(func.value)
                assert owner not in ("os", "os.path", "shutil"), (
                    f"{where} calls {owner}.{func.attr}; use etils.epath so gs:// workdirs work")


def test_metrics_files_round_trip_through_epath_locally(tmp_path):
    from zkd_jax.io import metrics as metrics_io

    writer = metrics_io.MetricsWriter(tmp_path / "w", enabled=True)
    writer.write({"epoch": 1, "step": 10, "top1": 12.5})
    writer.close()
    metrics_io.write_summary(str(tmp_path / "w"), {"best_top1": 12.5})
    assert metrics_io.read_metrics(tmp_path / "w") == [{"epoch": 1, "step": 10, "top1": 12.5}]
    assert metrics_io.read_summary(tmp_path / "w") == {"best_top1": 12.5}


def test_tfds_data_dir_reaches_tfds_unchanged(tmp_path, monkeypatch):
    """gs:// goes to tfds.builder as given; a local TFDS directory loads through the same code."""
    pytest.importorskip("tensorflow_datasets")
    from zkd_jax import data
    from zkd_jax.data import tfds_source

    seen = []

    class Reached(Exception):
        pass

    def recording_builder(name, data_dir):
        seen.append((name, data_dir))
        raise Reached

    with monkeypatch.context() as patch:
        patch.setattr(tfds_source, "prepared_builder", recording_builder)
        tfds_source.clear_cache()
        with pytest.raises(Reached):
            next(data.train_batches("cifar100", per_process_batch_size=8, seed=0, epoch=1,
                                    data_dir=GCS_DATA_DIR, process_index=0, process_count=1))
    assert seen == [("cifar100", GCS_DATA_DIR)]

    # A real (tiny) TFDS dataset prepared offline in a local data_dir, read by the same code.
    tfds = tfds_source.import_tfds()
    builder = _tiny_builder_class(tfds)(data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare()
    images, labels = tfds_source.load_split_arrays(builder.name, "train", str(tmp_path / "tfds"))
    tfds_source.clear_cache()
    assert images.shape == (6, 8, 8, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.sort(labels), np.sort(np.arange(6) % 3))
    np.testing.assert_array_equal(images[:, 0, 0, 0], labels * 10)


def _tiny_builder_class(tfds):
    """A 6-image TFDS dataset built from memory (registered once per process)."""
    from tensorflow_datasets.core import registered

    name = "zkd_multihost_tiny"
    if name in registered.list_imported_builders():
        return registered.imported_builder_cls(name)

    class ZkdMultihostTiny(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(8, 8, 3)),
                    "label": tfds.features.ClassLabel(num_classes=3),
                }),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(6):
                image = np.full((8, 8, 3), (i % 3) * 10, np.uint8)
                yield i, {"image": image, "label": i % 3}

    return ZkdMultihostTiny
