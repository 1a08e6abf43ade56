"""``fastlisten.install()``: make later imports of ``socketserver`` get fastlisten."""

from __future__ import annotations

import sys

__all__ = ["install"]


def install() -> None:
    """Make ``import socketserver`` return ``fastlisten.server`` from now on.

    What it patches: the single entry ``sys.modules["socketserver"]``.  Modules
    built on socketserver that are imported *afterwards* (``http.server``,
    ``xmlrpc.server``, ``wsgiref.simple_server``, ``logging.config``...)
    then subclass fastlisten's servers and mixins, which subclass the
    stdlib's own, so isinstance checks against either keep holding.
    Modules imported before the call keep the classes they already hold;
    call install() first thing in your program.  Idempotent.
    """
    from fastlisten import server
    sys.modules["socketserver"] = server
