"""Times zkd_jax's real jitted distillation step on synthetic data resident on the device.

The step is the very object ``zkd-train`` runs: ``zkd_jax.trainer.setup.make_step`` (one student,
or ``--students K``), built from the config (model, method, loss, PyTorch SGD with the paper's
schedule, batch size) by the function ``train_and_evaluate`` builds it with. Only the inputs are synthetic: a random teacher (same architecture
and dtype) and one random batch placed on the device once, so the number measured is the step
itself: teacher forward + student forward/backward + optax update.

Timing: the first calls (compilation) are excluded; then ``--repeats`` rounds of ``--steps`` steps,
each round ended by ``jax.block_until_ready``; the median round is reported. Two diagnostics come
with it: ``dispatch_ms_per_step``, the host's time to enqueue a step (a round's time before its
``block_until_ready``: close to ``ms_per_step`` means the host, not the device, sets the pace), and,
with the projection, ``teacher_ms_per_step``, the teacher's forward alone (the part K students
share; one student's own part is roughly ``ms_per_step - teacher_ms_per_step``).

Epoch projection (``--epoch_projection``, on by default): one epoch of the config's dataset =
``steps_per_epoch`` (781 for CIFAR-100 at batch 64) x the measured step + the same number of
on-device input batches (``zkd_jax.data.device.device_train_batch``, timed alone; 32x32 datasets
only) + the evaluation of the test split (10,000 images for CIFAR-100) with the real eval step,
measured per eval batch, once per student. ``total_minutes`` multiplies by ``config.epochs`` (240).
That is the cost of ``zkd-train --config.input_pipeline=device``, whose feed (``zkd_jax.data.feeds``) builds
every batch with that same function.

Yardstick (``--yardstick``, KD and KD+LS only, one student): the minimal step of ``yardstick.py``
(the same models, loss and optimizer written plainly in Flax/optax, no project step code), started
from the same student variables and timed on the same batch in the same run, its rounds
alternating with the project's step's rounds. ``ratio_to_yardstick = yardstick_ms_per_step /
ms_per_step`` (the project's images/s over the yardstick's: above 1, the project's step is faster).
``loss_first_step`` and ``yardstick_loss_first_step`` are both steps' losses at their first call,
from the same variables and batch (student 0's with K > 1): equal up to float rounding when the two
compute the same thing.

Profile (``--profile=DIR``): after the timing, ``--profile_steps`` more steps of the project's
step run inside a ``jax.profiler`` trace (``zkd_jax.trainer.profile.StepProfiler``, the code of
``zkd-train --config.profile_steps``), written to ``DIR/plugins/profile/<run>/*.xplane.pb``.

    python benchmarks/train_step.py --config=configs/cifar100.py:kd_ls,resnet32x4,resnet8x4 \
        [--mixed_precision] [--batch=64] [--students=1 [--students_form=loop|vmap|vmap_matmul]]
        [--steps=50] [--repeats=5] [--noepoch_projection] [--yardstick]
        [--profile=DIR [--profile_steps=3]]
    # CPU smoke test:
    python benchmarks/train_step.py --config=configs/cifar100.py:kd_ls,resnet8,resnet8 --batch=8 \
        --steps=3 --repeats=2 --eval_batch=16

Prints ONE JSON object (keys: see ``docs/measurements.md``, "Training step throughput").
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import time
from typing import Any, NamedTuple

import bench_flags
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

_STUDENTS = flags.DEFINE_integer("students", 1, "K students in one program (seeds seed..seed+K-1).")
_STEPS = flags.DEFINE_integer("steps", 50, "Steps per timed round.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds; the median is reported.")
_FORM = flags.DEFINE_enum("students_form", None, ["loop", "vmap", "vmap_matmul"],
                          "How K > 1 students are mapped (default: the config's).")
_PROJECTION = flags.DEFINE_bool("epoch_projection", True, "Also time eval and input; project.")
_EVAL_BATCH = flags.DEFINE_integer("eval_batch", None, "Eval batch (default: config's).")
_YARDSTICK = flags.DEFINE_bool("yardstick", False,
                               "Also time the plain Flax/optax step of yardstick.py (KD, KD+LS).")

KEYS = ("benchmark", "tag", "config", "method", "teacher", "student", "batch", "students",
        "mixed_precision", "students_form", "device_kind", "device_count", "platform",
        "jax_version", "date",
        "steps", "repeats", "compile_seconds", "ms_per_step", "ms_per_step_rounds",
        "dispatch_ms_per_step", "images_per_sec", "images_per_sec_per_student",
        "teacher_ms_per_step", "yardstick_ms_per_step", "yardstick_ms_per_step_rounds",
        "ratio_to_yardstick", "loss_first_step", "yardstick_loss_first_step", "profile",
        "projection")


def _time_rounds(run_round, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run_round())
        times.append(time.perf_counter() - start)
    return times


def _synthetic_batch(views, batch: int, image_shape, num_classes: int, mesh) -> dict:
    from zkd_jax.parallel import host_to_global
    from zkd_jax.views import BATCH_KEYS

    rng = np.random.default_rng(0)
    host = {BATCH_KEYS[v]: rng.normal(size=(batch, *image_shape)).astype(np.float32) for v in views}
    host["label"] = rng.integers(0, num_classes, batch).astype(np.int32)
    return host_to_global(host, mesh)


class Built(NamedTuple):
    step: Any
    state: Any
    teacher: Any
    teacher_variables: Any  # as the step reads them (BatchNorm folded where the family folds)
    method: Any
    student: Any
    mesh: Any
    steps_per_epoch: int
    info: Any
    image_shape: tuple
    raw_teacher_variables: Any = None  # as loaded: what the yardstick reads
    teacher_call: Any = None


def build(config, num_students: int) -> Built:
    """The step of ``zkd-train`` for ``config`` with K students, its state and a random teacher."""
    from zkd_jax import data, models
    from zkd_jax.parallel import check_batch_size, create_mesh
    from zkd_jax.step import StateStack, create_states, init_variables
    from zkd_jax.trainer import recipe, setup, students

    mesh = create_mesh(jax.devices())
    check_batch_size(config.batch_size, mesh)
    info = data.info(config.dataset)
    images = recipe.images(config, info.image_size)  # the students' and the teacher's sizes
    image_shape = images.student_shape
    model_dataset = setup._model_dataset(config)  # pylint: disable=protected-access
    dtype = jnp.bfloat16 if config.mixed_precision else jnp.float32
    student = models.create(config.student.arch, num_classes=info.num_classes,
                            dataset=model_dataset, dtype=dtype)
    fields = recipe.student_fields(config, student, images.image_size)
    if fields:
        student = student.clone(**fields)
    if num_students > 1:
        config.students = tuple({"seed": config.seed + k} for k in range(num_students))
    specs, single = students.run_students(config)
    method_list = students.build_methods(specs)
    method = method_list[0]
    teacher, teacher_variables, raw_teacher_variables = None, {}, {}
    if method.needs_teacher:
        teacher = models.create(config.teacher.arch, num_classes=info.num_classes,
                                dataset=recipe.teacher_model_dataset(config, model_dataset),
                                dtype=dtype)
        raw_teacher_variables = init_variables(teacher, jax.random.PRNGKey(123),
                                               (1, *images.teacher_shape), mesh=mesh)
        teacher_variables = setup.step_teacher_variables(config, teacher, raw_teacher_variables)
    steps_per_epoch = data.steps_per_epoch(config.dataset, config.batch_size,
                                           config.get("train_examples", -1))
    tx, step = setup.make_step(config, student, teacher, method_list, mesh, steps_per_epoch,
                               single=single)
    states = create_states(student, method_list, [s.seed for s in specs], tx,
                           input_shape=(1, *image_shape), mesh=mesh)
    state = states[0] if single else StateStack(mesh).stack(states)
    return Built(step, state, teacher, teacher_variables, method, student, mesh, steps_per_epoch,
                 info, image_shape, raw_teacher_variables, setup.teacher_call(config, teacher))


def _eval_ms_per_batch(student, state, num_students, mesh, eval_batch, image_shape, info,
                       repeats) -> float:
    from zkd_jax.parallel import host_to_global
    from zkd_jax.step import StateStack, make_eval_step, student_variables

    if num_students > 1:
        state = StateStack(mesh).take(state, 0)
    variables = student_variables(state)
    eval_step = make_eval_step(student, mesh)
    rng = np.random.default_rng(1)
    batch = host_to_global({
        "image": rng.normal(size=(eval_batch, *image_shape)).astype(np.float32),
        "label": rng.integers(0, info.num_classes, eval_batch).astype(np.int32),
        "mask": np.ones(eval_batch, bool)}, mesh)
    jax.block_until_ready(eval_step(variables, batch))
    calls = 5
    times = _time_rounds(lambda: [eval_step(variables, batch) for _ in range(calls)], repeats)
    return 1e3 * statistics.median(times) / calls


def _teacher_ms_per_step(teacher, method, mesh, teacher_variables, batch, repeats,
                         call=None) -> float:
    """Median ms of the step's teacher part alone (eval-mode forward of every view), jitted with
    the step's shardings: what K students in one program share."""
    from zkd_jax.parallel import batch_sharding, replicated
    from zkd_jax.step.train_step import teacher_forward
    from zkd_jax.views import images_of

    forward = jax.jit(
        lambda v, b: teacher_forward(teacher, v, images_of(b, method.views), method,
                                     *([call] if call is not None else [])),
        in_shardings=(replicated(mesh), batch_sharding(mesh)), out_shardings=replicated(mesh))
    jax.block_until_ready(forward(teacher_variables, batch))
    calls = 10
    times = _time_rounds(lambda: [forward(teacher_variables, batch) for _ in range(calls)],
                         repeats)
    return 1e3 * statistics.median(times) / calls


def _input_ms_per_step(info, batch: int, repeats: int) -> float | None:
    """Median ms of one on-device augmented batch (pad, crop, flip, normalize), 32x32 only."""
    from zkd_jax.data import device

    if info.image_size != 32:
        return None
    n = info.num_train
    rng = np.random.default_rng(2)
    images = jax.device_put(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
    labels = jax.device_put(rng.integers(0, info.num_classes, n).astype(np.int32))
    key = jax.random.PRNGKey(0)
    order = device.epoch_permutation(key, 1, n)
    fn = jax.jit(functools.partial(device.device_train_batch, batch_size=batch, mean=info.mean,
                                   std=info.std))
    jax.block_until_ready(fn(images, labels, key, 1, 0, order=order))
    calls = 10
    times = _time_rounds(
        lambda: [fn(images, labels, key, 1, s, order=order) for s in range(calls)], repeats)
    return 1e3 * statistics.median(times) / calls


def make_yardstick(built: Built, config) -> tuple[Any, Any]:
    """``(init, step)`` of ``yardstick.py`` for the built run: its student and teacher modules,
    its method's temperature and weights, ``config.optimizer``'s rate (at step 0), momentum and
    weight decay. Raises ``ValueError`` for a method other than KD or KD+LS."""
    import yardstick
    from zkd_jax.methods import KD

    method, opt = built.method, config.optimizer
    if not isinstance(method, KD):
        raise ValueError(f"--yardstick times KD and KD+LS only, not {config.get('variant')!r}; "
                         "use a kd or kd_ls config.")
    return yardstick.make_yardstick(
        built.student, built.teacher, temperature=float(method.temperature),
        ce_weight=float(method.ce_weight), kd_weight=float(method.kd_weight),
        standardize_logits=bool(method.standardize), lr=float(opt.lr),
        momentum=float(opt.momentum), weight_decay=float(opt.weight_decay))


def _trace(step, state, args: tuple, directory: str, steps: int):
    """Runs ``steps`` more steps inside a ``jax.profiler`` trace written to ``directory``
    (``zkd_jax.trainer.profile.StepProfiler``, as ``zkd-train --config.profile_steps``)."""
    from zkd_jax.trainer.profile import StepProfiler

    profiler = StepProfiler(directory, steps=steps, start=0)
    for i in range(steps):
        profiler.before(i)
        state, _ = step(state, *args)
        profiler.after(1, state)
    profiler.stop(state)
    return state


def _warm(step, state, args: tuple) -> tuple[Any, Any, float]:
    """Two calls (the first compiles); returns the state, the first call's second output (its
    metrics or loss, computed from the initial state) and the first call's seconds."""
    start = time.perf_counter()
    state, first = step(state, *args)
    jax.block_until_ready(first)
    seconds = time.perf_counter() - start
    state, out = step(state, *args)  # one more warm step
    jax.block_until_ready(out)
    return state, first, seconds


def run(config, *, num_students: int, steps: int, repeats: int, projection: bool,
        eval_batch: int | None, yardstick: bool = False, profile: str | None = None,
        profile_steps: int = 3) -> dict:
    """Builds and times the step (and the yardstick); returns the result dict (``KEYS``)."""
    if num_students < 1 or steps < 1 or repeats < 1 or profile_steps < 1:
        raise ValueError("--students, --steps, --repeats and --profile_steps must be >= 1.")
    if yardstick and num_students > 1:
        raise ValueError("--yardstick times one student; drop --students or --yardstick.")
    built = build(config, num_students)
    (step, state, teacher, teacher_variables, method, student, mesh, steps_per_epoch, info,
     image_shape) = built[:10]
    batch = _synthetic_batch(method.views, config.batch_size, image_shape, info.num_classes, mesh)
    epoch = jax.device_put(np.int32(1))
    args = (teacher_variables, batch, epoch)
    yard_box, yard_loss = [], None
    if yardstick:  # from a copy of the same student variables, before the step donates them
        init, yard_step = make_yardstick(built, config)
        yard_args = (built.raw_teacher_variables, batch["image"], batch["label"])
        yard_state = init(*jax.tree.map(jnp.copy, (state.params["student"], state.batch_stats)))
        yard_state, yard_loss, _ = _warm(yard_step, yard_state, yard_args)
        yard_box.append(yard_state)
    state, first_metrics, compile_seconds = _warm(step, state, args)
    box, dispatch = [state], []

    def one_round():
        start, s = time.perf_counter(), box[0]
        for _ in range(steps):
            s, m = step(s, *args)
        dispatch.append(time.perf_counter() - start)  # the host's share: all steps enqueued
        box[0] = s
        return s, m

    def yard_round():
        s = yard_box[0]
        for _ in range(steps):
            s, loss = yard_step(s, *yard_args)
        yard_box[0] = s
        return s, loss

    rounds, yard_rounds = [], []
    for _ in range(repeats):  # alternating, so both see the same machine load
        rounds += _time_rounds(one_round, 1)
        if yardstick:
            yard_rounds += _time_rounds(yard_round, 1)
    if profile:
        box[0] = _trace(step, box[0], args, profile, profile_steps)
    ms = 1e3 * statistics.median(rounds) / steps
    yard_ms = 1e3 * statistics.median(yard_rounds) / steps if yardstick else None
    per_student = config.batch_size / (ms / 1e3)
    result = {
        "benchmark": "train_step", "method": config.variant,
        "teacher": config.teacher.arch if method.needs_teacher else None,
        "student": config.student.arch, "batch": config.batch_size, "students": num_students,
        "mixed_precision": bool(config.mixed_precision),
        "students_form": config.students_form if num_students > 1 else None,
        **bench_flags.run_fields(),
        "steps": steps, "repeats": repeats, "compile_seconds": round(compile_seconds, 3),
        "ms_per_step": round(ms, 4),
        "ms_per_step_rounds": [round(1e3 * t / steps, 4) for t in rounds],
        "dispatch_ms_per_step": round(1e3 * statistics.median(dispatch) / steps, 4),
        "images_per_sec": round(num_students * per_student, 1),
        "images_per_sec_per_student": round(per_student, 1),
        "teacher_ms_per_step": None,
        "yardstick_ms_per_step": None if yard_ms is None else round(yard_ms, 4),
        "yardstick_ms_per_step_rounds": [round(1e3 * t / steps, 4) for t in yard_rounds] or None,
        "ratio_to_yardstick": None if yard_ms is None else round(yard_ms / ms, 4),
        "loss_first_step": float(np.ravel(first_metrics["loss"])[0]),  # student 0 when K > 1
        "yardstick_loss_first_step": None if yard_loss is None else float(yard_loss),
        "profile": profile,
        "projection": None,
    }
    if projection:
        if method.needs_teacher:
            result["teacher_ms_per_step"] = round(_teacher_ms_per_step(
                teacher, method, mesh, teacher_variables, batch, repeats,
                built.teacher_call), 4)
        eval_batch = eval_batch or config.eval_batch_size
        eval_ms = _eval_ms_per_batch(student, box[0], num_students, mesh, eval_batch,
                                     image_shape, info, repeats)
        input_ms = _input_ms_per_step(info, config.batch_size, repeats)
        eval_batches = math.ceil(info.num_test / eval_batch)
        train_s = steps_per_epoch * ms / 1e3
        input_s = steps_per_epoch * (input_ms or 0.0) / 1e3
        eval_s = num_students * eval_batches * eval_ms / 1e3
        epoch_s = train_s + input_s + eval_s
        result["projection"] = {
            "dataset": config.dataset, "steps_per_epoch": steps_per_epoch,
            "train_seconds_per_epoch": round(train_s, 3),
            "input_ms_per_step": None if input_ms is None else round(input_ms, 4),
            "input_seconds_per_epoch": round(input_s, 3),
            "eval_images": info.num_test, "eval_batch": eval_batch, "eval_batches": eval_batches,
            "eval_ms_per_batch": round(eval_ms, 4), "eval_seconds_per_epoch": round(eval_s, 3),
            "epoch_seconds": round(epoch_s, 3), "epochs": config.epochs,
            "total_minutes": round(config.epochs * epoch_s / 60, 2),
        }
    return result


def main(argv) -> None:
    config = bench_flags.load_config(argv)
    if _FORM.value is not None:
        with config.unlocked():
            config.students_form = _FORM.value
    result = run(config, num_students=_STUDENTS.value, steps=_STEPS.value,
                 repeats=_REPEATS.value, projection=_PROJECTION.value,
                 eval_batch=_EVAL_BATCH.value, yardstick=_YARDSTICK.value,
                 profile=bench_flags.PROFILE.value, profile_steps=bench_flags.PROFILE_STEPS.value)
    result = {k: result[k] for k in KEYS}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    app.run(main)
