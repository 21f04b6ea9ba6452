"""The layout's arrows and sizes, read from the source: the runtime imports nothing of the archiver, the
development tools, the scripts or the tests; the core knows no engine; engines do not know each other;
nothing imports in a circle; and no module or function outgrows one job."""

import ast
from pathlib import Path

import pytest

from devtools import REPO_ROOT

PACKAGES = ("handlers", "archiver", "devtools")
SCRIPTS = {path.stem for path in (REPO_ROOT / "scripts").glob("*.py")}  # imported by name beside each other
MAX_MODULE_LINES = 300
MAX_FUNCTION_LINES = 60

# Who may not import whom: the importing module's prefix, and the prefixes it must never import.
FORBIDDEN = {
    "handlers": ("archiver", "devtools", "tests", "scripts", *SCRIPTS),
    "handlers.core": ("handlers.torchserve", "handlers.ray", "ts", "ray"),
    "handlers.torchserve": ("handlers.ray", "ray"),
    "handlers.ray": ("handlers.torchserve", "ts"),
    "archiver": ("devtools", "tests", "scripts", *SCRIPTS),
    "devtools": ("tests", *SCRIPTS),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    """Every module outside the tests: the packages, and the scripts (named `scripts.<name>`)."""
    found = {module_name(path): path for package in PACKAGES for path in (REPO_ROOT / package).rglob("*.py")}
    found |= {f"scripts.{path.stem}": path for path in (REPO_ROOT / "scripts").glob("*.py")}
    return found


def imports_of(path: Path, name: str) -> set[str]:
    """The modules a file imports, wherever in it (at the top, in a function, under TYPE_CHECKING)."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing package
                package = name.split(".")[: -node.level] if not path.name == "__init__.py" else name.split(".")
                base = ".".join([*package, base] if base else package)
            imported |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return imported


def is_under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = sources()
    return {name: imports_of(path, name) for name, path in modules.items()}


def test_each_layer_imports_only_what_lies_below_it(graph):
    wrong = []
    for module, imported in graph.items():
        if module.startswith("scripts."):
            continue
        for layer, forbidden in FORBIDDEN.items():
            if is_under(module, layer):
                wrong += [f"{module} imports {target}" for target in imported
                          if any(is_under(target, prefix) for prefix in forbidden)]
    assert not wrong, "\n".join(sorted(wrong))


def test_nothing_imports_in_a_circle(graph):
    internal = {module: {target for target in imported if target in graph and target != module}
                for module, imported in graph.items()}
    # A package's __init__ that a module of it imports is not a circle of code; only module-to-module edges count.
    edges = {module: {target for target in targets if not module.startswith(target + ".")}
             for module, targets in internal.items()}
    circles = []

    def visit(module: str, path: list[str]) -> None:
        for target in edges[module]:
            if target in path:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in done:
                visit(target, path + [target])
        done.add(module)

    done: set[str] = set()
    for module in sorted(edges):
        if module not in done:
            visit(module, [module])
    assert not circles, "\n".join(sorted(set(circles)))


def test_no_module_outgrows_one_job():
    long = {name: lines for name, path in sources().items() if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_outgrows_one_job():
    long = []
    for name, path in sources().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {length} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_check_sees_a_wrong_arrow(tmp_path):
    """The checker itself: a core module that imports the archiver is caught."""
    planted = tmp_path / "handlers" / "core" / "planted.py"
    planted.parent.mkdir(parents=True)
    planted.write_text("from archiver.build import build_archive\n")
    imported = imports_of(planted, "handlers.core.planted")
    assert any(is_under(target, prefix) for target in imported for prefix in FORBIDDEN["handlers"])
