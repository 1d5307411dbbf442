"""The import contract: layers import downwards only, and no module imports itself round a cycle.

    errors, then cli                             (base: import nothing else of the package)
    models    data                               (independent of each other)
    core                                         (model parts, sharding, checkpoints, backbones, config, FLOPs)
    training  inference  convert                 (independent of each other)
    pod       evaluation                         (independent of each other)
    the root modules: CLIs, runtime, config_defaults

Every import counts, also those inside functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = "flamingo_jax"
ROOT = pathlib.Path(__file__).resolve().parent.parent / PACKAGE
LAYERS = {
    "errors": 0,
    "cli": 1,
    "models": 2, "data": 2,
    "core": 3,
    "training": 4, "inference": 4, "convert": 4,
    "pod": 5, "evaluation": 5,
}
TOP = max(LAYERS.values()) + 1  # modules directly under the package that are not listed: CLIs and their helpers


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: pathlib.Path) -> dict[str, set[str]]:
    """{module: modules of the package it imports}, from every import statement in its source."""
    package = root.name
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import mod` imports pkg.mod when that is a module, else pkg itself.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                if target == package or target.startswith(package + "."):
                    while target not in modules and "." in target:
                        target = target.rsplit(".", 1)[0]
                    if target != name:
                        imported.add(target)
        graph[name] = imported
    return graph


def layer_of(module: str) -> tuple[str, int]:
    """(the top-level part of the package a module belongs to, its layer)."""
    parts = module.split(".")
    part = parts[1] if len(parts) > 1 else ""
    return part, LAYERS.get(part, TOP)


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports that go up a layer, or sideways between different parts of one layer."""
    found = []
    for module, imported in sorted(graph.items()):
        part, layer = layer_of(module)
        for target in sorted(imported):
            target_part, target_layer = layer_of(target)
            if target_part == part or (layer == TOP and target_layer == TOP) or target == module.split(".")[0]:
                continue
            if target_layer >= layer:
                found.append(f"{module} (layer {layer}) imports {target} (layer {target_layer})")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), as sorted lists."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_the_package_keeps_its_layers_and_has_no_cycles():
    graph = import_graph(ROOT)
    assert len(graph) > 50  # the walk found the package
    assert violations(graph) == []
    assert cycles(graph) == []


def test_every_subpackage_is_assigned_a_layer():
    subpackages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert subpackages <= set(LAYERS), subpackages - set(LAYERS)


def _write(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for relative, source in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return root


@pytest.fixture
def toy_package(tmp_path):
    """A package laid out like ours, every import legal."""
    return _write(tmp_path / PACKAGE, {
        "__init__.py": "",
        "errors.py": "",
        "models/__init__.py": "",
        "models/layers.py": "from flamingo_jax import errors\n",
        "models/decoder.py": "from flamingo_jax.models import layers\n",
        "data/__init__.py": "",
        "data/pipeline.py": "import numpy\n",
        "core/__init__.py": "",
        "core/parts.py": "from flamingo_jax.models.decoder import X\nfrom flamingo_jax.data import pipeline\n",
        "training/__init__.py": "",
        "training/step.py": "from ..core import parts\n",
        "train.py": "def main():\n    from flamingo_jax.training import step\n",
    })


def test_the_contract_accepts_a_clean_package(toy_package):
    graph = import_graph(toy_package)
    assert graph["flamingo_jax.training.step"] == {"flamingo_jax.core.parts"}  # a relative import resolved
    assert violations(graph) == [] and cycles(graph) == []


def test_the_contract_rejects_an_upward_import_even_inside_a_function(toy_package):
    _write(toy_package, {"models/bad.py": "def f():\n    from flamingo_jax.training.step import g\n"})
    assert violations(import_graph(toy_package)) == [
        "flamingo_jax.models.bad (layer 2) imports flamingo_jax.training.step (layer 4)"]


def test_the_contract_rejects_a_sideways_import(toy_package):
    _write(toy_package, {"data/bad.py": "import flamingo_jax.models.layers\n"})
    assert violations(import_graph(toy_package)) == [
        "flamingo_jax.data.bad (layer 2) imports flamingo_jax.models.layers (layer 2)"]


def test_the_contract_rejects_a_cycle_within_a_layer(toy_package):
    _write(toy_package, {"models/layers.py": "from flamingo_jax.models import decoder\n"})
    graph = import_graph(toy_package)
    assert violations(graph) == []
    assert cycles(graph) == [["flamingo_jax.models.decoder", "flamingo_jax.models.layers"]]
