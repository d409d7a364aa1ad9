"""The package's structure: imports go one way (no cycles, kernels are leaves), and no file in
the repository points at a path outside it."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folders and the package each installs as (see pyproject's package-dir).
PACKAGES = {"gemma_mlx": "gemma_mlx", "convert": "gemma_mlx.convert", "metal": "gemma_mlx.metal"}
KERNELS = "gemma_mlx.kernels"


def module_files() -> dict[str, Path]:
    modules = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _is_main_guard(node: ast.stmt) -> bool:
    """`if __name__ == "__main__":`, the only place a module may reach the command line."""
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


def imported(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `module` imports anywhere (functions included, `__main__` blocks
    not); `from package import name` counts as importing the submodule where one exists."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    stack: list[ast.AST] = [n for n in tree.body if not _is_main_guard(n)]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        stack.extend(ast.iter_child_nodes(node))
    return {m for m in found if m in known and m != module}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = module_files()
    return {m: imported(m, p, set(files)) for m, p in files.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components with more than one module are the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [c for c in components if len(c) > 1]


def test_no_import_cycle(graph):
    assert strongly_connected(graph) == []


def test_cycle_detector_finds_one():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_kernels_are_leaves(graph):
    above = {
        m: sorted(d for d in deps if not d.startswith(KERNELS))
        for m, deps in graph.items()
        if m.startswith(KERNELS)
    }
    assert {m: d for m, d in above.items() if d} == {}


def test_api_never_imports_the_cli(graph):
    users = sorted(m for m, deps in graph.items() if "gemma_mlx.cli" in deps)
    assert users == []


# A relative path that climbs out of the file's folder, or an absolute one into this machine.
OUTSIDE = re.compile(r"(?<![\w.])((?:\.\./)+[\w.\-/]*)|(/work/[\w.\-/]+)")


def test_no_file_points_outside_the_repository():
    tracked = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    problems = []
    for name in tracked:
        path = ROOT / name
        if not path.is_file() or path.suffix in {".png", ".whl", ".gguf", ".safetensors"}:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for m in OUTSIDE.finditer(text):
            relative, absolute = m.groups()
            if absolute or not (path.parent / relative).resolve().is_relative_to(ROOT):
                line = text.count("\n", 0, m.start()) + 1
                problems.append(f"{name}:{line}: {m.group(0)}")
    assert problems == []
