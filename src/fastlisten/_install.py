"""``fastlisten.install()``: make later imports of ``socketserver`` get fastlisten."""

from __future__ import annotations

import socketserver as _std
import sys
from typing import List

__all__ = ["install", "modules_built_on_stdlib_socketserver"]


def modules_built_on_stdlib_socketserver() -> List[str]:
    """The names of the imported modules (other than socketserver itself
    and fastlisten's) that hold the standard library's socketserver module
    or one of its classes, as ``import socketserver`` or ``from
    socketserver import TCPServer`` leave them (``http.server``,
    ``xmlrpc.server``...): install() cannot change what they hold."""
    std_objects = {id(_std)} | {
        id(value) for value in vars(_std).values()
        if isinstance(value, type) and value.__module__ == "socketserver"}
    found = []
    for name, module in list(sys.modules.items()):
        if module is None or module is _std or name == "socketserver" or \
                name == "fastlisten" or name.startswith("fastlisten."):
            continue
        try:
            values = list(vars(module).values())
        except TypeError:
            continue        # no __dict__
        if any(id(value) in std_objects for value in values):
            found.append(name)
    return sorted(found)


def install() -> None:
    """Make ``import socketserver`` return ``fastlisten.server`` from now on.

    What it patches: the single entry ``sys.modules["socketserver"]``.  Modules
    built on socketserver that are imported *afterwards* (``http.server``,
    ``xmlrpc.server``, ``wsgiref.simple_server``, ``logging.config``...)
    then subclass fastlisten's servers and mixins, which subclass the
    stdlib's own, so isinstance checks against either keep holding.
    Modules imported before the call keep the classes they already hold:
    the first call warns (:class:`fastlisten.FastlistenWarning`) naming
    them.  Call install() first thing in your program.  Idempotent.
    """
    from fastlisten import server
    if sys.modules.get("socketserver") is server:
        return
    sys.modules["socketserver"] = server
    early = modules_built_on_stdlib_socketserver()
    if early:
        from fastlisten.errors import FastlistenWarning, warn
        warn(f"fastlisten.install() came after {', '.join(early)} imported the standard "
             "library's socketserver: their servers keep the stdlib's classes. Call "
             "install() before importing them (or subclass fastlisten's mixin: "
             "class S(fastlisten.ThreadingMixIn, http.server.HTTPServer))",
             FastlistenWarning)
