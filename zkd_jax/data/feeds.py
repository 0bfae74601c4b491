"""Global batches for the trainer, from tf.data (host) or from the split held on the devices.

``make_feed(...)`` returns a :class:`Feed` whose ``train(epoch, start_step)`` and ``eval()`` yield
dicts of global ``jax.Array`` s sharded over the mesh's ``"data"`` axis, ready for the jitted steps.
``config.input_pipeline`` picks the source:

* ``"tfdata"`` (default): ``zkd_jax.data.train_batches`` / ``eval_batches`` (TensorFlow on the
  host; every dataset and view, ImageNet included) with ``normalized=False``: each process's uint8
  share (a quarter of float32's bytes) is made global with ``host_to_global``, ``PREFETCH`` (2)
  batches ahead of the step (``prefetch_to_mesh``: the copies overlap the running step), and
  normalized on the devices by a small jitted ``normalize_batch``, giving the float32 batches of
  ``normalized=True`` bit for bit.
* ``"device"``: the whole uint8 split (CIFAR-100: 150 MB; digits) is replicated on every device
  once and ``zkd_jax.data.device`` shuffles, pads, crops, flips and normalizes in jitted JAX, so
  no image is read, augmented or copied on the host per step (one small jitted call builds each
  batch; ``benchmarks/epoch_time.py`` times whole epochs of it). Deterministic given (seed, epoch, step), so resuming works as with tf.data; the
  random numbers come from JAX's PRNG (``fold_in(PRNGKey(config.seed), 2)``), so the batches
  differ from tf.data's while their distribution is the same. The weak view only (MLKD's strong
  view needs "tfdata"). Evaluation images are bit-identical to tf.data's.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from zkd_jax.data import device
from zkd_jax.data.datasets import IN_MEMORY
from zkd_jax.data.datasets import info as dataset_info
from zkd_jax.data.datasets import num_train_examples
from zkd_jax.data.plan import check_steps_per_call
from zkd_jax.data.tfdata import eval_dataset, train_batches
from zkd_jax.parallel import batch_sharding, check_batch_size, prefetch_to_mesh, replicated
from zkd_jax.views import CIFAR_AUGMENTATION, WEAK, check_augmentation

PIPELINES = ("tfdata", "device")
DATA_KEY_PURPOSE = 2  # PRNGKey(seed) folded with 0: init, 1: in-step randomness, 2: device data

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class DeviceSplit:
    """The on-device training split, for programs that build their own batches
    (``zkd_jax.step.scan``): uint8 images (flat, ``[N, H * W * C]``: ``device.flat_images``),
    labels, the data key (replicated), the static batch parameters, ``build(images, labels, key,
    epoch, step, order=order)`` (the pure, jittable builder of one global batch that a scanned
    program calls: ``device.train_batch_builder``), and host helpers: ``order(epoch_arr)`` (the
    epoch's permutation), ``batch(epoch_arr, order, step)`` (global batch ``step``, as
    ``Feed.train`` yields it) and ``put(value)`` (a host scalar -> replicated int32 array)."""

    images: jax.Array
    labels: jax.Array
    key: jax.Array
    batch_size: int
    mean: tuple
    std: tuple
    build: Callable[..., Batch]
    order: Callable[[jax.Array], jax.Array]
    batch: Callable[[jax.Array, jax.Array, int], Batch]
    put: Callable[[int], jax.Array]


@dataclasses.dataclass(frozen=True)
class Feed:
    """``train(epoch, start_step)``: the global batches of one epoch (counted from 1) from
    ``start_step`` on; ``eval()``: the test split once, with a boolean "mask" per batch;
    ``device``: the split held on the devices (the "device" pipeline only, else None);
    ``steps_per_call``: the steps of one call of the train step (> 1: scans that build their
    batches from ``device``), checked by :func:`make_feed`."""

    train: Callable[[int, int], Iterator[Batch]]
    eval: Callable[[], Iterator[Batch]]
    pipeline: str
    device: DeviceSplit | None = None
    steps_per_call: int = 1


# Splits small enough to hold on every device.
DEVICE_DATASETS = IN_MEMORY


def check_pipeline(pipeline: str, views: Sequence[str], dataset: str,
                   augmentation: str = CIFAR_AUGMENTATION) -> None:
    """Raises a ``ValueError`` that says what to set when the pipeline cannot serve the run."""
    check_augmentation(augmentation, views)
    if pipeline not in PIPELINES:
        raise ValueError(
            f"config.input_pipeline={pipeline!r} is unknown; choose one of {', '.join(PIPELINES)}."
        )
    if pipeline == "device" and dataset not in DEVICE_DATASETS:
        raise ValueError(
            f"config.input_pipeline='device' holds small splits only ({', '.join(DEVICE_DATASETS)}),"
            f" not {dataset!r}; set config.input_pipeline='tfdata'."
        )
    if pipeline == "device" and tuple(views) != (WEAK,):
        raise ValueError(
            "config.input_pipeline='device' makes the weak view only, and this method (MLKD) also "
            "needs the strong view; set config.input_pipeline='tfdata'."
        )
    if pipeline == "device" and augmentation != CIFAR_AUGMENTATION:
        raise ValueError(
            "config.input_pipeline='device' makes the CIFAR crop + flip only, not the ViT "
            "students' transforms; set config.input_pipeline='tfdata'."
        )


def make_feed(
    pipeline: str,
    *,
    dataset: str,
    mesh: Mesh,
    seed: int,
    views: Sequence[str],
    batch_size: int,
    eval_batch_size: int,
    data_dir: str | None = None,
    augmentation: str = CIFAR_AUGMENTATION,
    image_size: int | None = None,
    train_examples: int = -1,
    steps_per_call: int = 1,
) -> Feed:
    """The one door of the input path: the :class:`Feed` of a run's input plan.

    ``pipeline`` ("tfdata" or "device") picks the source; ``steps_per_call`` > 1 (the "device"
    pipeline only) asks for scans of that many steps, which build their batches from
    ``Feed.device`` (its ``build``; ``zkd_jax.step.scan``) in the calls ``zkd_jax.data.plan.plan``
    cuts an epoch into. Batch sizes are global.

    ``augmentation`` (``zkd_jax.views``): ``"vit"`` gives the ViT students' images at
    ``image_size`` px (tf.data only). ``train_examples`` > 0: the train split's first
    ``train_examples`` images only (``zkd_jax.data.num_train_examples``).

    Raises:
      ValueError: an unknown pipeline, a view or dataset the pipeline does not serve, scans the
        pipeline cannot feed, a batch size that does not divide over the devices, or the dataset
        missing (see ``zkd_jax.data``).
    """
    steps_per_call = check_steps_per_call(steps_per_call, pipeline)
    check_pipeline(pipeline, views, dataset, augmentation)
    per_process = check_batch_size(batch_size, mesh)
    per_process_eval = check_batch_size(eval_batch_size, mesh, what="config.eval_batch_size")
    num_train = num_train_examples(dataset, train_examples)
    if pipeline == "tfdata":
        transform = {"augmentation": augmentation, "image_size": image_size}
        return _host_feed(dataset, mesh, seed, tuple(views), per_process, per_process_eval, data_dir,
                          transform, num_train)
    return dataclasses.replace(
        _device_feed(dataset, mesh, seed, batch_size, eval_batch_size, data_dir, num_train),
        steps_per_call=steps_per_call)


#: Global batches of the tf.data feed kept in flight to the devices (``prefetch_to_mesh``).
PREFETCH = 2


def _host_feed(dataset, mesh, seed, views, per_process, per_process_eval, data_dir,
               transform: dict, num_train: int) -> Feed:
    info = dataset_info(dataset)
    normalize = jax.jit(
        functools.partial(device.normalize_batch, mean=tuple(info.mean), std=tuple(info.std)),
        out_shardings=batch_sharding(mesh),
    )

    def to_devices(batches) -> Iterator[Batch]:  # uint8 over the wire, normalized on the devices
        return prefetch_to_mesh(batches, mesh, size=PREFETCH, then=normalize)

    batch_fns: dict = {}  # the run's per-batch tf.functions, traced once (zkd_jax.data.cifar)

    def train(epoch: int, start_step: int) -> Iterator[Batch]:
        return to_devices(train_batches(
            dataset, per_process_batch_size=per_process, seed=seed, epoch=epoch,
            start_step=start_step, views=views, data_dir=data_dir, normalized=False,
            batch_fns=batch_fns, train_examples=num_train, **transform,
        ))

    eval_ds: list = []  # the test split's dataset, built at the first evaluation of the run

    def evaluate() -> Iterator[Batch]:
        if not eval_ds:
            eval_ds.append(eval_dataset(dataset, per_process_batch_size=per_process_eval,
                                             data_dir=data_dir, normalized=False, **transform))
        return to_devices(eval_ds[0].as_numpy_iterator())

    return Feed(train=train, eval=evaluate, pipeline="tfdata")


def _device_functions(mesh: Mesh, num_train: int, batch_size: int, eval_batch_size: int,
                      mean: tuple, std: tuple):
    """Jitted (epoch order, train batch, eval batch) builders of one feed."""
    rep, sharded = replicated(mesh), batch_sharding(mesh)
    order = jax.jit(functools.partial(device.epoch_permutation, num_examples=num_train),
                    out_shardings=rep)
    train_batch = jax.jit(
        functools.partial(device.device_train_batch, batch_size=batch_size, mean=mean, std=std),
        out_shardings=sharded,
    )
    eval_batch = jax.jit(
        functools.partial(device.device_eval_batch, batch_size=eval_batch_size, mean=mean,
                          std=std),
        out_shardings=sharded,
    )
    return order, train_batch, eval_batch


def _device_feed(dataset, mesh, seed, batch_size, eval_batch_size, data_dir, num_train) -> Feed:
    info = dataset_info(dataset)
    rep = replicated(mesh)

    def put(x) -> jax.Array:  # the same host value on every process -> replicated global array
        return jax.make_array_from_process_local_data(rep, np.asarray(x))

    def on_devices(split: str, count: int | None = None) -> tuple[jax.Array, jax.Array]:
        # Images as [N, H * W * C] (device.flat_images): a layout TPUs gather from without
        # copying the whole split into another one on every call.
        images, labels = device.load_device_arrays(dataset, split, data_dir)
        return put(device.flat_images(images[:count])), put(labels[:count])

    train_images, train_labels = on_devices("train", num_train)
    test_images, test_labels = on_devices("test")
    steps = num_train // batch_size
    order_fn, train_fn, eval_fn = _device_functions(
        mesh, num_train, batch_size, eval_batch_size, tuple(info.mean), tuple(info.std))
    key = put(jax.random.fold_in(jax.random.PRNGKey(seed), DATA_KEY_PURPOSE))

    def batch(epoch_arr: jax.Array, order: jax.Array, s: int) -> Batch:
        return train_fn(train_images, train_labels, key, epoch_arr, put(np.int32(s)), order=order)

    def train(epoch: int, start_step: int) -> Iterator[Batch]:
        epoch_arr = put(np.int32(epoch))
        order = order_fn(key, epoch_arr)
        for s in range(start_step, steps):
            yield batch(epoch_arr, order, s)

    def evaluate() -> Iterator[Batch]:
        count = device.num_eval_batches(int(test_images.shape[0]), eval_batch_size)
        for i in range(count):
            yield eval_fn(test_images, test_labels, put(np.int32(i)))

    split = DeviceSplit(
        images=train_images, labels=train_labels, key=key, batch_size=batch_size,
        mean=tuple(info.mean), std=tuple(info.std),
        build=device.train_batch_builder(batch_size, tuple(info.mean), tuple(info.std)),
        order=lambda e: order_fn(key, e),
        batch=batch, put=lambda v: put(np.int32(v)),
    )
    return Feed(train=train, eval=evaluate, pipeline="device", device=split)


__all__ = ["DATA_KEY_PURPOSE", "DEVICE_DATASETS", "DeviceSplit", "Feed", "PIPELINES",
           "check_pipeline", "make_feed"]
