"""Helpers on variable trees: flattening, parameter counts and the structure/shape check.

A variable tree is a nested mapping (``dict`` or Flax ``FrozenDict``) whose leaves have a ``.shape``
(NumPy or JAX arrays, ``jax.ShapeDtypeStruct``); a flat ``{key: array}`` mapping (a PyTorch
``state_dict``) is a tree of depth one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["check_variables", "count_params", "flatten"]

_DEFAULT_HINT = (
    "make sure the checkpoint was written for this architecture, dataset and number of classes "
    "(re-create the model with the checkpoint's metadata, or convert/train the right one)"
)


def flatten(tree: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """``{"params": {"fc": {"bias": a}}} -> {"params/fc/bias": a}``, in insertion order."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}{sep}{k}" if prefix else str(k))
        else:
            out[prefix] = node

    walk(tree, "")
    return out


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in np.shape(leaf))


def count_params(variables: Mapping[str, Any]) -> int:
    """Number of scalars in ``variables["params"]`` (the trainable parameters), or in the whole tree
    when it has no ``params`` entry."""
    tree = variables["params"] if "params" in variables else variables
    return sum(math.prod(_shape(v)) for v in flatten(tree).values())


def check_variables(
    expected: Mapping[str, Any], got: Mapping[str, Any], *, what: str, hint: str | None = None
) -> None:
    """Raise one ``ValueError`` if ``got`` has not exactly the keys and leaf shapes of ``expected``.

    ``expected`` and ``got`` are variable trees (e.g. ``models.abstract_variables(model)`` and a
    loaded checkpoint, or two flat PyTorch-key mappings). Only structure and shapes are compared,
    never values or dtypes. The error names the first problem found: a key of ``expected`` that
    ``got`` lacks or holds with another shape (in ``expected``'s order), else the first extra key of
    ``got``; it says how many mismatches there are in all, describes ``got`` with ``what`` (e.g.
    ``"teacher checkpoint gs://b/t"``) and ends with ``hint`` (what to do).
    """
    exp = {k: _shape(v) for k, v in flatten(expected).items()}
    act = {k: _shape(v) for k, v in flatten(got).items()}
    missing = [k for k in exp if k not in act]
    wrong = [k for k in exp if k in act and exp[k] != act[k]]
    extra = [k for k in act if k not in exp]
    total = len(missing) + len(wrong) + len(extra)
    if not total:
        return
    first = next(k for k in exp if k not in act or exp[k] != act[k]) if missing or wrong else None
    if first is not None and first in act:
        problem = f"key {first!r} has shape {act[first]} but the model expects {exp[first]}"
    elif first is not None:
        problem = f"key {first!r} (shape {exp[first]}) is missing"
    else:
        problem = f"key {extra[0]!r} (shape {act[extra[0]]}) is not part of the model"
    counts = f"{len(missing)} missing, {len(extra)} unexpected, {len(wrong)} with a wrong shape"
    raise ValueError(
        f"{what} does not match the model: {problem} ({counts}); {hint or _DEFAULT_HINT}."
    )
