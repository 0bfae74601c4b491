"""The text of ``docs/tpu_step_bytes.md``, rendered from ``step_bytes.py``'s results (JSON).

``notes`` in the results (a list of Markdown paragraphs) is the reading of the numbers, written by
whoever ran the command; the tables are generated.
"""

from __future__ import annotations

PROGRAMS = [
    ("step", "the project's step (teacher BatchNorm folded, kernels in bf16)"),
    ("step_unfolded", "the project's step, teacher as loaded"),
    ("yardstick", "plain Flax/optax step (`benchmarks/yardstick.py`)"),
    ("teacher_folded", "teacher forward alone, folded"),
    ("teacher_unfolded", "teacher forward alone, as loaded"),
    ("optimizer", "optax update alone (SGD, momentum, weight decay)"),
    ("finite_checks", "grad norm and finiteness metrics alone"),
    ("input_host", "host feed's device part (uint8 -> normalized float32)"),
    ("input_device", "one on-device batch from the `[N, 3072]` split"),
    ("scanned_device", "2 scanned steps fed from the split on device (loop body counted once)"),
]


def _gb(x) -> str:
    return "" if x is None else f"{x / 1e9:.3f}"


def _mb(x) -> str:
    return "" if x is None else f"{x / 1e6:.1f}"


def _programs(topology: str, stats: dict, reference: dict) -> list[str]:
    yard = (stats.get("yardstick") or reference.get("yardstick") or {}).get("bytes")
    lines = [f"### {topology}", "",
             "| program | GB per chip per step | x yardstick | GFLOP per chip | temporaries MB "
             "| compile s |", "|---|---:|---:|---:|---:|---:|"]
    for name, what in PROGRAMS:
        s = stats.get(name) or reference.get(name)
        if not s:
            continue
        ratio = f"{s['bytes'] / yard:.3f}" if yard and not name.startswith("input") else ""
        mark = "" if name in stats else " (an earlier compile the same day)"
        lines.append(f"| `{name}`: {what}{mark} | {_gb(s['bytes'])} | {ratio} | "
                     f"{s['flops'] / 1e9:.1f} | {_mb(s['temp_bytes'])} | "
                     f"{s.get('compile_seconds', '')} |")
    return lines + [""]


def _attribution(stats: dict, reference: dict) -> list[str]:
    columns = [(name, (stats.get(name) or reference.get(name) or {}).get("attribution"))
               for name in ("step", "step_unfolded", "yardstick")]
    columns = [(n, a) for n, a in columns if a]
    if not columns:
        return []
    keys = sorted({k for _, a in columns for k in a}, key=lambda k: -max(a.get(k, 0)
                                                                         for _, a in columns))
    lines = ["| part (by op_name) | " + " | ".join(f"`{n}` GB" for n, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(_gb(a.get(k, 0)) for _, a in columns) + " |")
    lines.append("| **sum** | " + " | ".join(_gb(sum(a.values())) for _, a in columns) + " |")
    return lines + [""]


def render(result: dict) -> str:
    """The page."""
    out = [
        "# Where the training step's HBM bytes go on TPU", "",
        f"Measured {result['date']} with jax {result['jax']} and libtpu {result['libtpu']}, on "
        "this project's 2-core AMD EPYC CPU machine: the programs are compiled for TPU topologies "
        "that are not there and only XLA's analyses are read; nothing runs on a TPU.", "",
        f"Config: `configs/cifar100.py:{result['config']}` (KD+LS, resnet32x4 -> resnet8x4), "
        f"bf16 compute, {result['per_chip']} images per chip. Command:", "",
        "```bash", f"ALLOW_MULTIPLE_LIBTPU_LOAD=1 {result['command']}", "```", "",
        "Bytes are XLA's `cost_analysis()['bytes accessed']` of each compiled program, per chip "
        "and per step (the quantity a memory-bound step's time follows); each part is also "
        "compiled alone with the step's shardings. The attribution table splits the step's own "
        "program by the `op_name` of its named scopes (`teacher`, `student` forward and "
        "backward, `objective`, `optimizer`, `finite_checks`): it sums each top-level HLO "
        "instruction's operands and outputs, so its total is close to, not equal to, XLA's.", "",
        "## Programs", "",
    ]
    for topology, stats in result["topologies"].items():
        out += _programs(topology, stats, result.get("reference", {}).get(topology, {}))
    out += ["## The step's bytes by part", ""]
    for topology, stats in result["topologies"].items():
        ref = result.get("reference", {}).get(topology, {})
        lines = _attribution(stats, ref)
        if lines:
            out += [f"### {topology}", ""] + lines
    if result.get("notes"):
        out += ["## Reading", ""]
        for paragraph in result["notes"]:
            out += [paragraph, ""]
    return "\n".join(out).rstrip() + "\n"
