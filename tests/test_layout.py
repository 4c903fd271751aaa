"""The layout the architecture promises: no import cycles, verify never needs receiver."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"falhook.verify": REPO / "verify", "falhook.receiver": REPO / "receiver"}


def _modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The falhook modules `path` imports at module level or in functions.

    ``from pkg import submodule`` depends on the submodule, not on the package's
    ``__init__`` (which Python runs first, but which is not what the code uses).
    """
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
            if submodules:
                found |= submodules
            elif node.module in modules:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
    return found


def test_no_import_cycles_between_modules() -> None:
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_verify_does_not_import_receiver() -> None:
    modules = _modules()
    for name, path in modules.items():
        if name.startswith("falhook.verify"):
            assert not any(dep.startswith("falhook.receiver") for dep in _imports(path, modules))


def test_the_tables_sit_below_the_store() -> None:
    # The store's queries are written against models.py's tables: never the other way.
    modules = _modules()
    path = modules["falhook.receiver.models"]
    assert not any(dep.startswith("falhook.receiver.store") for dep in _imports(path, modules))


def test_every_module_is_found() -> None:
    modules = _modules()
    assert {"falhook.verify.signature", "falhook.receiver.store.store"} <= modules.keys()
    assert "falhook.receiver.cli.main" in modules


def test_the_cli_is_on_top_nothing_below_imports_it() -> None:
    """The command line uses the receiver; no receiver module uses the command line."""
    modules = _modules()
    top = ("falhook.receiver.cli", "falhook.receiver.__main__")
    for name, path in modules.items():
        if name == top[0] or name.startswith(top[0] + ".") or name == top[1]:
            continue
        below = [dep for dep in _imports(path, modules) if dep.startswith(top[0])]
        assert below == [], f"{name} imports {below}: the CLI sits above it"


def test_no_module_imports_another_modules_private_names() -> None:
    """A name shared between modules is public (no leading underscore) where it lives."""
    modules = _modules()
    found = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("falhook."):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{name}: from {node.module} import {alias.name}")
    assert found == []


def test_every_module_is_on_the_architecture_map() -> None:
    """Internal modules are listed in ARCHITECTURE.md (the public API is the packages'
    ``__init__``): a new module is added to the map, or it is not found there."""
    text = (REPO / "ARCHITECTURE.md").read_text()
    missing = [
        f"{path.relative_to(REPO)}"
        for path in _modules().values()
        if path.name not in ("__init__.py", "__main__.py") and path.name not in text
    ]
    assert missing == []
