"""The import arrows hold (read from the source with ast, nothing is imported):

- nothing in cellseg/ imports cellseg.export (or cellseg.bench) but the commands that run them
  (cli, demo), not even inside a function;
- the package's modules (cellseg/, export/ as cellseg.export, bench/ as cellseg.bench) have no
  import cycle among the imports that run when a module is loaded;
- no module in cellseg/ imports an optional library when it is loaded, and the optional runtimes
  are imported only by their own backend module.
Each checker is also run on small made-up sources, so these tests are known to be able to fail."""
from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package it installs as (pyproject.toml's package-dir).
PACKAGE_DIRS = {"cellseg": "cellseg", "export": "cellseg.export", "bench": "cellseg.bench"}
EXPORTER_COMMANDS = {"cellseg/cli.py", "cellseg/demo.py"}
# Optional libraries (pyproject extras, or not dependencies at all): never imported at module level
# in cellseg/, so the core installs and runs without them.
OPTIONAL = {"onnx", "onnxruntime", "onnxslim", "onnxconverter_common", "tensorrt", "openvino", "nncf", "ray",
            "pytriton", "tritonclient", "tiffslide", "openslide", "zarr", "shapely", "geojson"}
# Runtimes that only their backend module may import, at any depth.
RUNTIME_HOMES = {"onnxruntime": {"cellseg/backends/onnxruntime_backend.py"},
                 "tensorrt": {"cellseg/backends/tensorrt_backend.py"},
                 "openvino": {"cellseg/backends/openvino_backend.py"}}


# ------------------------------------------------------------------------------ reading imports
def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root)
    package = PACKAGE_DIRS[rel.parts[0]]
    parts = [p for p in rel.with_suffix("").parts[1:] if p != "__init__"]
    return ".".join([package, *parts])


def source_files(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for every .py file of the three package folders."""
    return {module_name(p, root): p for folder in PACKAGE_DIRS if (root / folder).is_dir()
            for p in sorted((root / folder).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def load_time_nodes(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements that run when the module is imported: the module body, its if/try/with/for
    blocks and class bodies; not function bodies, not `if TYPE_CHECKING:` blocks."""
    for node in body:
        yield node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from load_time_nodes(node.orelse)
            continue
        for field in ("body", "orelse", "finalbody"):
            yield from load_time_nodes(getattr(node, field, []) or [])
        for handler in getattr(node, "handlers", []) or []:
            yield from load_time_nodes(handler.body)


def imported_names(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Full dotted names an import statement (or importlib call with a literal) brings in;
    `from a import b` gives both a.b (b may be a module) and a."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        return [base] + [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
            and isinstance(node.args[0].value, str):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in ("import_module", "__import__"):
            return [node.args[0].value]
    return []


def imports_of(tree: ast.Module, module: str, is_package: bool, load_time_only: bool) -> set[str]:
    nodes = load_time_nodes(tree.body) if load_time_only else ast.walk(tree)
    found: set[str] = set()
    for node in nodes:
        found.update(imported_names(node, module, is_package))
        if load_time_only and isinstance(node, ast.stmt) and not isinstance(
                node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for sub in ast.walk(node):  # importlib calls inside load-time expressions
                if isinstance(sub, ast.Call):
                    found.update(imported_names(sub, module, is_package))
    return found


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


# ------------------------------------------------------------------------------ the graph
def resolve(name: str, modules: set[str]) -> str | None:
    """The package module a dotted import name lands in (its longest known prefix), if any."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def load_time_graph(sources: dict[str, ast.Module], packages: set[str]) -> dict[str, set[str]]:
    """module -> modules it imports while it loads (parent packages included: Python runs them first)."""
    modules = set(sources)
    graph: dict[str, set[str]] = {}
    for module, tree in sources.items():
        targets = set()
        for name in imports_of(tree, module, module in packages, load_time_only=True):
            target = resolve(name, modules)
            while target is not None:
                if target != module:
                    targets.add(target)
                target = target.rpartition(".")[0] or None
                target = target if target in modules else None
        graph[module] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


# ------------------------------------------------------------------------------ the checks
def importers_outside_commands(files: dict[str, Path], root: Path = ROOT, package: str = "cellseg.export") -> list[str]:
    """Files in cellseg/ that import `package` anywhere, other than the commands (cli, demo)."""
    bad = []
    for module, path in files.items():
        rel = path.relative_to(root).as_posix()
        if not rel.startswith("cellseg/") or rel in EXPORTER_COMMANDS:
            continue
        names = imports_of(parse(path), module, path.name == "__init__.py", load_time_only=False)
        hits = sorted(n for n in names if n == package or n.startswith(package + "."))
        if hits:
            bad.append(f"{rel}: {', '.join(hits)}")
    return bad


def optional_import_problems(files: dict[str, Path], root: Path = ROOT) -> list[str]:
    bad = []
    for module, path in files.items():
        rel = path.relative_to(root).as_posix()
        if not rel.startswith("cellseg/"):
            continue
        tree, is_package = parse(path), path.name == "__init__.py"
        at_load = {n.split(".")[0] for n in imports_of(tree, module, is_package, load_time_only=True)}
        anywhere = {n.split(".")[0] for n in imports_of(tree, module, is_package, load_time_only=False)}
        bad += [f"{rel}: imports {lib} when loaded" for lib in sorted(at_load & OPTIONAL)]
        bad += [f"{rel}: imports {lib} (only {', '.join(sorted(homes))} may)"
                for lib, homes in RUNTIME_HOMES.items() if lib in anywhere and rel not in homes]
    return bad


def package_cycle(files: dict[str, Path]) -> list[str] | None:
    sources = {m: parse(p) for m, p in files.items()}
    packages = {m for m, p in files.items() if p.name == "__init__.py"}
    return find_cycle(load_time_graph(sources, packages))


def test_the_scan_sees_the_package():
    files = source_files()
    for module in ("cellseg.pipeline", "cellseg.artifacts", "cellseg.graphs", "cellseg.backends.onnxruntime_backend",
                   "cellseg.export.exporter", "cellseg.export.tensorrt_build", "cellseg.bench.harness"):
        assert module in files
    graph = load_time_graph({m: parse(p) for m, p in files.items()}, set())
    assert "cellseg.artifacts" in graph["cellseg.backends.base"]
    assert "cellseg.artifacts" in graph["cellseg.export.tensorrt_build"]


def test_only_the_exporter_commands_import_export():
    assert importers_outside_commands(source_files()) == []


def test_only_the_commands_import_bench():
    assert importers_outside_commands(source_files(), package="cellseg.bench") == []


def test_no_import_cycle_when_modules_load():
    cycle = package_cycle(source_files())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_core_loads_without_optional_libraries():
    assert optional_import_problems(source_files()) == []


# ------------------------------------------------------------------------------ the checks can fail
def write_tree(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return source_files(root)


def test_checkers_find_what_they_look_for(tmp_path):
    files = write_tree(tmp_path, {
        "cellseg/__init__.py": "",
        "cellseg/backends/__init__.py": "",
        "cellseg/backends/fast.py": "def load():\n    import onnxruntime\n",
        "cellseg/pipeline.py": "import zarr\nfrom cellseg.backends import fast\n"
                               "def f():\n    from cellseg.export.exporter import export_model\n",
        "cellseg/cli.py": "def export():\n    from cellseg.export.exporter import export_model\n",
        "cellseg/demo.py": "from cellseg import export\n",
        "cellseg/infer.py": "import importlib\nexporter = importlib.import_module('cellseg.export')\n",
        "cellseg/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import shapely\n"
                            "def f():\n    import geojson\n",
        "export/__init__.py": "",
        "export/exporter.py": "from cellseg.pipeline import load\n",
        "bench/__init__.py": "",
    })
    assert files["cellseg.export.exporter"] == tmp_path / "export/exporter.py"
    assert importers_outside_commands(files, tmp_path) == [
        "cellseg/infer.py: cellseg.export",
        "cellseg/pipeline.py: cellseg.export.exporter, cellseg.export.exporter.export_model"]
    assert optional_import_problems(files, tmp_path) == [
        "cellseg/backends/fast.py: imports onnxruntime (only cellseg/backends/onnxruntime_backend.py may)",
        "cellseg/pipeline.py: imports zarr when loaded"]
    assert package_cycle(files) is None  # pipeline -> export only inside a function


@pytest.mark.parametrize("sources, cycle", [
    ({"cellseg/a.py": "import cellseg.b\n", "cellseg/b.py": "from cellseg import a\n"},
     ["cellseg.a", "cellseg.b", "cellseg.a"]),
    ({"cellseg/a.py": "try:\n    from cellseg.sub.c import x\nexcept ImportError:\n    pass\n",
      "cellseg/sub/__init__.py": "from . import c\n", "cellseg/sub/c.py": "from ..a import y\n"},
     ["cellseg.a", "cellseg.sub", "cellseg.sub.c", "cellseg.a"]),
    ({"cellseg/a.py": "class A:\n    from cellseg.export import verify\n",
      "export/verify.py": "import cellseg.a\n"}, ["cellseg.a", "cellseg.export.verify", "cellseg.a"]),
])
def test_cycle_finder_finds_load_time_cycles(tmp_path, sources, cycle):
    files = write_tree(tmp_path, {"cellseg/__init__.py": "", "export/__init__.py": "", **sources})
    assert package_cycle(files) == cycle


def test_imports_inside_functions_make_no_cycle(tmp_path):
    files = write_tree(tmp_path, {"cellseg/__init__.py": "", "cellseg/a.py": "import cellseg.b\n",
                                  "cellseg/b.py": "def f():\n    import cellseg.a\n"})
    assert package_cycle(files) is None
