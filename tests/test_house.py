"""The house's rules (docs/code_layout.md): imports point down the layers, never in a circle.

Every module of the package is parsed (AST); every import, at the top or inside a function, of a
``zkd_jax`` module is an edge. A module may import its own layer or a lower one; an import from a
higher layer fails, and so does any cycle of modules. Besides: the command line is a leaf (no module
outside ``zkd_jax/cli/`` imports it); only ``configs/``, ``trainer/`` and ``cli/`` take a config
(everything below receives values); one function is named ``train_and_evaluate`` (the door); and
no two modules share a file name.
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
    "zkd_jax.report": 5,  # reads what runs wrote; a suite's run ends with its report
    "zkd_jax.aot": 6,  # compile-only programs for a TPU topology (zkd-compile): above the trainer
    "zkd_jax.cli": 7,
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


# The middle of the house: data, step and io stand side by side ---------------------------------

#: Parts of one storey that stand side by side: each builds on the layers below it and none imports
#: another. The trainer joins them: it hands the scanned step the feed's batch builder
#: (``Feed.device.build``) and the checkpointer the step's train state.
SIDE_BY_SIDE = ("zkd_jax.data", "zkd_jax.step", "zkd_jax.io")

#: What the step may import of the models: the switches of the shared layers (folded BatchNorm,
#: the convolution's implementation), no architecture's own file.
STEP_MAY_IMPORT_OF_MODELS = frozenset({"zkd_jax.models.layers"})


def side_of(module: str) -> str | None:
    return next((p for p in SIDE_BY_SIDE if module == p or module.startswith(p + ".")), None)


def test_data_step_and_io_do_not_import_each_other():
    sideways = sorted(f"{m} -> {n}" for m in GRAPH for n in GRAPH[m]
                      if side_of(m) and side_of(n) and side_of(m) != side_of(n))
    assert not sideways, f"sideways imports (let the trainer pass the value in): {sideways}"


def test_the_step_imports_no_model_file():
    for module in MODULES:
        if side_of(module) == "zkd_jax.step":
            seen = {n for n in GRAPH[module] if n == "zkd_jax.models" or n.startswith("zkd_jax.models.")}
            assert seen <= STEP_MAY_IMPORT_OF_MODELS, (
                f"{module} imports {sorted(seen - STEP_MAY_IMPORT_OF_MODELS)}: the step knows the "
                "models by their Flax interface only")


def test_the_sideways_rules_catch_the_old_arrows(monkeypatch):
    """The three arrows the house had (io -> step, step -> data, step -> a model's file) fail."""
    for module, target, check in (
            ("zkd_jax.io.checkpoint", "zkd_jax.step.state", test_data_step_and_io_do_not_import_each_other),
            ("zkd_jax.step.scan", "zkd_jax.data.device", test_data_step_and_io_do_not_import_each_other),
            ("zkd_jax.step.train_step", "zkd_jax.models.vit_layers", test_the_step_imports_no_model_file)):
        with monkeypatch.context() as m:
            m.setitem(GRAPH, module, GRAPH[module] | {target})
            with pytest.raises(AssertionError):
                check()


# The input path's one door ---------------------------------------------------------------------

#: The parts of ``zkd_jax.data`` behind its face: the trainer reaches them through
#: ``zkd_jax.data`` (``make_feed``, ``info``, ...), never directly.
DATA_INSIDES = ("zkd_jax.data.feeds", "zkd_jax.data.tfdata", "zkd_jax.data.datasets",
                "zkd_jax.data.cifar", "zkd_jax.data.imagenet_tfdata", "zkd_jax.data.tfds_source",
                "zkd_jax.data.digits", "zkd_jax.data.synthetic")


def test_data_package_is_a_face():
    """``zkd_jax/data/__init__.py`` only re-exports: no function, class or logic of its own."""
    tree = ast.parse(MODULES["zkd_jax.data"].read_text())
    for node in tree.body:
        allowed = (ast.Import, ast.ImportFrom, ast.Expr, ast.Assign)
        assert isinstance(node, allowed), f"zkd_jax/data/__init__.py line {node.lineno}: {ast.unparse(node)[:60]}"
        if isinstance(node, ast.Assign):
            assert [ast.unparse(t) for t in node.targets] == ["__all__"], ast.unparse(node)[:60]
    import zkd_jax.data  # pylint: disable=import-outside-toplevel

    assert callable(zkd_jax.data.make_feed)


def test_trainer_takes_its_feed_through_the_one_door():
    for module in MODULES:
        if module.startswith("zkd_jax.trainer"):
            inside = sorted(GRAPH[module] & set(DATA_INSIDES))
            assert not inside, f"{module} imports {inside}: use zkd_jax.data.make_feed / info"


#: The parts of the package that may hold or take a whole config (an ``ml_collections.ConfigDict``).
CONFIG_PARTS = ("zkd_jax.configs", "zkd_jax.trainer", "zkd_jax.cli")


def _in(module: str, parts) -> bool:
    return any(module == p or module.startswith(p + ".") for p in parts)


def _in_any(modules, parts) -> list[str]:
    return sorted(m for m in modules if _in(m, parts))


def config_takers(source: str) -> list[str]:
    """Functions of ``source`` with a parameter named ``config`` / ``cfg`` or annotated as a
    ``ConfigDict`` / ``FrozenConfigDict``, and imports of ``ml_collections``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = node.args
            for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
                if arg is None:
                    continue
                note = ast.unparse(arg.annotation) if arg.annotation is not None else ""
                if arg.arg in ("config", "cfg") or "ConfigDict" in note:
                    found.append(f"{getattr(node, 'name', 'lambda')}({arg.arg}"
                                 f"{': ' + note if note else ''})")
        elif isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.startswith("ml_collections")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ml_collections"):
            found.append(f"from {node.module} import ...")
    return found


def test_the_command_line_is_a_leaf():
    """No module outside ``zkd_jax/cli/`` imports ``zkd_jax.cli`` (at the top or in a function)."""
    for module, imported in GRAPH.items():
        if not _in(module, ("zkd_jax.cli",)):
            assert not _in_any(imported, ("zkd_jax.cli",)), f"{module} imports the command line"


def test_only_configs_trainer_and_cli_take_a_config():
    """Below the trainer, functions receive the values they need, never the config."""
    for module, path in MODULES.items():
        if not _in(module, CONFIG_PARTS):
            takers = config_takers(path.read_text())
            assert not takers, f"{module} takes a config: {takers}"


def test_the_config_rules_catch_a_bad_house(monkeypatch):
    assert config_takers("def f(x, *, config=None): pass") == ["f(config)"]
    assert config_takers("def g(c: 'ml_collections.ConfigDict'): pass") == [
        "g(c: 'ml_collections.ConfigDict')"]
    assert config_takers("import ml_collections\nfrom ml_collections import config_dict") == [
        "import ml_collections", "from ml_collections import ..."]
    assert config_takers("def h(fields: dict, *, cfg): pass") == ["h(cfg)"]
    monkeypatch.setitem(GRAPH, "zkd_jax.io.lock", GRAPH["zkd_jax.io.lock"] | {"zkd_jax.cli.train"})
    with pytest.raises(AssertionError, match="zkd_jax.io.lock imports the command line"):
        test_the_command_line_is_a_leaf()


def test_one_train_and_evaluate():
    """The door is one function: ``zkd_jax.trainer.runs.train_and_evaluate``."""
    defined = [module for module, path in MODULES.items()
               for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
               and node.name == "train_and_evaluate"]
    assert defined == ["zkd_jax.trainer.runs"]


def test_module_file_names_are_unique():
    """No two modules share a file name (but ``__init__.py``): a name says which file it is."""
    names: dict[str, list[str]] = {}
    for module, path in MODULES.items():
        if path.name != "__init__.py":
            names.setdefault(path.name, []).append(module)
    shared = {name: modules for name, modules in names.items() if len(modules) > 1}
    assert not shared, shared
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
