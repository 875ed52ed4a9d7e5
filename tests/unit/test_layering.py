"""The structure drawn from the imports (issue #25), read from the source with ``ast`` (nothing is imported).

- ``ensemble_core/`` is the library: it imports neither ``service/`` nor ``workers/``.
- ``service/`` never imports ``workers/``; ``workers/`` may import ``service/``. The command-line entry point
  that needs both (the ``worker`` command) is ``workers/main.py``, the console script.
- No import circle among the modules of ``service/`` and ``workers/`` (``service.cli`` and ``service.demo``
  imported each other, and so did ``service.cli`` and ``service.cli_platform``), nor among those of
  ``ensemble_core.evaluation`` (``runner`` and ``records`` imported each other).
- The wheel's package list in pyproject.toml is the source tree's, plus the directories it maps in.

Every ``import`` statement counts, those inside functions too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import tomllib
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ensemble_core", "service", "workers")


@cache
def modules() -> dict[str, Path]:
    """Every module of the three packages: dotted name -> file (a package is its ``__init__``)."""
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_names(name: str, path: Path) -> set[str]:
    """What a module imports: every ``import a.b`` and ``from a import b`` (as ``a`` and ``a.b``), relative
    imports resolved, and the constant arguments of ``importlib.import_module`` / ``__import__``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out.add(module)
            out.update(f"{module}.{a.name}" for a in node.names)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            out.add(node.args[0].value)
    return out


@cache
def graph() -> dict[str, frozenset[str]]:
    """Module -> the project's modules it imports (itself excluded)."""
    mods = modules()
    return {m: frozenset(n for n in imported_names(m, p) if n in mods and n != m) for m, p in mods.items()}


def _within(name: str, pkg: str) -> bool:
    return name == pkg or name.startswith(pkg + ".")


def _violations(src: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{m} imports {n}" for m, p in modules().items() if _within(m, src)
            for n in sorted(imported_names(m, p)) if any(_within(n, f) for f in forbidden)]


def strongly_connected(nodes: set[str]) -> list[list[str]]:
    """The import circles among ``nodes`` (strongly connected components of more than one module; Tarjan)."""
    g = {m: [n for n in graph()[m] if n in nodes] for m in sorted(nodes)}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
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
            if len(component) > 1:
                circles.append(sorted(component))

    for v in g:
        if v not in index:
            visit(v)
    return circles


def test_the_import_reader_sees_lazy_relative_and_dynamic_imports(tmp_path: Path) -> None:
    src = tmp_path / "mod.py"
    src.write_text("import os\nfrom . import sibling\nfrom ..up import thing\n"
                   "def f():\n    from workers.worker import Worker\n    import importlib\n"
                   "    importlib.import_module('workers.ray_local')\n")
    names = imported_names("service.sub.mod", src)
    assert {"os", "service.sub.sibling", "service.up.thing", "workers.worker.Worker", "workers.ray_local"} <= names
    assert "service.cli" in graph()["workers.main"]  # the entry point composes service.cli


def test_service_never_imports_workers() -> None:
    assert _violations("service", ("workers",)) == []


def test_ensemble_core_imports_neither_service_nor_workers() -> None:
    assert _violations("ensemble_core", ("service", "workers")) == []


def test_service_cli_and_demo_do_not_import_each_other() -> None:
    """service.cli dispatches to demo, cli_platform and cli_models; what they share is in service.cli_common."""
    g = graph()
    assert "service.demo" in g["service.cli"] and "service.cli" not in g["service.demo"]
    for module in ("service.cli_platform", "service.cli_models", "service.cli_common", "service.up"):
        assert "service.cli" not in g[module], module


def test_no_import_circle_in_service_or_workers() -> None:
    nodes = {m for m in modules() if _within(m, "service") or _within(m, "workers")}
    assert strongly_connected(nodes) == []


def test_no_import_circle_in_the_evaluation() -> None:
    """``records`` summarises what ``runner`` computed; ``evaluate.run_evaluation`` composes the two (runner
    imported records lazily to do it, and records took runner's private ``_col``)."""
    nodes = {m for m in modules() if _within(m, "ensemble_core.evaluation")}
    assert "ensemble_core.evaluation.records" in nodes and strongly_connected(nodes) == []
    assert "ensemble_core.evaluation.records" not in graph()["ensemble_core.evaluation.runner"]


def test_the_console_script_is_the_composition_root() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"] == {"robust-ensembles": "workers.main:main"}
    g = graph()
    assert "workers.worker" in g["workers.main"] and "service.cli" in g["workers.main"]


def test_the_wheel_lists_every_package_and_maps_in_what_up_reads() -> None:
    """A new subpackage must be added to pyproject.toml's list, or the wheel would lack it."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    mapped = tool["package-dir"]
    assert mapped == {"service.migrations": "migrations", "service.published": "docs/results"}
    on_disk = {".".join(d.relative_to(ROOT).parts) for pkg in PACKAGES
               for d in [ROOT / pkg, *(ROOT / pkg).rglob("*")] if d.is_dir() and "__pycache__" not in d.parts}
    under_mapped = {p for p in listed if any(_within(p, m) for m in mapped)}
    assert listed - under_mapped == on_disk
    assert under_mapped == {"service.migrations", "service.migrations.versions", "service.published"}
    assert (ROOT / "migrations" / "env.py").is_file() and any((ROOT / "migrations" / "versions").glob("0001_*.py"))
    assert (ROOT / "docs" / "results" / "leaderboard.json").is_file()
    data = tool["package-data"]
    assert data["service.migrations"] == ["script.py.mako"] and (ROOT / "migrations" / "script.py.mako").is_file()
    assert "static/*" in data["service"]
