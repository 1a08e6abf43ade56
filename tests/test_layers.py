"""The module map holds: a module imports only modules of its own layer or of
the layers below it (docs/design.md draws the same map).

Each module of the package is in exactly one layer; an import that runs up
the map (a library module using the CLI, the core using the Python layer)
fails here, as does a new module that nobody placed.
"""

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "src" / "fastlisten"

#: Lowest first.  "benchmark.*" names every module of that subpackage.
LAYERS = [
    ("foundations", ["_version", "address", "_coreshared", "_wakeup", "proxy", "systemd",
                     "_threadpool", "_heartbeat", "_pidfile"]),
    ("core", ["_core", "_corepy", "_corepy_proxy", "_corepy_streams", "_backend"]),
    ("Python layer", ["sysinfo", "errors", "config", "listener", "_queued", "services",
                      "_reuseport"]),
    ("drop-in", ["_childreports", "_frontdoor", "_deadline", "server", "_install"]),
    ("supervisor", ["workers", "running", "_worker_process", "_worker_counters",
                    "_supervisor_status", "_server_hooks"]),
    ("package", ["__init__"]),
    ("benchmark", ["benchmark.*"]),
    ("CLI", ["cli", "__main__", "commands.*"]),
]


def _layer_of(module):
    for rank, (_, members) in enumerate(LAYERS):
        for member in members:
            if module == member or (member.endswith(".*") and
                                    (module + ".").startswith(member[:-1])):
                return rank
    return None


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")) + sorted(PACKAGE.rglob("*.pyx")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts)
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        yield name, path


def _imports(name, path):
    """The package's modules that `name` imports (module names relative to
    the package), from its source."""
    if path.suffix == ".pyx":      # Cython: only its Python imports' module names
        text = "\n".join(f"import {m.group(1) or m.group(2)}" for m in re.finditer(
            r"^from\s+(fastlisten[\w.]*)\s+import\b|^import\s+(fastlisten[\w.]*)",
            path.read_text(), re.M))
    else:
        text = path.read_text()
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    if name == "__init__":
        package = []
    found = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(["fastlisten", *base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            targets = [module]
            if module in ("fastlisten", "fastlisten.benchmark", "fastlisten.commands"):
                # "from fastlisten import x": x may be a submodule or a name
                targets = [f"{module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            if target == "fastlisten" or target.startswith("fastlisten."):
                rel = target[len("fastlisten."):] if target != "fastlisten" else "__init__"
                found.add(_resolve(rel))
    found.discard(name)
    return found


def _resolve(rel):
    """A dotted name under the package as a module: 'commands.serve' stays,
    'cli.main' (a name in a module) becomes 'cli', a name of the package's
    __init__ becomes '__init__'."""
    parts = rel.split(".")
    while parts:
        candidate = PACKAGE.joinpath(*parts)
        if candidate.with_suffix(".py").exists() or candidate.with_suffix(".pyx").exists() \
                or (candidate / "__init__.py").exists():
            return ".".join(parts)
        parts.pop()
    return "__init__"


MODULES = dict(_modules())


def test_every_module_has_a_layer():
    assert [m for m in MODULES if _layer_of(m) is None] == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_run_down_the_map(name):
    rank = _layer_of(name)
    up = sorted(f"{dep} ({LAYERS[_layer_of(dep)][0]})"
                for dep in _imports(name, MODULES[name])
                if _layer_of(dep) is not None and _layer_of(dep) > rank)
    assert up == [], f"{name} ({LAYERS[rank][0]}) imports from above: {', '.join(up)}"
