"""The house's import rule (docs/code_layout.md): imports point down the layers, never in a circle.

Every module of the package is parsed (AST); every import, at the top or inside a function, of a
``zkd_jax`` module is an edge. A module may import its own layer or a lower one; an import from a
higher layer fails, and so does any cycle of modules.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "zkd_jax"

#: Layer of each part of the package, lowest first (docs/code_layout.md).
LAYERS: dict[str, int] = {
    # the math and the models: JAX only
    "zkd_jax": 0, "zkd_jax.views": 0, "zkd_jax.tempered_kl": 0, "zkd_jax.losses": 0,
    "zkd_jax.chunked_kd": 0, "zkd_jax.topk_kd": 0, "zkd_jax.kd_rows": 0, "zkd_jax.fused_kd": 0, "zkd_jax.loss_checks": 0,
    "zkd_jax.methods": 0, "zkd_jax.optim": 0, "zkd_jax.models": 0,
    "zkd_jax.integrations": 1, "zkd_jax.parallel": 1, "zkd_jax.configs": 1,
    "zkd_jax.data": 2,
    "zkd_jax.step": 3,
    "zkd_jax.io": 4,
    "zkd_jax.trainer": 5,
    "zkd_jax.aot": 6,  # compile-only programs for a TPU topology (zkd-compile): above the trainer
    "zkd_jax.report": 6,
    "zkd_jax.cli": 7,
    # thin public modules kept where users import them
    "zkd_jax.train": 8, "zkd_jax.convert": 8,
}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """The layer of the longest prefix of ``module`` in :data:`LAYERS`."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise AssertionError(f"{module} has no layer: add it to LAYERS and docs/code_layout.md")


def resolve(name: str) -> str:
    """The package module an imported name refers to (``zkd_jax.io.checkpoint`` for
    ``from zkd_jax.io import checkpoint``, the package itself for a name defined in it)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports_of(module: str) -> set[str]:
    """The package modules ``module`` imports, anywhere in its body."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from P import m``: the submodule P.m if there is one, else a name defined in P
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                     for a in node.names]
        else:
            continue
        found |= {resolve(n) for n in names if n == "zkd_jax" or n.startswith("zkd_jax.")}
    found.discard(module)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    upward = sorted(m for m in GRAPH[module] if layer_of(m) > layer_of(module))
    assert not upward, f"{module} (layer {layer_of(module)}) imports higher layers: {upward}"


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_the_rule_catches_an_upward_import_and_a_cycle(tmp_path, monkeypatch):
    """The checks above would fail on a bad house (a step importing the trainer, a 2-cycle)."""
    monkeypatch.setitem(GRAPH, "zkd_jax.step.train_step", GRAPH["zkd_jax.step.train_step"] | {
        "zkd_jax.trainer.setup"})
    with pytest.raises(AssertionError, match="imports higher layers"):
        test_imports_point_down("zkd_jax.step.train_step")
    monkeypatch.setitem(GRAPH, "zkd_jax.trainer.setup", GRAPH["zkd_jax.trainer.setup"] | {
        "zkd_jax.step.train_step"})
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_import_cycles()


#: Module-level caches of loaded data (NumPy arrays of a small dataset), not of compiled code.
DATA_CACHES = ("zkd_jax.data.digits", "zkd_jax.data.synthetic")


def test_no_module_level_caches_of_compiled_code():
    """Compiled programs belong to the run that builds them (acceptance 4 of "One house")."""
    for module, path in MODULES.items():
        if module in DATA_CACHES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for d in node.decorator_list:
                    text = ast.unparse(d)
                    assert "lru_cache" not in text and text not in ("cache", "functools.cache"), (
                        f"{module}.{node.name} is cached at module level ({text})")


def test_code_layout_page_names_every_part():
    """docs/code_layout.md, the human side of LAYERS, names every subpackage of the package."""
    page = (PACKAGE.parent / "docs" / "code_layout.md").read_text()
    for part in sorted({m.split(".")[1] for m in LAYERS if m.count(".") == 1}):
        is_package = (PACKAGE / part).is_dir()
        assert (f"{part}/" if is_package else f"{part}.py") in page, part


#: The longest a function of ``zkd_jax/trainer/`` may be, its ``def`` line to its last line.
TRAINER_FUNCTION_LINES = 100


def test_trainer_functions_are_short_and_keep_no_state_in_closures():
    """Every function of ``zkd_jax/trainer/`` fits in 100 lines and none rebinds a variable of an
    enclosing function (``nonlocal``): the loop reads top to bottom, its state lives in objects."""
    long, rebinding = [], []
    for path in sorted((PACKAGE / "trainer").rglob("*.py")):
        name = path.relative_to(PACKAGE)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > TRAINER_FUNCTION_LINES:
                    long.append(f"{name}:{node.lineno} {node.name} ({lines} lines)")
            elif isinstance(node, ast.Nonlocal):
                rebinding.append(f"{name}:{node.lineno} nonlocal {', '.join(node.names)}")
    assert not long, f"functions over {TRAINER_FUNCTION_LINES} lines: {long}"
    assert not rebinding, f"state kept in closures: {rebinding}"
