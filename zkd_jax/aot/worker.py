"""The child process of ``zkd_jax.aot.compile_programs``: ``python -m zkd_jax.aot.worker``.

Reads one pickled request on stdin (``fields``: the run's config as plain values, ``topology``,
``per_chip_batch``, ``all_forms``, ``skip``: program names not to compile), has the trainer build
the run's programs for the topology's devices (``zkd_jax.trainer.programs.topology_plan``:
abstract arguments, nothing runs on a device), compiles them one by one and prints one line ``ZKD_AOT <json>`` per event:
``plan`` (the programs and the slice), ``start`` (a program's compile begins), ``program`` (its
figures, ``zkd_jax.aot.figures.KEYS``), ``error`` (a config or topology the user must fix). The
compiler runs in this process so that a crash of it (libtpu has died with SIGSEGV on some
programs) ends this process only; the parent names the program that was compiling.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import time

PREFIX = "ZKD_AOT "


def emit(event: str, **fields) -> None:
    print(PREFIX + json.dumps({"event": event, **fields}), flush=True)


def libtpu_version() -> str | None:
    from importlib import metadata  # noqa: PLC0415

    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return None


def topology_devices(topology):
    """The devices of a parsed topology: a TPU slice's (compile-only, no TPU needed) or CPUs."""
    import jax  # noqa: PLC0415

    if not topology.is_tpu:
        return jax.devices("cpu")
    from jax.experimental import topologies  # noqa: PLC0415

    return topologies.get_topology_desc(topology_name=topology.name, platform="tpu").devices


def count_chips(devices) -> int:
    """Distinct chips of ``devices`` (a v4 topology lists each chip's two TensorCores)."""
    seen = {(d.process_index, tuple(getattr(d, "coords", ()) or (d.id,))) for d in devices}
    return len(seen)


def replicated_bytes(args) -> int:
    """Bytes of one device's replicated arguments (state, teacher): what no batch size changes."""
    import jax  # noqa: PLC0415

    total = 0
    for leaf in jax.tree.leaves(args):
        spec = getattr(getattr(leaf, "sharding", None), "spec", None)
        if spec is not None and all(p is None for p in spec):
            total += leaf.size * leaf.dtype.itemsize
    return int(total)


def _compile(program, record: dict, counts: dict) -> dict:
    """Lowers and compiles one program; its figures (or the reason it failed) in ``record``."""
    import jax  # noqa: PLC0415

    from zkd_jax.aot import figures  # noqa: PLC0415

    record["fixed_bytes"] = replicated_bytes(program.args) * counts["devices_per_chip"]
    start = time.perf_counter()
    try:
        compiled = program.function.lower(*program.args).compile()
    except (jax.errors.JaxRuntimeError, ValueError, RuntimeError) as err:
        message = str(err)
        oom = figures.out_of_memory(message)
        record.update(status="does_not_fit" if oom else "failed",
                      error=" ".join(message.split())[:600],
                      compile_seconds=time.perf_counter() - start)
        if oom:
            needed, record["compiler_limit_bytes"] = oom
            if "temporaries" in message:  # the compiler counted the temporaries only
                needed += record["fixed_bytes"]
            record["total_bytes"] = needed
        return record
    record["compile_seconds"] = time.perf_counter() - start
    dpc = counts["devices_per_chip"]
    record.update(figures.memory_figures(compiled, dpc))
    counted = program.steps if (program.unrolled and program.steps) else 1
    record.update(figures.cost_figures(compiled, dpc, counted))
    train = program.steps > 0
    per_chip_images = program.images / program.steps / counts["chips"] if train else (
        program.images / counts["chips"])
    record.update(figures.roofline(
        counts["chip"], flops=record["flops_per_step"], bytes_=record["bytes_per_step"],
        per_chip_images=per_chip_images, chips=counts["chips"],
        steps_per_epoch=counts["steps_per_epoch"] if train else counts["eval_batches"]))
    hbm = counts["chip"].hbm_bytes if counts["chip"] else None
    record["hbm_bytes"] = hbm
    record["hbm_fraction"] = record["total_bytes"] / hbm if hbm else None
    record["status"] = "ok" if not hbm or record["total_bytes"] <= hbm else "does_not_fit"
    return record


def main() -> None:
    request = pickle.load(sys.stdin.buffer)
    import jax  # noqa: PLC0415

    from zkd_jax.aot.chips import parse_topology  # noqa: PLC0415
    from zkd_jax.parallel import create_mesh  # noqa: PLC0415
    from zkd_jax.trainer import programs as programs_lib  # noqa: PLC0415

    topology = parse_topology(request["topology"])
    versions = {"jax_version": jax.__version__,
                "libtpu_version": libtpu_version() if topology.is_tpu else None}
    try:
        devices = topology_devices(topology)
    except (jax.errors.JaxRuntimeError, RuntimeError, ValueError) as err:
        emit("error", kind="topology", message=" ".join(str(err).split())[:300])
        return
    chips = count_chips(devices)
    try:
        plan = programs_lib.topology_plan(request["fields"], create_mesh(devices), chips=chips,
                                          per_chip_batch=request.get("per_chip_batch"),
                                          all_forms=request.get("all_forms", False))
    except ValueError as err:
        emit("error", kind="config", message=str(err))
        return
    counts = {"chip": topology.chip, "chips": chips, "devices_per_chip": len(devices) // chips,
              "steps_per_epoch": plan.steps_per_epoch, "eval_batches": plan.eval_batches}
    common = {
        "topology": topology.name, "chip": topology.chip.name if topology.chip else "cpu",
        "device_kind": devices[0].device_kind, "chips": chips, "devices": len(devices),
        "processes": len({d.process_index for d in devices}), "students": plan.students,
        "mixed_precision": plan.mixed_precision, **versions,
    }
    emit("plan", programs=[p.name for p in plan.programs], steps_per_epoch=plan.steps_per_epoch,
         **common)
    for program in plan.programs:
        only = request.get("only")
        if program.name in request.get("skip", ()) or (only and program.name not in only):
            continue
        emit("start", program=program.name)
        record = {"program": program.name, "runs": program.runs, "error": None, **common,
                  "per_chip_batch": (program.images / max(program.steps, 1)) / chips,
                  "global_batch": program.images // max(program.steps, 1),
                  "steps_per_call": program.steps}
        emit("program", **_compile(program, record, counts))


if __name__ == "__main__":
    main()
