"""tf.data pipelines: shapes, CIFAR augmentation, eval exactness, determinism, processes, errors.

No network and no files: TFDS is mocked with ``tfds.testing.mock_data``; where the tests need known
content or real sub-splits, the mock serves arrays built here (``as_dataset_fn``).
"""

from __future__ import annotations

import subprocess
import sys

import chex
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

import zkd_jax.data as zdata  # noqa: E402
from zkd_jax.data import digits as zdigits  # noqa: E402
from tensorflow_datasets.core import splits as splits_lib  # noqa: E402


# ----------------------------------------------------------------------------- fake TFDS data
def _resolve(split, num_examples: int) -> np.ndarray:
    """Indices a split spec (str or a tfds.even_splits part) selects from num_examples."""
    split_dict = splits_lib.SplitDict(
        [splits_lib.SplitInfo(name=n, shard_lengths=[num_examples], num_bytes=0) for n in ("train", "test", "validation")]
    )
    parts = [
        np.arange(inst.from_ or 0, num_examples if inst.to is None else inst.to)
        for inst in splits_lib.AbstractSplit.from_spec(split).to_absolute(split_dict)
    ]
    return np.concatenate(parts)


def cifar_like(images: np.ndarray, labels: np.ndarray):
    """as_dataset_fn serving the given uint8 [N,32,32,3] images and labels for every split."""

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False, **kwargs):
        idx = _resolve(split, len(images))
        return tf.data.Dataset.from_tensor_slices(
            {"image": images[idx], "label": labels[idx].astype(np.int64), "coarse_label": labels[idx] // 5}
        )

    return as_dataset


def imagenet_like(num_examples: int, seed: int = 0):
    """as_dataset_fn of JPEGs of varied sizes with label = index, honouring sub-splits (encoded images)."""
    rng = np.random.default_rng(seed)
    jpegs = []
    for _ in range(num_examples):
        h, w = int(rng.integers(40, 100)), int(rng.integers(40, 100))
        jpegs.append(tf.io.encode_jpeg(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).numpy())

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False, **kwargs):
        idx = _resolve(split, num_examples)
        ds = tf.data.Dataset.from_tensor_slices(
            {
                "file_name": [f"{i}.JPEG" for i in idx],
                "image": tf.constant([jpegs[i] for i in idx]),
                "label": idx.astype(np.int64),
            }
        )
        return ds.apply(tf.data.experimental.assert_cardinality(len(idx)))

    return as_dataset


@pytest.fixture(autouse=True)
def _fresh_cache():
    zdata.clear_cache()
    yield
    zdata.clear_cache()


def _train(name, b, **kw):
    kw.setdefault("seed", 0)
    kw.setdefault("epoch", 1)
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return list(zdata.train_batches(name, per_process_batch_size=b, **kw))


def _eval(name, b, **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return list(zdata.eval_batches(name, per_process_batch_size=b, **kw))


def _bounds(name):
    i = zdata.info(name)
    mean, std = np.float32(i.mean), np.float32(i.std)
    return (np.float32(0) - mean) / std, (np.float32(1) - mean) / std


def _check_images(x, name, b):
    size = zdata.info(name).image_size
    chex.assert_shape(x, (b, size, size, 3))
    chex.assert_type(x, np.float32)
    lo, hi = _bounds(name)
    assert np.all(x >= lo - 1e-5) and np.all(x <= hi + 1e-5)


# ----------------------------------------------------------------------------- API and import
def test_import_does_not_import_tensorflow():
    code = (
        "import sys, zkd_jax.data, zkd_jax.data.device; "
        "bad = {'tensorflow', 'tensorflow_datasets', 'sklearn'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_info_and_steps_per_epoch():
    assert zdata.info("cifar100").num_classes == 100
    assert zdata.steps_per_epoch("cifar100", 64) == 781
    assert zdata.steps_per_epoch("imagenet2012", 512) == 1_281_167 // 512
    assert zdata.steps_per_epoch("digits", 64) == 1500 // 64
    with pytest.raises(ValueError, match="cifar100.*imagenet2012.*digits"):
        zdata.info("mnist")
    with pytest.raises(ValueError):
        zdata.steps_per_epoch("digits", 0)


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="views"):
        _train("digits", 64, views=("strong",))
    with pytest.raises(ValueError, match="start_step"):
        _train("digits", 64, start_step=24)
    with pytest.raises(ValueError, match="epoch"):
        _train("digits", 64, epoch=0)


# ----------------------------------------------------------------------------- every pipeline builds
def test_cifar100_train_and_test_pipelines_with_mock_data():
    with tfds.testing.mock_data(num_examples=64):
        weak = _train("cifar100", 16)
        both = _train("cifar100", 16, views=("weak", "strong"))
        test = _eval("cifar100", 24)
    assert len(weak) == len(both) == 4
    for batch in weak + both:
        _check_images(batch["image"], "cifar100", 16)
        chex.assert_shape(batch["label"], (16,))
        chex.assert_type(batch["label"], np.int32)
        assert batch["label"].min() >= 0 and batch["label"].max() < 100
    assert set(weak[0]) == {"image", "label"}
    assert set(both[0]) == {"image", "label", "image_strong"}
    for batch in both:
        _check_images(batch["image_strong"], "cifar100", 16)
        assert not np.array_equal(batch["image_strong"], batch["image"])
    assert [int(b["mask"].sum()) for b in test] == [24, 24, 16]
    for batch in test:
        _check_images(batch["image"], "cifar100", 24)
        chex.assert_type(batch["mask"], bool)
        assert batch["label"].min() >= 0 and batch["label"].max() < 100


def test_imagenet_train_and_eval_pipelines_with_mock_data():
    with tfds.testing.mock_data(num_examples=12):
        both = _train("imagenet2012", 4, views=("weak", "strong"))
        val = _eval("imagenet2012", 8)
    assert len(both) == 3
    for batch in both:
        _check_images(batch["image"], "imagenet2012", 4)
        _check_images(batch["image_strong"], "imagenet2012", 4)
        chex.assert_type(batch["label"], np.int32)
        assert batch["label"].min() >= 0 and batch["label"].max() < 1000
    assert [int(b["mask"].sum()) for b in val] == [8, 4]
    for batch in val:
        _check_images(batch["image"], "imagenet2012", 8)
    assert np.all(val[-1]["image"][4:] == 0)


def test_digits_pipelines_and_constants():
    train = _train("digits", 64, views=("weak", "strong"))
    test = _eval("digits", 64)
    assert len(train) == zdata.steps_per_epoch("digits", 64)
    for batch in train:
        _check_images(batch["image"], "digits", 64)
        _check_images(batch["image_strong"], "digits", 64)
        assert batch["label"].min() >= 0 and batch["label"].max() < 10
    assert sum(int(b["mask"].sum()) for b in test) == zdigits.NUM_TEST
    mean, std = zdigits.compute_mean_std()
    np.testing.assert_allclose(mean, zdata.info("digits").mean, atol=1e-5)
    np.testing.assert_allclose(std, zdata.info("digits").std, atol=1e-5)
    train_x, _ = zdigits.load_digits_arrays("train")
    test_x, _ = zdigits.load_digits_arrays("test")
    chex.assert_shape(train_x, (1500, 32, 32, 3))
    assert train_x.dtype == np.uint8 and train_x.max() == 255
    # Train and test are disjoint images (no image of one split appears in the other).
    assert not set(map(bytes, train_x[:, ::4, ::4, 0])) & set(map(bytes, test_x[:, ::4, ::4, 0]))


# ----------------------------------------------------------------------------- CIFAR augmentation
def test_cifar_crop_pads_zeros_in_uint8_space_and_flips_half_the_time():
    n = 1024
    cols = 100 + np.arange(32, dtype=np.uint8)  # never 0, increasing left to right
    images = np.broadcast_to(cols[None, None, :, None], (n, 32, 32, 3)).copy()
    labels = np.arange(n) % 100
    with tfds.testing.mock_data(as_dataset_fn=cifar_like(images, labels)):
        batches = _train("cifar100", 256)
    x = np.concatenate([b["image"] for b in batches])
    i = zdata.info("cifar100")
    mean, std = np.float32(i.mean), np.float32(i.std)
    pad_value = (np.float32(0) / np.float32(255) - mean) / std
    np.testing.assert_allclose(pad_value, -mean / std, rtol=1e-6)
    padded = np.all(x == pad_value, axis=-1)  # [n, 32, 32]
    assert padded.any()
    flips, offsets = [], set()
    for k in range(x.shape[0]):
        rows = np.flatnonzero(~padded[k].all(axis=1))
        cols_kept = np.flatnonzero(~padded[k].all(axis=0))
        # The kept region is one rectangle; everything else is zero padding.
        assert np.array_equal(~padded[k], np.isin(np.arange(32), rows)[:, None] & np.isin(np.arange(32), cols_kept)[None, :])
        assert 24 <= len(rows) <= 32 and 24 <= len(cols_kept) <= 32
        profile = x[k, rows[0], cols_kept, 0]
        step = np.diff(profile)
        assert np.all(step > 0) or np.all(step < 0)
        flips.append(bool(len(step) and step[0] < 0))
        offsets.add((32 - len(rows)) * (1 if rows[0] > 0 else -1))
    assert abs(np.mean(flips) - 0.5) < 0.06
    assert offsets == set(range(-4, 5))  # every crop offset 0..8 of the padded image occurs


def test_eval_is_exactly_normalized_and_in_split_order():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 100, 100)
    with tfds.testing.mock_data(as_dataset_fn=cifar_like(images, labels)):
        batches = _eval("cifar100", 32)
    i = zdata.info("cifar100")
    want = (images.astype(np.float32) / np.float32(255) - np.float32(i.mean)) / np.float32(i.std)
    got = np.concatenate([b["image"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    assert len(batches) == 4 and mask.sum() == 100 and not mask[100:].any()
    np.testing.assert_array_equal(got[:100], want)
    np.testing.assert_array_equal(got[100:], 0)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:100], labels)


# ----------------------------------------------------------------------------- determinism
def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_cifar_determinism_and_resume_from_step():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (160, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 100, 160)
    kw = dict(views=("weak", "strong"), seed=7, epoch=3)
    with tfds.testing.mock_data(as_dataset_fn=cifar_like(images, labels)):
        full = _train("cifar100", 16, **kw)
        again = _train("cifar100", 16, **kw)
        resumed = _train("cifar100", 16, start_step=6, **kw)
        other_epoch = _train("cifar100", 16, **{**kw, "epoch": 4, "views": ("weak",)})
        other_seed = _train("cifar100", 16, **{**kw, "seed": 8, "views": ("weak",)})
    assert len(full) == 10
    _assert_same(full, again)
    _assert_same(full[6:], resumed)
    for other in (other_epoch, other_seed):
        assert not np.array_equal(full[0]["label"], other[0]["label"])
        assert not np.array_equal(full[0]["image"], other[0]["image"])
    # Each epoch reads every example at most once.
    labels_seen = np.concatenate([b["label"] for b in full])
    assert len(labels_seen) == 160 and sorted(labels_seen) == sorted(labels)


def test_imagenet_determinism_and_resume_from_step():
    with tfds.testing.mock_data(as_dataset_fn=imagenet_like(24)):
        full = _train("imagenet2012", 4, seed=3, epoch=2)
        again = _train("imagenet2012", 4, seed=3, epoch=2)
        resumed = _train("imagenet2012", 4, seed=3, epoch=2, start_step=4)
        other = _train("imagenet2012", 4, seed=3, epoch=5)
    assert len(full) == 6
    _assert_same(full, again)
    _assert_same(full[4:], resumed)
    assert not all(np.array_equal(a["label"], b["label"]) for a, b in zip(full, other))


def test_imagenet_uint8_batches_normalize_on_device_to_the_float32_batches():
    """Issue 18: ``normalized=False`` keeps ImageNet's host batches uint8; the feed's on-device
    ``normalize_batch`` turns them into the float32 batches of ``normalized=True`` bit for bit."""
    i = zdata.info("imagenet2012")
    with tfds.testing.mock_data(as_dataset_fn=imagenet_like(12)):
        pairs = [(_train("imagenet2012", 4, normalized=n), _eval("imagenet2012", 8, normalized=n))
                 for n in (False, True)]
    (raw_train, raw_eval), (float_train, float_eval) = pairs
    assert [int(b["mask"].sum()) for b in raw_eval] == [8, 4]
    for raw, want in zip(raw_train + raw_eval, float_train + float_eval):
        chex.assert_type(raw["image"], np.uint8)
        got = zdata.normalize_batch(raw, mean=i.mean, std=i.std)
        assert set(got) == set(want)
        for key in want:
            np.testing.assert_array_equal(np.asarray(got[key]), want[key])


# ----------------------------------------------------------------------------- processes
def test_two_processes_read_disjoint_halves_cifar():
    n = 96
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(n)  # label = example index
    with tfds.testing.mock_data(as_dataset_fn=cifar_like(images, labels)):
        parts = [_train("cifar100", 8, process_index=p, process_count=2, seed=5) for p in (0, 1)]
        single = _train("cifar100", 16, process_count=1, seed=5)
        evals = [_eval("cifar100", 16, process_index=p, process_count=2) for p in (0, 1)]
        eval_odd = [
            _eval("cifar100", 16, process_index=p, process_count=2, data_dir=None) for p in (0, 1)
        ]
    seen = [np.concatenate([b["label"] for b in part]) for part in parts]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(np.concatenate(seen)) == list(range(n))
    # The global batch (processes concatenated) is the single-process batch, images included.
    for b0, b1, whole in zip(parts[0], parts[1], single):
        for k in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([b0[k], b1[k]]), whole[k])
    assert len(evals[0]) == len(evals[1])
    eval_seen = [np.concatenate([b["label"][b["mask"]] for b in e]) for e in evals]
    assert not set(eval_seen[0]) & set(eval_seen[1])
    assert sorted(np.concatenate(eval_seen)) == list(range(n))
    assert len(eval_odd[0]) == len(eval_odd[1])


def test_two_processes_read_disjoint_halves_imagenet():
    n = 21  # odd: the halves differ by one example
    with tfds.testing.mock_data(as_dataset_fn=imagenet_like(n)):
        parts = [_train("imagenet2012", 2, process_index=p, process_count=2) for p in (0, 1)]
        evals = [_eval("imagenet2012", 4, process_index=p, process_count=2) for p in (0, 1)]
    seen = [np.concatenate([b["label"] for b in part]) for part in parts]
    assert len(parts[0]) == len(parts[1]) == n // 4
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) <= set(range(11)) and set(seen[1]) <= set(range(11, n))
    assert len(evals[0]) == len(evals[1]) == 3
    eval_seen = [np.concatenate([b["label"][b["mask"]] for b in e]) for e in evals]
    assert list(eval_seen[0]) == list(range(11)) and list(eval_seen[1]) == list(range(11, n))


# ----------------------------------------------------------------------------- missing data
def test_missing_imagenet_names_the_directory_and_the_manual_files(tmp_path):
    with pytest.raises(ValueError) as err:
        _eval("imagenet2012", 8, data_dir=str(tmp_path))
    msg = str(err.value)
    assert str(tmp_path) in msg and "manual" in msg and "ILSVRC2012_img_train.tar" in msg


def test_offline_cifar_names_the_directory_and_how_to_build(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    with pytest.raises(ValueError) as err:
        _train("cifar100", 64, data_dir=str(tmp_path))
    msg = str(err.value)
    assert str(tmp_path) in msg and "tfds build cifar100" in msg and "network" in msg
