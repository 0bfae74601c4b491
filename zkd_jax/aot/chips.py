"""The TPU chips ``zkd-compile`` knows: peak bf16 FLOP/s, HBM size and HBM bandwidth per chip.

Sources (Google Cloud TPU documentation, "System architecture" tables of each generation):

* v4:  https://cloud.google.com/tpu/docs/v4   (275 TFLOPs bf16, 32 GiB HBM2, 1200 GBps)
* v5e: https://cloud.google.com/tpu/docs/v5e  (197 TFLOPs bf16, 16 GB HBM2, 819 GBps)
* v5p: https://cloud.google.com/tpu/docs/v5p  (459 TFLOPs bf16, 95 GB HBM2e, 2765 GBps)
* v6e: https://cloud.google.com/tpu/docs/v6e  (918 TFLOPs bf16, 32 GB HBM, 1640 GBps)

HBM sizes are taken as binary (16 GB = 16 GiB of HBM), bandwidths as decimal (819 GBps = 819e9
bytes/s). The compiler's own limit is a little lower than the size (it reserves some HBM): a
program it refuses is reported with the compiler's numbers.

A topology is ``<generation>:<chips per dimension>`` as ``jax.experimental.topologies`` takes it
(``v5e:2x2``, ``v5p:2x2x1``, ``v5p:2x2x2`` spans two hosts); ``cpu`` or ``cpu:N`` names this
machine's CPU devices (``N`` virtual ones), for tests without libtpu.
"""

from __future__ import annotations

import dataclasses
import re

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation's per-chip figures.

    Attributes:
      name: the generation as a topology names it (``v5e``).
      device_kind: what ``jax.Device.device_kind`` says for it.
      peak_flops: peak bf16 FLOP/s per chip.
      hbm_bytes: HBM per chip.
      hbm_bandwidth: HBM bytes/s per chip.
      source: the documentation page of the figures.
      examples: topologies known to compile with libtpu 0.0.42.1.
    """

    name: str
    device_kind: str
    peak_flops: float
    hbm_bytes: int
    hbm_bandwidth: float
    source: str
    examples: tuple[str, ...]


CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("v4", "TPU v4", 275e12, 32 * GIB, 1200e9, "https://cloud.google.com/tpu/docs/v4",
         ("v4:2x2x1", "v4:2x2x2")),
    Chip("v5e", "TPU v5 lite", 197e12, 16 * GIB, 819e9, "https://cloud.google.com/tpu/docs/v5e",
         ("v5e:2x2", "v5e:2x4", "v5e:4x4")),
    Chip("v5p", "TPU v5", 459e12, 95 * GIB, 2765e9, "https://cloud.google.com/tpu/docs/v5p",
         ("v5p:2x2x1", "v5p:2x2x2", "v5p:2x2x4")),
    Chip("v6e", "TPU v6 lite", 918e12, 32 * GIB, 1640e9, "https://cloud.google.com/tpu/docs/v6e",
         ("v6e:2x2", "v6e:2x4", "v6e:4x4")),
)}

_TPU = re.compile(r"^(v\d+[a-z]*):(\d+(?:x\d+){1,2})$")
_CPU = re.compile(r"^cpu(?::(\d+))?$")


def known_topologies() -> list[str]:
    """Example topologies, for the message that refuses an unknown one."""
    return [t for c in CHIPS.values() for t in c.examples] + ["cpu", "cpu:N"]


@dataclasses.dataclass(frozen=True)
class Topology:
    """A parsed ``--topology``: a TPU slice (``chip`` set) or CPU devices (``chip`` None)."""

    name: str
    chip: Chip | None
    cpu_devices: int | None = None  # cpu:N; None: the CPU devices the process has

    @property
    def is_tpu(self) -> bool:
        return self.chip is not None


def parse_topology(name: str) -> Topology:
    """``"v5e:2x2"`` -> a :class:`Topology`.

    Raises:
      ValueError: not a known generation or not of the form ``<generation>:AxB[xC]``; the
        message lists the known topologies.
    """
    name = (name or "").strip()
    cpu = _CPU.match(name)
    if cpu:
        return Topology(name, None, int(cpu.group(1)) if cpu.group(1) else None)
    tpu = _TPU.match(name)
    if tpu and tpu.group(1) in CHIPS:
        return Topology(name, CHIPS[tpu.group(1)])
    raise ValueError(unknown_topology_message(name))


def unknown_topology_message(name: str) -> str:
    return (f"--topology={name!r} is not a known topology; use one of "
            f"{', '.join(known_topologies())} (a TPU generation of {', '.join(CHIPS)} with its "
            "chips per dimension).")


__all__ = ["CHIPS", "Chip", "GIB", "Topology", "known_topologies", "parse_topology"]
