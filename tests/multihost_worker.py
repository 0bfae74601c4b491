"""One process of the multi-process tests (tests/test_multihost.py); run as a script.

Trains a tiny KD+LS student (a conv-BatchNorm-linear net on 16x16 images, distilling from a fixed,
wider net of the same kind) with the trainer's own pieces: ``zkd_jax.parallel.distributed.initialize``,
``create_mesh``, ``host_to_global``, ``make_train_step``, ``create_train_state`` and the orbax
``Checkpointer``. ``--zoo-student resnet8`` swaps in a model of the zoo (slower to compile; for
checks by hand).

The fabricated dataset is a directory of ``image.npy`` / ``label.npy`` written by the test; at step
``s`` the global batch is rows ``[s*B, (s+1)*B)`` and process ``p`` of ``P`` reads only its block
``[s*B + p*B/P, s*B + (p+1)*B/P)`` of it (memory-mapped). The result (``--out``, written by process 0) holds the flattened student parameters and
BatchNorm statistics after ``--record-at`` steps and at the end, and the per-step losses. With
``--device-feed`` it also holds the first global batches of ``zkd_jax.data.feeds``'s on-device path
(the digits, gathered from all processes), which must not depend on the process count.

Usage:
  multihost_worker.py --data DIR --out R.npz --steps N [--coordinator host:port
      --num-processes P --process-id p] [--save-dir DIR] [--restore-dir DIR] [--record-at K]
      [--zoo-student NAME] [--device-feed]
"""

from __future__ import annotations

import argparse
import os
import sys

BATCH = 8  # global batch
IMAGE = (16, 16, 3)
NUM_CLASSES = 10


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, required=True, help="train until this global step")
    p.add_argument("--coordinator", default=None)
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--save-dir", default=None, help="checkpoint the final state here")
    p.add_argument("--restore-dir", default=None, help="start from the latest checkpoint here")
    p.add_argument("--record-at", type=int, default=None, help="also record the state at this step")
    p.add_argument("--zoo-student", default=None, help="a zkd_jax.models name instead of the tiny net")
    p.add_argument("--device-feed", action="store_true", help="record on-device feed batches")
    return p.parse_args(argv)


def tiny_cnn(features: int):
    """A small student/teacher built from the house layers: conv -> BatchNorm -> ReLU -> pool -> linear.

    (The zoo's resnet8 takes ~20 s of XLA compilation on a loaded 2-core CPU; this one ~1 s.)
    """
    import flax.linen as nn

    from zkd_jax.models.layers import BatchNorm, Conv2d, Linear, global_avg_pool

    class TinyCNN(nn.Module):
        features: int

        @nn.compact
        def __call__(self, x, train: bool):
            x = Conv2d(self.features, 3, padding=1, name="conv")(x)
            x = nn.relu(BatchNorm(name="bn")(x, train))
            return Linear(NUM_CLASSES, name="fc")(global_avg_pool(x)).astype("float32")

    return TinyCNN(features)


def flat(prefix: str, tree) -> dict:
    import jax
    import numpy as np

    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        out[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def device_feed_batches(mesh) -> dict:
    """Two train batches (epoch 2, from step 3 on) and one eval batch of the digits' device feed,
    gathered into whole global arrays on every process."""
    import itertools

    from jax.experimental import multihost_utils

    from zkd_jax.data import feeds as feed

    f = feed.make_feed("device", dataset="digits", mesh=mesh, seed=0, views=("weak",),
                       batch_size=BATCH, eval_batch_size=BATCH)
    batches = {"train0": None, "train1": None, "eval0": next(f.eval())}
    batches["train0"], batches["train1"] = itertools.islice(f.train(2, 3), 2)
    out = {}
    for name, batch in batches.items():
        for key, value in batch.items():
            out[f"feed/{name}/{key}"] = multihost_utils.process_allgather(value, tiled=True)
    return out


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    from zkd_jax.parallel import distributed

    # The same call the trainer makes (runs.initialize_distributed); a no-op for one process.
    distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                           process_id=args.process_id, timeout_s=60)

    import jax
    import numpy as np

    from zkd_jax.io import checkpoint as ckpt_lib
    from zkd_jax import methods, optim
    from zkd_jax.parallel import create_mesh, host_to_global, replicate, to_host
    from zkd_jax.step import make_train_step
    from zkd_jax.step.state import create_train_state

    if args.num_processes is not None:
        assert jax.process_count() == args.num_processes, jax.process_count()
        assert jax.process_index() == args.process_id
    mesh = create_mesh()
    p, count = jax.process_index(), jax.process_count()
    share = BATCH // count

    # Memory-mapped: a process touches only the rows of its own blocks.
    images = np.load(os.path.join(args.data, "image.npy"), mmap_mode="r")
    labels = np.load(os.path.join(args.data, "label.npy"), mmap_mode="r")

    student, teacher = tiny_cnn(8), tiny_cnn(16)
    if args.zoo_student:
        from zkd_jax import models

        student = models.create(args.zoo_student, num_classes=NUM_CLASSES)
    method = methods.from_config(dict(name="kd", standardize=True, temperature=2.0,
                                      ce_weight=0.1, kd_weight=9.0))
    schedule = optim.step_decay_schedule(0.05, steps_per_epoch=3, milestones=(1,))
    tx = optim.sgd(schedule, momentum=0.9, weight_decay=5e-4)
    root = jax.random.PRNGKey(0)
    state = create_train_state(student, method, tx, init_rng=jax.random.fold_in(root, 0),
                               step_rng=jax.random.fold_in(root, 1), input_shape=(1, *IMAGE),
                               mesh=mesh)
    teacher_host = to_host(jax.jit(lambda: teacher.init(
        jax.random.PRNGKey(42), np.zeros((1, *IMAGE), np.float32), train=False))())
    teacher_variables = replicate(teacher_host, mesh)

    if args.restore_dir:
        restorer = ckpt_lib.Checkpointer(args.restore_dir)
        state, meta = restorer.restore(state)
        restorer.close()
        assert meta["step"] == int(to_host(state.step)), meta
    step = int(to_host(state.step))
    record: dict = {"start_step": np.int32(step), "process_count": np.int32(count),
                    "device_count": np.int32(jax.device_count())}
    record.update(flat("start/", to_host({"params": state.params, "batch_stats": state.batch_stats})))

    train_step = make_train_step(student, teacher, method, tx, mesh, learning_rate_fn=schedule)
    losses = []
    while step < args.steps:
        lo = step * BATCH + p * share  # this process's block of the global batch
        batch = {"image": np.asarray(images[lo:lo + share]),
                 "label": np.asarray(labels[lo:lo + share])}
        epoch = replicate(np.int32(step // 3 + 1), mesh)
        state, metrics = train_step(state, teacher_variables, host_to_global(batch, mesh), epoch)
        step += 1
        losses.append(float(to_host(metrics)["loss"]))
        if step == args.record_at:
            record.update(flat("at/", to_host({"params": state.params, "batch_stats": state.batch_stats})))
    record["losses"] = np.asarray(losses, np.float32)
    record.update(flat("end/", to_host({"params": state.params, "batch_stats": state.batch_stats})))

    if args.device_feed:
        record.update(device_feed_batches(mesh))
    if args.save_dir:
        saver = ckpt_lib.Checkpointer(args.save_dir)
        saver.save(state, {"epoch": step // 3 + 1})
        saver.close()
    if p == 0:
        tmp = args.out + ".tmp.npz"
        np.savez(tmp, **record)
        os.replace(tmp, args.out)
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
