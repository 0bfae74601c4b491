"""Images per second of each input path, on whatever machine runs it (no dataset download needed).

Paths (all run the project's real pipeline code):

* ``cifar_weak``     tf.data CIFAR path (crop + flip + normalize) over 50,000 synthetic 32x32 images
* ``cifar_strong``   the same with MLKD's two views (adds RandAugment(2) + Cutout)
* ``digits``         the public ``train_batches("digits")`` entry point (embedded sklearn digits)
* ``imagenet_train`` ImageNet train path (JPEG decode of the crop window, resize 224, flip) on
                     synthetic 400x350 JPEGs served through ``tfds.testing.mock_data`` (no file I/O)
* ``imagenet_eval``  ImageNet eval path (decode centre window, resize 224) on the same JPEGs
* ``device``         on-device path: jitted ``device_train_batch`` on JAX's default backend

The trainer's tf.data feed (``zkd_jax.data.feeds``, ``input_pipeline="tfdata"``), batches ready
on the devices (each one waited for, as a step would), before and after issue 18:

* ``feed_cifar_before``    float32 normalized on the host, ``host_to_global`` per batch, no
                           read-ahead (the feed before issue 18), on ``synthetic_cifar100``
* ``feed_cifar_after``     the feed now: uint8 copied, 2 global batches in flight
                           (``prefetch_to_mesh``), normalized on the devices
* ``feed_imagenet_before`` / ``feed_imagenet_after``: the same on the mock ImageNet JPEGs

Usage::

    python benchmarks/input_pipeline.py                       # every path, batch 256
    python benchmarks/input_pipeline.py --paths=cifar_weak,device --batch=64 --seconds=10
    python benchmarks/input_pipeline.py --paths=feed_cifar_before,feed_cifar_after,\
        feed_imagenet_before,feed_imagenet_after --batch=128     # issue 18: before and after

Prints one markdown table row per path and a line naming the machine.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time

import numpy as np

PATHS = ("cifar_weak", "cifar_strong", "digits", "imagenet_train", "imagenet_eval", "device",
         "feed_cifar_before", "feed_cifar_after", "feed_imagenet_before", "feed_imagenet_after")


def _timed(batches, seconds: float, warmup: int = 3) -> tuple[float, int]:
    """Images/s over ``seconds`` after ``warmup`` batches (tracing, buffer fill)."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        try:
            batch = next(it)
        except StopIteration:
            break
        count += len(batch["label"])
    return count / (time.perf_counter() - start), count


def _synthetic_cifar(n: int = 50_000):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 100, n).astype(np.int32)


def _repeat_epochs(make, epochs: int = 1000):
    for epoch in range(1, epochs + 1):
        yield from make(epoch)


def bench_cifar(batch: int, seconds: float, strong: bool) -> tuple[float, int]:
    from zkd_jax import data
    from zkd_jax.data.cifar import array_train_dataset

    images, labels = _synthetic_cifar()
    info = data.info("cifar100")

    def epoch_batches(epoch):
        ds = array_train_dataset(
            images, labels, per_process_batch_size=batch, seed=0, epoch=epoch, start_step=0,
            views=("weak", "strong") if strong else ("weak",), mean=info.mean, std=info.std,
            process_index=0, process_count=1,
        )
        return ds.as_numpy_iterator()

    return _timed(_repeat_epochs(epoch_batches), seconds)


def bench_digits(batch: int, seconds: float) -> tuple[float, int]:
    from zkd_jax import data

    batch = min(batch, 256)

    def epoch_batches(epoch):
        return data.train_batches(
            "digits", per_process_batch_size=batch, seed=0, epoch=epoch, process_index=0, process_count=1
        )

    return _timed(_repeat_epochs(epoch_batches), seconds)


def _imagenet_mock(num: int = 512):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    jpegs = [
        tf.io.encode_jpeg(rng.integers(0, 256, (350, 400, 3), dtype=np.uint8), quality=90).numpy()
        for _ in range(num)
    ]

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False, **kwargs):
        ds = tf.data.Dataset.from_tensor_slices(
            {"file_name": ["x.JPEG"] * num, "image": tf.constant(jpegs), "label": np.arange(num) % 1000}
        )
        return ds.repeat(40).apply(tf.data.experimental.assert_cardinality(40 * num))

    return as_dataset


def bench_imagenet(batch: int, seconds: float, train: bool) -> tuple[float, int]:
    import tensorflow_datasets as tfds

    from zkd_jax import data

    batch = min(batch, 128)
    with tfds.testing.mock_data(as_dataset_fn=_imagenet_mock()):
        if train:
            batches = data.train_batches(
                "imagenet2012", per_process_batch_size=batch, seed=0, epoch=1, process_index=0, process_count=1
            )
        else:
            batches = data.eval_batches("imagenet2012", per_process_batch_size=batch, process_index=0, process_count=1)
        return _timed(batches, seconds)


def bench_device(batch: int, seconds: float) -> tuple[float, int]:
    import jax

    from zkd_jax import data
    from zkd_jax.data import device

    images, labels = _synthetic_cifar()
    images, labels = jax.device_put(images), jax.device_put(labels)
    info = data.info("cifar100")
    step_fn = jax.jit(functools.partial(device.device_train_batch, batch_size=batch, mean=info.mean, std=info.std))
    key = jax.random.key(0)
    steps = images.shape[0] // batch
    order = jax.jit(device.epoch_permutation, static_argnums=2)(key, 1, images.shape[0])

    def batches():
        s = 0
        while True:
            out = step_fn(images, labels, key, 1, s % steps, order=order)
            out["image"].block_until_ready()
            s += 1
            yield out

    return _timed(batches(), seconds)


def _feed_batches(dataset: str, batch: int, after: bool):
    """Epochs of global batches on the devices: the feed now (``after``) or before issue 18."""
    import jax

    from zkd_jax import data
    from zkd_jax.data import feeds
    from zkd_jax.parallel import create_mesh, host_to_global

    mesh = create_mesh(jax.devices())
    if after:
        feed = feeds.make_feed("tfdata", dataset=dataset, mesh=mesh, seed=0, views=("weak",),
                               batch_size=batch, eval_batch_size=batch)

        def epoch_batches(epoch):
            return feed.train(epoch, 0)
    else:
        def epoch_batches(epoch):
            return (host_to_global(b, mesh) for b in data.train_batches(
                dataset, per_process_batch_size=batch, seed=0, epoch=epoch))

    def consumed(epoch):
        for b in epoch_batches(epoch):
            yield jax.block_until_ready(b)  # where a step would use it

    return _repeat_epochs(consumed)


def bench_feed_cifar(batch: int, seconds: float, after: bool) -> tuple[float, int]:
    return _timed(_feed_batches("synthetic_cifar100", batch, after), seconds)


def bench_feed_imagenet(batch: int, seconds: float, after: bool) -> tuple[float, int]:
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(as_dataset_fn=_imagenet_mock()):
        return _timed(_feed_batches("imagenet2012", min(batch, 128), after), seconds)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    import jax

    dev = jax.devices()[0]
    return (
        f"{_cpu_model()}, {os.cpu_count()} CPU cores visible, "
        f"JAX backend {dev.platform} ({dev.device_kind})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of " + ",".join(PATHS))
    parser.add_argument("--batch", type=int, default=256, help="per-process batch (digits <= 256, ImageNet <= 128)")
    parser.add_argument("--seconds", type=float, default=8.0, help="measuring time per path")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    runners = {
        "cifar_weak": lambda: bench_cifar(args.batch, args.seconds, strong=False),
        "cifar_strong": lambda: bench_cifar(args.batch, args.seconds, strong=True),
        "digits": lambda: bench_digits(args.batch, args.seconds),
        "imagenet_train": lambda: bench_imagenet(args.batch, args.seconds, train=True),
        "imagenet_eval": lambda: bench_imagenet(args.batch, args.seconds, train=False),
        "device": lambda: bench_device(args.batch, args.seconds),
        "feed_cifar_before": lambda: bench_feed_cifar(args.batch, args.seconds, after=False),
        "feed_cifar_after": lambda: bench_feed_cifar(args.batch, args.seconds, after=True),
        "feed_imagenet_before": lambda: bench_feed_imagenet(args.batch, args.seconds, after=False),
        "feed_imagenet_after": lambda: bench_feed_imagenet(args.batch, args.seconds, after=True),
    }
    chosen = [p for p in args.paths.split(",") if p]
    unknown = set(chosen) - set(PATHS)
    if unknown:
        raise ValueError(f"unknown paths {sorted(unknown)}; choose from {', '.join(PATHS)}.")
    print(f"machine: {machine()}")
    print("| path | batch | images/s | images timed |")
    print("| --- | ---: | ---: | ---: |")
    for name in chosen:
        rate, count = runners[name]()
        batch = min(args.batch, 256 if name == "digits" else 128 if "imagenet" in name else args.batch)
        print(f"| {name} | {batch} | {rate:,.0f} | {count:,} |", flush=True)


if __name__ == "__main__":
    main()
