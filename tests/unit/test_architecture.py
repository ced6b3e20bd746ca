"""The house rules, checked from the source: no import circles, routers that import no other router, and an
API side (api/, shared/, the SDK) that never pulls in the training stack.

Every import counts, also those inside functions and under TYPE_CHECKING: a lazy import still ties two
modules together, and a circle through one is a circle a reader has to untangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("api", "shared", "worker", "cli", "bench", "tuneforge_sdk")
TRAINING_STACK = ("torch", "transformers", "peft", "bitsandbytes", "deepspeed", "trl", "accelerate", "ray")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def imported_names(path: Path, name: str) -> set[str]:
    """Every module `path` imports, anywhere in the file, as dotted names (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports."""
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in imported_names(path, name):
            # `from a.b import c` names a.b.c, which is a module or a name in a.b.
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_the_checker_finds_a_circle_and_a_clean_graph() -> None:
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles() -> None:
    assert import_circles(import_graph()) == []


def test_routers_import_no_other_router() -> None:
    graph = import_graph()
    crossings = {
        (name, target)
        for name, targets in graph.items()
        if ".routers." in f".{name}." or name.endswith("routes")
        for target in targets
        if ".routers." in f".{target}." or target.endswith("routes")
    }
    assert crossings == set()


def test_the_api_side_never_imports_the_training_stack() -> None:
    offenders = []
    for name, path in project_modules().items():
        if name.split(".")[0] not in ("api", "shared", "tuneforge_sdk"):
            continue
        for imported in imported_names(path, name):
            if imported.split(".")[0] in TRAINING_STACK:
                offenders.append((name, imported))
    assert offenders == []
