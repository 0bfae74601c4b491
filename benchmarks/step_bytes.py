"""Where the distillation step's HBM bytes go on a TPU, read from the compiled TPU program.

Compiles (never runs: JAX compiles for a TPU topology that is not there, ``libtpu`` on a CPU
machine) the CIFAR KD+LS step that ``zkd-train`` runs, the plain Flax/optax yardstick
(``yardstick.py``) and the step's parts, each as its own program with the step's shardings, and
reads XLA's ``cost_analysis()`` (bytes accessed and FLOPs per chip) and ``memory_analysis()``:

* ``step``: the project's step (teacher BatchNorm folded, kernels in the compute dtype);
* ``step_unfolded``: the same step with the teacher as loaded (what the step was before folding);
* ``yardstick``: the plain step;
* ``teacher_folded`` / ``teacher_unfolded``: the teacher's forward alone;
* ``optimizer``: the optax update alone (SGD, momentum, weight decay), on the student's params;
* ``finite_checks``: the step's gradient norm and finiteness metrics alone;
* ``input_host``: the device half of the host feed (uint8 batch -> normalized float32);
* ``input_device``: one on-device batch (gather, crop, flip, normalize) from the ``[N, 3072]``
  split;
* ``scanned_device``: two steps in one program, each building its batch from the split on the
  device (``input_pipeline=device``, ``steps_per_call``): its temporaries beside ``step``'s.

Inside the step's own program every top-level HLO instruction is attributed, by the
``op_name`` metadata of the step's named scopes (``teacher``, ``student`` forward and
``transpose`` (backward), BatchNorm statistics, ``objective``, ``optimizer``, ``finite_checks``),
its operands' and outputs' bytes (counted as ``cost_analysis`` counts them, in any memory
space; an asynchronous slice or copy counts the moved bytes once). That sum is an estimate beside XLA's own total, which is what the target is
measured on.

    ALLOW_MULTIPLE_LIBTPU_LOAD=1 python benchmarks/step_bytes.py --topology=v5e:2x2 \
        --topology=v5p:2x2x1 --per_chip=512 --json_out=/tmp/bytes.json --md_out=docs/tpu_step_bytes.md
    python benchmarks/step_bytes.py --from_json=/tmp/bytes.json --md_out=docs/tpu_step_bytes.md
"""

from __future__ import annotations

import collections
import datetime
import functools
import importlib.metadata
import json
import os
import re
import sys
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import app, flags  # noqa: E402

_TOPOLOGY = flags.DEFINE_multi_string("topology", ["v5e:2x2"], "TPU topologies to compile for.")
_PER_CHIP = flags.DEFINE_integer("per_chip", 512, "Images per chip.")
_CONFIG = flags.DEFINE_string("config", "kd_ls,resnet32x4,resnet8x4", "configs/cifar100.py arg.")
_JSON = flags.DEFINE_string("json_out", None, "Write the numbers here.")
_MD = flags.DEFINE_string("md_out", None, "Write the MyST page here.")
_FROM = flags.DEFINE_string("from_json", None, "Render the page from a saved JSON; no compiling.")
_PARTS = flags.DEFINE_list("parts", None, "Compile only these programs (default: all).")

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_SHAPE = re.compile(r"\b(pred|[su](?:8|16|32|64)|bf16|f16|f32|f64)\[([0-9,]*)\](\{[^}]*\})?")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*?) ([a-z][a-z0-9-]*)\((.*)$")


# --------------------------------------------------------------------------------------------------
# HLO attribution
# --------------------------------------------------------------------------------------------------


def hbm_bytes(type_text: str) -> int:
    """Bytes of the arrays in an HLO type, in any memory space, as ``cost_analysis`` counts
    them (values it keeps in VMEM, layout ``S(1)``, included)."""
    return sum(_arrays(type_text))


_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all",
         "partition-id", "replica-id", "copy-done", "slice-done", "all-reduce-done",
         "all-gather-done", "collective-permute-done", "while", "conditional", "call",
         "opt-barrier"}


COPIES = "HBM <-> VMEM copies (XLA's, no op_name)"


def category(op_name: str) -> str:
    """The part of the step an instruction belongs to, from its ``op_name`` (named scopes).
    Instructions without one are XLA's own: almost all asynchronous copies of activations and
    weights between HBM and VMEM (memory-space assignment)."""
    if not op_name:
        return COPIES
    if "teacher" in op_name:
        return "teacher forward"
    if "optimizer" in op_name:
        return "optimizer update"
    if "finite_checks" in op_name:
        return "finite checks, grad norm"
    if "objective" in op_name:
        return "loss (objective)"
    if "input" in op_name:
        return "input"
    if "student" in op_name or "ResNet" in op_name:
        backward = "transpose(" in op_name
        if "/bn" in op_name and re.search(r"(reduce_sum|integer_pow|square|mean)$", op_name):
            return "BatchNorm statistics" + (" (backward)" if backward else " (forward)")
        return "student backward" if backward else "student forward"
    return "other"


def attribute(hlo_text: str, classify=category) -> dict[str, int]:
    """HBM bytes (operands + outputs) of the entry computation's instructions (and while bodies,
    counted once, as ``cost_analysis`` does), summed by ``classify(op_name)``."""
    comps: dict[str, list] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if line.startswith("ENTRY ") or (line.startswith("%") and line.rstrip().endswith("{")):
            name = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            current = comps.setdefault(name, [])
            entry = name if line.startswith("ENTRY") else entry
            continue
        m = _INSTR.match(line)
        if m and current is not None:
            current.append(m.groups() + (line,))
    sizes = {name: hbm_bytes(t) for body in comps.values() for name, t, *_ in body}
    out: collections.Counter = collections.Counter()

    def walk(name):
        for inst, type_text, opcode, rest, line in comps.get(name, []):
            if opcode == "while":
                walk(re.search(r"body=%([\w.\-]+)", line).group(1))
                continue
            if opcode in _FREE:
                continue
            if opcode in ("slice-start", "copy-start"):  # one move between HBM and VMEM
                arrays = _arrays(type_text)
                nbytes = arrays[1] if opcode == "slice-start" else arrays[0]
            else:
                args = rest.split("), ")[0]
                nbytes = sizes[inst] + sum(sizes.get(a, 0) for a in re.findall(r"%([\w.\-]+)", args))
            m = re.search(r'op_name="([^"]*)"', line)
            out[classify(m.group(1) if m else "")] += nbytes

    walk(entry)
    return dict(out)


def _arrays(type_text: str) -> list[int]:
    """Bytes of every array in an HLO type, wherever it lives."""
    out = []
    for dtype, dims, _ in _SHAPE.findall(type_text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        out.append(n * DTYPE_BYTES[dtype])
    return out


# --------------------------------------------------------------------------------------------------
# Programs
# --------------------------------------------------------------------------------------------------


def _stats(compiled, seconds: float) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    return {"bytes": float(cost.get("bytes accessed", 0.0)), "flops": float(cost.get("flops", 0.0)),
            "temp_bytes": int(mem.temp_size_in_bytes),
            "argument_bytes": int(mem.argument_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes), "compile_seconds": round(seconds, 1)}


def compile_all(topology: str, per_chip: int, config_arg: str, parts=None) -> dict:
    """Every program of the module docstring for ``topology``: ``{name: stats}``."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec as P

    import yardstick
    from zkd_jax import data, models
    from zkd_jax.configs.cifar100 import get_config
    from zkd_jax.data import device
    from zkd_jax.parallel import create_mesh
    from zkd_jax.step import create_states, init_variables
    from zkd_jax.step.train_step import TeacherCall, finite_checks, teacher_forward
    from zkd_jax.trainer import recipe, setup, students

    devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    mesh = create_mesh(devices)
    rep, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    config = get_config(config_arg)
    with config.unlocked():
        config.mixed_precision = True
        config.batch_size = per_chip * len(devices)
    specs, _ = students.run_students(config)
    methods = students.build_methods(specs)
    method = methods[0]
    info = data.info(config.dataset)
    dtype = jnp.bfloat16
    student = models.create(config.student.arch, num_classes=info.num_classes, dtype=dtype)
    teacher = models.create(config.teacher.arch, num_classes=info.num_classes, dtype=dtype)
    steps = data.steps_per_epoch(config.dataset, config.batch_size)
    tx, step = setup.make_step(config, student, teacher, methods, mesh, steps, single=True)
    call = setup.teacher_call(config, teacher)
    unfolded_call = recipe.images(config, info.image_size).teacher_call

    def abstract(tree, sharding=rep):
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                            tree)

    raw_t = jax.eval_shape(lambda k: init_variables(teacher, k, (1, 32, 32, 3)),
                           jax.random.PRNGKey(0))
    folded_t = abstract(jax.eval_shape(
        functools.partial(setup.step_teacher_variables, config, teacher), raw_t))
    raw_t = abstract(raw_t)
    state = abstract(jax.eval_shape(
        lambda: create_states(student, methods, [0], tx, input_shape=(1, 32, 32, 3))[0]))
    b = config.batch_size
    batch = {"image": jax.ShapeDtypeStruct((b, 32, 32, 3), jnp.float32, sharding=sharded),
             "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sharded)}
    epoch = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    logits = {"weak": jax.ShapeDtypeStruct((b, info.num_classes), jnp.float32, sharding=sharded)}
    out: dict = {}

    def record(name, lowered_fn):
        if parts and name not in parts:
            return None
        start = time.perf_counter()
        compiled = lowered_fn().compile()
        out[name] = _stats(compiled, time.perf_counter() - start)
        print(f"{topology} {name}: {out[name]}", flush=True)
        return compiled

    compiled = record("step", lambda: step.lower(state, folded_t, batch, epoch))
    if compiled is not None:
        out["step"]["attribution"] = attribute(compiled.as_text())
    _, plain_step = setup.make_step(config, student, teacher, methods, mesh, steps, single=True)
    if "step_unfolded" in (parts or ["step_unfolded"]):
        from zkd_jax.step import make_train_step
        schedule, _tx = recipe.make_optimizer(config.optimizer, steps, config.epochs)
        unfolded = make_train_step(student, teacher, method, tx, mesh, learning_rate_fn=schedule,
                                   teacher_call=unfolded_call)
        compiled = record("step_unfolded", lambda: unfolded.lower(state, raw_t, batch, epoch))
        if compiled is not None:
            out["step_unfolded"]["attribution"] = attribute(compiled.as_text())
    init, ystep = yardstick.make_yardstick(
        student, teacher, temperature=float(method.temperature), ce_weight=float(method.ce_weight),
        kd_weight=float(method.kd_weight), standardize_logits=bool(method.standardize),
        lr=float(config.optimizer.lr), momentum=float(config.optimizer.momentum),
        weight_decay=float(config.optimizer.weight_decay))
    ystate = abstract(jax.eval_shape(lambda s: init(s.params["student"], s.batch_stats), state))
    compiled = record("yardstick", lambda: ystep.lower(ystate, raw_t, batch["image"],
                                                       batch["label"]))
    if compiled is not None:
        out["yardstick"]["attribution"] = attribute(compiled.as_text(), _yardstick_category)

    def teacher_program(variables, teacher_call):
        fn = jax.jit(lambda v, x: teacher_forward(teacher, v, {"weak": x}, method, teacher_call),
                     in_shardings=(rep, sharded), out_shardings=sharded)
        return lambda: fn.lower(variables, batch["image"])

    record("teacher_folded", teacher_program(folded_t, call))
    record("teacher_unfolded", teacher_program(raw_t, unfolded_call or TeacherCall()))
    grads = state.params

    def update(params, opt_state, g):
        updates, opt_state = tx.update(g, opt_state, params)
        import optax
        return optax.apply_updates(params, updates), opt_state

    opt = jax.jit(update, in_shardings=rep, out_shardings=rep, donate_argnums=(0, 1))
    record("optimizer", lambda: opt.lower(state.params, state.opt_state, grads))
    checks = jax.jit(finite_checks, in_shardings=(sharded, rep, rep), out_shardings=rep)
    record("finite_checks", lambda: checks.lower(logits, grads, state.params))
    host = jax.jit(functools.partial(device.normalize_batch, mean=info.mean, std=info.std),
                   in_shardings=sharded, out_shardings=sharded)
    u8 = {"image": jax.ShapeDtypeStruct((b, 32, 32, 3), jnp.uint8, sharding=sharded),
          "label": batch["label"]}
    record("input_host", lambda: host.lower(u8))
    n = info.num_train
    dev = jax.jit(functools.partial(device.device_train_batch, batch_size=b, mean=info.mean,
                                    std=info.std), out_shardings=sharded)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    record("input_device", lambda: dev.lower(
        jax.ShapeDtypeStruct((n, 3072), jnp.uint8, sharding=rep),
        jax.ShapeDtypeStruct((n,), jnp.int32, sharding=rep), key, scalar, scalar,
        order=jax.ShapeDtypeStruct((n,), jnp.int32, sharding=rep)))
    from zkd_jax.step import scan as scan_lib  # pylint: disable=import-outside-toplevel

    scanned = scan_lib.make_scanned_step(step.unjitted, mesh, 2,
                                         device.train_batch_builder(b, info.mean, info.std))
    record("scanned_device", lambda: scanned.lower(
        state, folded_t, jax.ShapeDtypeStruct((n, 3072), jnp.uint8, sharding=rep),
        jax.ShapeDtypeStruct((n,), jnp.int32, sharding=rep), key, scalar, scalar,
        jax.ShapeDtypeStruct((n,), jnp.int32, sharding=rep)))
    del plain_step
    return out


def _yardstick_category(op_name: str) -> str:
    if not op_name:
        return COPIES
    if "jvp(" in op_name or "transpose(" in op_name:
        return category(op_name.replace("jvp(", "student/jvp("))
    if "ResNet" in op_name:
        return "teacher forward"
    if any(k in op_name for k in ("sgd", "add_decayed_weights", "optax")):
        return "optimizer update"
    return "other"


# --------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------


def render(result: dict) -> str:
    """The MyST page (``docs/tpu_step_bytes.md``) from :func:`compile_all`'s results."""
    import step_bytes_page  # pylint: disable=import-outside-toplevel

    return step_bytes_page.render(result)


def main(argv) -> None:
    del argv
    if _FROM.value:
        with open(_FROM.value, encoding="utf-8") as f:
            result = json.load(f)
    else:
        import jax
        result = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "jax": jax.__version__, "libtpu": importlib.metadata.version("libtpu"),
            "config": _CONFIG.value, "per_chip": _PER_CHIP.value,
            "command": "python benchmarks/step_bytes.py " + " ".join(
                [f"--topology={t}" for t in _TOPOLOGY.value] + [f"--per_chip={_PER_CHIP.value}"]),
            "topologies": {t: compile_all(t, _PER_CHIP.value, _CONFIG.value, _PARTS.value)
                           for t in _TOPOLOGY.value},
        }
        if _JSON.value:
            _write(_JSON.value, json.dumps(result, indent=1))
    if _MD.value:
        _write(_MD.value, render(result))
    print(json.dumps({t: {k: v.get("bytes") for k, v in r.items()}
                      for t, r in result["topologies"].items()}))


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


if __name__ == "__main__":
    app.run(main)
