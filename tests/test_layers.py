"""The floors of the house (../shared/notes/architecture.md): each imports only from the floors
below it, and no two modules import each other, directly or round a circle. Every import counts,
including those inside functions (they are how a lazy import hides an arrow)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .conftest import ROOT

PACKAGES = ("index", "retrieval", "server", "bench")
CLIS = ("train_embed", "build_index", "query", "serve", "audit")
# what each floor may not import
FORBIDDEN = {
    "index": {"retrieval", "server", "bench", "tests", *CLIS},
    "retrieval": {"server", "bench", "tests", *CLIS},
    "server": {"bench", "tests", *CLIS},
    "bench": {"tests", *CLIS},
}


# inside retrieval/: what each part may not import (the shared modules at its top, then models,
# then training and answering side by side, neither importing the other)
RETRIEVAL_PARTS = {
    "retrieval": {"retrieval.models", "retrieval.training", "retrieval.answering"},
    "retrieval.models": {"retrieval.training", "retrieval.answering"},
    "retrieval.training": {"retrieval.answering"},
    "retrieval.answering": {"retrieval.training"},
}


def retrieval_part(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "retrieval":
        return None
    below = ".".join(parts[:2])
    return below if below in RETRIEVAL_PARTS else "retrieval"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def project_graph() -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")
             if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]  # venvs
    files += [ROOT / f"{cli}.py" for cli in CLIS]
    modules = {module_name(p): p for p in files}
    return {name: {m for m in imports_of(path) if m in modules and m != name}
            for name, path in modules.items()}


@pytest.mark.parametrize("floor", FORBIDDEN)
def test_no_floor_imports_from_above(floor):
    wrong = sorted(f"{name} -> {target}" for name, targets in project_graph().items()
                   if name.split(".")[0] == floor for target in targets
                   if target.split(".")[0] in FORBIDDEN[floor])
    assert not wrong, wrong


def test_retrieval_parts_import_only_what_sits_below_them():
    wrong = sorted(f"{name} -> {target}" for name, targets in project_graph().items()
                   if retrieval_part(name) for target in targets
                   if retrieval_part(target) in RETRIEVAL_PARTS[retrieval_part(name)])
    assert not wrong, wrong


def test_no_import_circles():
    graph = project_graph()
    # a package's __init__ importing its own modules is how a package exports names, not a circle
    edges = {name: {t for t in targets if not name or not t.startswith(name + ".")}
             for name, targets in graph.items()}
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                circles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not circles, circles


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """Guards the tests above: a lazy relative import inside a function is an arrow too."""
    module = ROOT / "bench" / "peers_suite.py"
    assert "bench.open_set" in imports_of(module)
    assert "retrieval.training.train" in imports_of(module)  # imported inside run()


def test_the_public_api_resolves_and_import_stays_light():
    """``import retrieval`` loads no torch (CLIs import it before parsing --help); every name in
    ``retrieval.__all__`` resolves to the object the docstring's example uses."""
    import subprocess
    import sys

    code = ("import sys, retrieval; light = 'torch' not in sys.modules; "
            "[getattr(retrieval, n) for n in retrieval.__all__]; "
            "print(light, retrieval.build_index.__module__, retrieval.load_index.__module__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "retrieval.answering.indexing", "index.store"]
