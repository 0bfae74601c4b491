"""Sweeps: ``expand("temperature=2,3 kd_weight=3,6 seed=0,1")`` -> the K student entries.

A sweep spec is whitespace-separated ``KEY=V1,V2,...`` items; the students are every combination
(the cartesian product, the first key varying slowest) as ``config.students`` entries
``{"seed": ..., KEY: value, ...}``. ``KEY`` is ``seed`` or a setting of ``config.method``
(``temperature``, ``kd_weight``, ``ce_weight``, DKD's ``alpha`` / ``beta``, ...); without a
``seed`` item every student gets ``default_seed``. Values are ints or floats (``true`` / ``false``
are booleans). ``zkd-train --config.sweep='temperature=2,3 kd_weight=3,6,9,12,15 seed=0,1'``
trains the 20 students of that grid in one program (``zkd_jax.trainer``, ``zkd_jax.step.multi``).
"""

from __future__ import annotations

import itertools
from typing import Any


def _value(text: str, item: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(low)
    except ValueError:
        pass
    try:
        return float(low)
    except ValueError:
        raise ValueError(f"sweep item {item!r}: {text!r} is not a number; write e.g. "
                         "'temperature=2,3'.") from None


def parse(spec: str) -> list[tuple[str, list[Any]]]:
    """``"a=1,2 b=3"`` -> ``[("a", [1, 2]), ("b", [3])]``.

    Raises:
      ValueError: an item without ``=``, without values, a repeated key, or ``name``.
    """
    items: list[tuple[str, list[Any]]] = []
    for item in spec.replace(";", " ").split():
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip(","):
            raise ValueError(f"sweep item {item!r} must read KEY=V1,V2,... (e.g. "
                             "'temperature=2,3 kd_weight=3,6 seed=0,1').")
        if key == "name":
            raise ValueError("a sweep cannot change the method name; all students share "
                             "config.method.name.")
        if any(k == key for k, _ in items):
            raise ValueError(f"sweep key {key!r} appears twice; list its values once: "
                             f"{key}=V1,V2,...")
        items.append((key, [_value(v, item) for v in values.split(",") if v.strip()]))
    return items


def expand(spec: str | None, default_seed: int = 0) -> tuple[dict[str, Any], ...]:
    """The ``config.students`` entries of a sweep spec (empty spec: no students)."""
    items = parse(spec or "")
    if not items:
        return ()
    keys = [k for k, _ in items]
    out = []
    for combo in itertools.product(*(values for _, values in items)):
        entry = dict(zip(keys, combo))
        entry["seed"] = int(entry.get("seed", default_seed))
        out.append(entry)
    return tuple(out)
