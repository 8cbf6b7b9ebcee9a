"""The package's structure: no import cycle (imports inside functions count), no private name crosses a module."""

import ast
import pathlib

import grimp
import networkx

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("dualguide", "samplers")


def test_no_import_cycle_among_the_modules():
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    edges = networkx.DiGraph()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            edges.add_edge(module, imported)
    cycles = [sorted(group) for group in networkx.strongly_connected_components(edges) if len(group) > 1]
    assert cycles == []


def project_module_names(tree: ast.Module):
    """Names bound by ``import``/``from`` statements of project modules in ``tree``."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in PACKAGES):
            names.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names if alias.name.split(".")[0] in PACKAGES)
    return names


def test_no_module_uses_another_modules_private_names():
    found = []
    for path in sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = project_module_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in PACKAGES):
                found += [f"{path.relative_to(ROOT)}: from {node.module} import {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]  # fmt: skip
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported
                  and node.attr.startswith("_") and not node.attr.startswith("__")):  # fmt: skip
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert found == []
