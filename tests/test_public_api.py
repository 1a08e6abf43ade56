"""The compiled core, its pure-Python twin and the type stub promise the
same API (pyzmq's public_api idea): a name or method added to one and not
the others fails here."""

import ast
import os
import socket

import pytest

import fastlisten
from fastlisten import _corepy

STUB = os.path.join(os.path.dirname(fastlisten.__file__), "_core.pyi")


def _stub():
    """Top-level names of _core.pyi, and each class's public members."""
    with open(STUB) as f:
        tree = ast.parse(f.read())
    names, members = set(), {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            names.add(node.name)
            found = set()
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    found.add(item.target.id)
            members[node.name] = {n for n in found if not n.startswith("_")}
        elif isinstance(node, (ast.FunctionDef, ast.AnnAssign)):
            names.add(node.name if isinstance(node, ast.FunctionDef) else node.target.id)
    return names, members


def _public(obj):
    return {n for n in dir(obj) if not n.startswith("_")}


@pytest.fixture(scope="module")
def compiled_core():
    try:
        from fastlisten import _core
    except ImportError as exc:
        pytest.skip(f"the compiled core is not built here: {exc}")
    return _core


def test_the_three_export_the_same_names(compiled_core):
    stub_names, _ = _stub()
    assert set(compiled_core.__all__) == set(_corepy.__all__) == stub_names


def test_the_three_give_raw_listener_the_same_members(compiled_core):
    _, stub_members = _stub()
    c = compiled_core.RawListener(socket.AF_INET)
    p = _corepy.RawListener(socket.AF_INET)
    try:
        assert _public(c) == _public(p) == stub_members["RawListener"]
    finally:
        c.close()
        p.close()


def test_the_runtime_core_holds_no_benchmark_code(compiled_core):
    for name in ("loadgen_run", "refserver_serve", "LOADGEN_SCENARIOS"):
        assert not hasattr(compiled_core, name)


def test_the_three_give_stop_and_waiter_the_same_members(compiled_core):
    _, stub_members = _stub()
    made = []
    try:
        for core in (compiled_core, _corepy):
            lst = core.RawListener(socket.AF_INET)
            stop = lst.new_stop()
            made.append((lst, stop, lst.waiter(stop)))
        (_, c_stop, c_waiter), (_, p_stop, p_waiter) = made
        assert _public(c_stop) == _public(p_stop) == stub_members["Stop"]
        assert _public(c_waiter) == _public(p_waiter) == stub_members["Waiter"]
    finally:
        for lst, stop, waiter in made:
            waiter.close()
            stop.close()
            lst.close()
