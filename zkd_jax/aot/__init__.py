"""Compile-only (ahead-of-time) programs for a TPU topology, without a TPU: ``zkd-compile``.

``compile_programs(config.to_dict(), "v5e:2x2")`` compiles the programs ``zkd-train`` would run
for that config on that slice (``zkd_jax.trainer.programs.topology_plan``: the trainer's own setup
with abstract state, teacher and batches) with the TPU compiler of libtpu, in a child process
(``zkd_jax.aot.worker``) so that a compiler crash ends the child only, and returns one record per
program: HBM per chip, FLOPs and bytes per chip per step, the roofline bound
(``zkd_jax.aot.figures``; chip figures: ``zkd_jax.aot.chips``) and the compile time. Nothing runs
on a device and nothing is written. This package never reads the config: it hands its plain values
to the trainer in the child.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from zkd_jax.aot.chips import (
    CHIPS,
    GIB,
    Chip,
    Topology,
    known_topologies,
    parse_topology,
    unknown_topology_message,
)
from zkd_jax.aot.figures import KEYS

TPU_EXTRA = "pip install 'zkd_jax[tpu]'"


class LibtpuMissingError(ValueError):
    """A TPU topology was asked for and libtpu is not installed."""


class DoesNotFitError(Exception):
    """A program needs more HBM per chip than the chip has; the message is one line."""


@dataclasses.dataclass
class Report:
    """The records of one ``compile_programs`` (``KEYS`` each, in the plan's order) and the plan's
    fields (``chips``, ``devices``, ``steps_per_epoch``, versions)."""

    records: list[dict]
    plan: dict

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.records if r["status"] != "ok"]


def libtpu_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def _child_env(topology: Topology) -> dict[str, str]:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (os.path.dirname(root),
                                                      env.get("PYTHONPATH"))))
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"  # a process of this machine may hold libtpu already
    env["JAX_PLATFORMS"] = "cpu"  # compile-only: never attach to a TPU this host may have
    env.setdefault("TPU_ACCELERATOR_TYPE", "")  # quiets libtpu's guess of the host's TPU
    if topology.cpu_devices:
        env["XLA_FLAGS"] = " ".join(filter(None, (
            env.get("XLA_FLAGS", ""),
            f"--xla_force_host_platform_device_count={topology.cpu_devices}")))
    return env


def _signal_name(returncode: int) -> str:
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            pass
    return f"exit code {returncode}"


def _run_child(request: dict, env: dict, python: str) -> tuple[list[dict], int, str]:
    proc = subprocess.run([python, "-m", "zkd_jax.aot.worker"], input=pickle.dumps(request),
                          capture_output=True, env=env, check=False)
    events = []
    for line in proc.stdout.decode(errors="replace").splitlines():
        if line.startswith("ZKD_AOT "):
            events.append(json.loads(line[len("ZKD_AOT "):]))
    return events, proc.returncode, proc.stderr.decode(errors="replace")


def compile_programs(fields: Mapping[str, Any], topology: str, *,
                     per_chip_batch: int | None = None, all_forms: bool = False,
                     only: Sequence[str] | None = None, python: str | None = None) -> Report:
    """Compiles the programs of a run for ``topology``; see the module docstring.

    ``fields``: the run's config as plain values (``config.to_dict()``), passed unread to the
    child. ``per_chip_batch``: images per chip per step (the global batch is that times the slice's
    chips); None: the config's ``batch_size`` is the global batch, as ``zkd-train`` runs it.
    ``all_forms``: K students: every form of the K-student step, not only the config's.
    ``only``: compile only the programs of these names (``train_step``, ``eval_step``, ...).

    Raises:
      ValueError: an unknown topology (the message lists the known ones), libtpu missing
        (:class:`LibtpuMissingError`), or a config the trainer would refuse.
      DoesNotFitError: a program needs more HBM per chip than the chip has.
      RuntimeError: the child ended before it built the programs (its stderr's tail).
    """
    topo = parse_topology(topology)
    if topo.is_tpu and not libtpu_installed():
        raise LibtpuMissingError(
            f"compiling for --topology={topology} needs libtpu, which is not installed; "
            f"install the tpu extra: {TPU_EXTRA}")
    if per_chip_batch is not None and per_chip_batch < 1:
        raise ValueError(f"--per_chip_batch={per_chip_batch} must be a positive integer.")
    request = {"fields": dict(fields), "topology": topo.name,
               "per_chip_batch": per_chip_batch, "all_forms": all_forms, "skip": [],
               "only": list(only) if only else None}
    env, python = _child_env(topo), python or sys.executable
    records: dict[str, dict] = {}
    plan: dict = {}
    while True:
        events, returncode, stderr = _run_child(request, env, python)
        started = None
        for ev in events:
            kind = ev.pop("event")
            if kind == "error" and ev["kind"] == "topology":
                raise ValueError(f"{unknown_topology_message(topo.name)} (libtpu: "
                                 f"{ev['message']})")
            if kind == "error":
                raise ValueError(ev["message"])
            if kind == "plan":
                plan = ev
            elif kind == "start":
                started = ev["program"]
            elif kind == "program":
                records[ev["program"]] = {k: ev.get(k) for k in KEYS} | {
                    k: v for k, v in ev.items() if k not in KEYS}
                started = None
        if returncode == 0 and started is None:
            break
        if not plan or started is None:
            raise RuntimeError(f"the compile child for {topo.name} ended ({_signal_name(returncode)})"
                               f" before compiling; its last output: {stderr[-800:].strip()}")
        crash = (f"the compiler crashed ({_signal_name(returncode)}) compiling {started} for "
                 f"{topo.name} (libtpu {plan.get('libtpu_version')}, jax {plan.get('jax_version')})")
        records[started] = {k: plan.get(k) for k in KEYS} | {
            "program": started, "status": "crashed", "error": crash}
        request["skip"] = list(records)
        if all(p in records or (only and p not in only) for p in plan["programs"]):
            break
    ordered = [records[p] for p in plan["programs"] if p in records]
    plan["programs"] = [r["program"] for r in ordered]
    _refuse_if_too_big(ordered, topo.chip)
    return Report(records=ordered, plan=plan)


def _fitting_batch(record: dict, limit: int) -> int | None:
    """A per-chip batch whose program should fit ``limit`` bytes: the batch-dependent bytes
    scaled down linearly, to a power of two (None: the state alone does not fit)."""
    fixed, needed, batch = record.get("fixed_bytes") or 0, record["total_bytes"], \
        record["per_chip_batch"]
    room = 0.9 * limit - fixed
    if not needed or needed <= fixed or room <= 0 or not batch:
        return None
    estimate = batch * room / (needed - fixed)
    return 2 ** int(math.floor(math.log2(estimate))) if estimate >= 1 else None


def _refuse_if_too_big(records: list[dict], chip: Chip | None) -> None:
    for r in records:
        if r["status"] != "does_not_fit" or chip is None:
            continue
        limit = r.get("compiler_limit_bytes") or chip.hbm_bytes
        fit = _fitting_batch(r, limit)
        advice = (f"--per_chip_batch={fit} should fit" if fit else
                  "no batch fits: the state and teacher alone need "
                  f"{(r.get('fixed_bytes') or 0) / GIB:.2f} GiB")
        raise DoesNotFitError(
            f"{r['program']} needs {r['total_bytes'] / GIB:.2f} GiB of HBM per chip at "
            f"{r['per_chip_batch']:g} images per chip, a {chip.name} chip has "
            f"{chip.hbm_bytes / GIB:.0f} GiB ({limit / GIB:.2f} GiB usable); {advice}.")


__all__ = ["CHIPS", "DoesNotFitError", "KEYS", "LibtpuMissingError", "Report", "TPU_EXTRA",
           "compile_programs", "known_topologies", "libtpu_installed", "parse_topology"]
