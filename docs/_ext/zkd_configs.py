"""Sphinx extension: the configs page's tables, generated from ``zkd_jax.configs`` at build time.

At ``builder-inited`` it writes ``docs/_generated/configs_tables.md`` (git-ignored; the configs
page includes it), built from the same ``get_config`` calls that ``zkd-train --config=...`` makes,
so the page shows exactly what a run gets. ``tables()`` is the Markdown, for tests.
"""

from __future__ import annotations

import os
import tempfile

from zkd_jax.configs import cifar100, cifar100_vit, common, demo, fields, imagenet

_SETTINGS = ("temperature", "ce_weight", "kd_weight", "alpha", "beta", "extra_weight")


def _method_cell(method) -> str:
    parts = [f"{k} {method[k]:g}" for k in _SETTINGS if k in method]
    if "ctkd" in method:
        parts[0] = "tau learned" if method.ctkd.learn else parts[0]
    if method.get("standardize"):
        parts.append("LS")
    return ", ".join(parts)


def _source(config) -> str:
    defaulted = set(config.paper.defaulted)
    method = [k for k in config.paper.settings if k.startswith("method.")]
    if defaulted:
        return "method defaults (pair not in the paper's table)"
    if method:
        return "paper"
    return "paper (solver); method defaults"


def _row(config, arg: str) -> str:
    top1 = "" if config.paper.top1 is None else f"{config.paper.top1:.2f}"
    return (f"| `{arg}` | {_method_cell(config.method)} | {config.optimizer.lr:g} | "
            f"{config.epochs} | {config.batch_size} | {top1} | {_source(config)} |")


_HEADER = ("| config argument | method settings | lr | epochs | batch | paper top-1 | source |\n"
           "| --- | --- | ---: | ---: | ---: | ---: | --- |")


def _pairs_table(pairs, module) -> str:
    """Every (teacher, student) pair of ``pairs`` with every method, from ``module.get_config``."""
    rows = [_HEADER]
    for teacher, student in pairs:
        for variant in common.METHODS:
            arg = f"{variant},{teacher},{student}"
            rows.append(_row(module.get_config(arg), arg))
    return "\n".join(rows)


def cifar100_table() -> str:
    """Every CIFAR-100 pair of the paper's table with every method."""
    return _pairs_table(common.CIFAR100_PAIRS, cifar100)


def imagenet_table() -> str:
    return _pairs_table(common.IMAGENET_PAIRS, imagenet)


def vit_table() -> str:
    rows = [_HEADER]
    for student in cifar100_vit.STUDENTS:
        for arg in (f"kd_ls,resnet56,{student}", f"kd,resnet56,{student}", f"base,{student}"):
            rows.append(_row(cifar100_vit.get_config(arg), arg))
    return "\n".join(rows)


def demo_table() -> str:
    config = demo.get_config()
    rows = [_HEADER]
    for name, method in config.suite.items():
        rows.append(f"| `{name}` (suite entry) | {_method_cell(method)} | {config.optimizer.lr:g} "
                    f"| {config.epochs} | {config.batch_size} |  | the demo's own (small) recipe |")
    return "\n".join(rows)


def defaults_table() -> str:
    rows = ["| method | settings |", "| --- | --- |"]
    for variant, settings in common.METHOD_DEFAULTS.items():
        cell = ", ".join(f"{k} {v}" for k, v in settings.items() if k != "name")
        rows.append(f"| `{variant}` | {cell} |")
    return "\n".join(rows)


def fields_table() -> str:
    rows = ["| field | help |", "| --- | --- |"]
    rows += [f"| `{name}` | {text} |" for name, text in fields.FIELDS.items()]
    return "\n".join(rows)


def tables() -> str:
    """The generated part of the configs page, as MyST Markdown."""
    return "\n\n".join([
        "## Method defaults\n\nA pair outside the paper's table gets these "
        "(`zkd_jax/configs/common.py`, `METHOD_DEFAULTS`).\n\n" + defaults_table(),
        "## CIFAR-100: every pair and method\n\n`--config=configs/cifar100.py:ARGUMENT` "
        "(`zkd_jax/configs/cifar100.py`). 'paper': the pair's settings of the paper "
        "(`CIFAR100_PAIRS`); paper top-1: the paper's CIFAR-100 result (mean of 4 runs, best "
        "epoch).\n\n" + cifar100_table(),
        "## ImageNet\n\n`--config=configs/imagenet.py:ARGUMENT` "
        "(`zkd_jax/configs/imagenet.py`).\n\n" + imagenet_table(),
        "## ViT students on CIFAR-100 (224 px)\n\n`--config=configs/cifar100_vit.py:ARGUMENT` "
        "(`zkd_jax/configs/cifar100_vit.py`); the teacher is the 32-px resnet56.\n\n" + vit_table(),
        "## The offline demo\n\n`--config=configs/demo.py` (the default of `zkd-train`; "
        "`zkd_jax/configs/demo.py`).\n\n" + demo_table(),
        "## Every field\n\nWhat `zkd-train --config=... --print_config` prints beside each value "
        "(`zkd_jax/configs/fields.py`).\n\n" + fields_table(),
    ]) + "\n"


def _write(app) -> None:
    out_dir = os.path.join(app.srcdir, "_generated")
    os.makedirs(out_dir, exist_ok=True)
    text = tables()
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(out_dir, "configs_tables.md"))


def setup(app):
    app.connect("builder-inited", _write)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
