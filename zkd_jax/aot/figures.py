"""What a compiled program costs per chip: HBM (XLA's memory analysis), FLOPs and bytes (its cost
analysis), and the roofline bound they imply on the chip of ``zkd_jax.aot.chips``.

Roofline: one step takes at least ``max(flops / peak_flops, bytes / hbm_bandwidth)`` seconds per
chip (XLA's counts for the chip's program against the chip's peak bf16 FLOP/s and HBM bandwidth),
so ``images_per_sec_per_chip <= per_chip_images / that``. It is an upper bound: it ignores
latency, collectives and the host. ``bound`` says which term is larger (``"memory"`` or
``"compute"``). XLA's cost analysis counts a while loop's body once: a scan of ``n`` steps that
is a loop is one step's cost (plus its batch building), one that is unrolled ``n`` steps'.
"""

from __future__ import annotations

import re
from typing import Any

from zkd_jax.aot.chips import Chip

#: The keys of one program's record (``zkd-compile --json`` prints one object per program).
KEYS = (
    "program", "runs", "status", "error", "topology", "chip", "device_kind", "chips", "devices",
    "processes", "students", "mixed_precision", "per_chip_batch", "global_batch",
    "steps_per_call", "argument_bytes", "output_bytes", "alias_bytes", "temp_bytes",
    "code_bytes", "total_bytes", "hbm_bytes", "hbm_fraction", "flops_per_step",
    "bytes_per_step", "bound", "images_per_sec_per_chip", "images_per_sec_slice",
    "epoch_seconds", "compile_seconds", "jax_version", "libtpu_version",
)


def memory_figures(compiled, devices_per_chip: int) -> dict[str, int]:
    """HBM per chip of a compiled program: arguments, outputs, the outputs aliased to donated
    arguments, temporaries, code, and ``total = arguments + outputs - aliased + temporaries +
    code`` (every figure of one device times the chip's devices: a v4 chip is two)."""
    m = compiled.memory_analysis()
    out = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "code_bytes": int(m.generated_code_size_in_bytes),
    }
    out = {k: v * devices_per_chip for k, v in out.items()}
    out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                          + out["temp_bytes"] + out["code_bytes"])
    return out


def cost_figures(compiled, devices_per_chip: int, counted_steps: int) -> dict[str, float]:
    """FLOPs and HBM bytes per chip per step (``counted_steps``: the steps the cost analysis
    counted in one call; eval: 1 call)."""
    cost: Any = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = cost or {}
    scale = devices_per_chip / max(counted_steps, 1)
    return {"flops_per_step": float(cost.get("flops", 0.0)) * scale,
            "bytes_per_step": float(cost.get("bytes accessed", 0.0)) * scale}


def roofline(chip: Chip | None, *, flops: float, bytes_: float, per_chip_images: float,
             chips: int, steps_per_epoch: int) -> dict[str, Any]:
    """The bound of :func:`cost_figures`' step on ``chip`` (None: no chip figures, CPU)."""
    if chip is None or (flops <= 0 and bytes_ <= 0):
        return {"bound": None, "images_per_sec_per_chip": None, "images_per_sec_slice": None,
                "epoch_seconds": None}
    compute, memory = flops / chip.peak_flops, bytes_ / chip.hbm_bandwidth
    seconds = max(compute, memory)
    per_chip = per_chip_images / seconds
    return {"bound": "memory" if memory >= compute else "compute",
            "images_per_sec_per_chip": per_chip, "images_per_sec_slice": per_chip * chips,
            "epoch_seconds": seconds * steps_per_epoch}


_OOM = (  # libtpu's two wordings: "Used X of Y hbm", "temporaries (X) exceeds available HBM (Y)"
    re.compile(r"Used\s+([\d.]+)([KMGT]?)i?B?\s+of\s+([\d.]+)([KMGT]?)i?B?\s+hbm",
               re.IGNORECASE),
    re.compile(r"temporaries\s+\(([\d.]+)([KMGT]?)i?B?\)\s+exceeds\s+available\s+HBM\s+"
               r"\(([\d.]+)([KMGT]?)i?B?\)", re.IGNORECASE),
)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def out_of_memory(message: str) -> tuple[int, int] | None:
    """``(needed, limit)`` bytes of the TPU compiler's out-of-memory refusal ("Ran out of memory
    in memory space hbm. Used X of Y hbm", or "... the total memory required for HLO temporaries
    (X) exceeds available HBM (Y)": then X counts the temporaries only); ``(0, 0)`` for one
    without numbers, None for another error."""
    if "RESOURCE_EXHAUSTED" not in message and "out of memory" not in message.lower():
        return None
    found = _OOM[0].search(message) or _OOM[1].search(message)
    if not found:
        return (0, 0)
    used, used_unit, limit, limit_unit = found.groups()
    return (int(float(used) * _UNITS[used_unit.upper()]),
            int(float(limit) * _UNITS[limit_unit.upper()]))


__all__ = ["KEYS", "cost_figures", "memory_figures", "out_of_memory", "roofline"]
