"""The servers under test: what they are, what each is compared with, and
whether this machine can run them.

Each one runs in its own process (``python -m fastlisten.benchmark.serve``),
so that its CPU time is its own and it can be pinned to its own CPU.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Dict, List, Optional

from fastlisten.benchmark.loadgen import native_available

__all__ = ["ServerSpec", "SERVERS", "READY_RULES", "by_name", "unavailable_reason"]


@dataclass(frozen=True)
class ServerSpec:
    """A server under test.

    ``kind`` is its concurrency model; ``baseline`` names the standard
    library server of the same kind that its ratios are computed against.
    """

    name: str
    label: str
    group: str      # "fastlisten", "stdlib", "peer", "native"
    kind: str       # "inline", "threading", "forking", "async", "native"
    baseline: str
    module: Optional[str] = None   # socketserver-style: the module holding `cls`
    cls: Optional[str] = None
    #: fastlisten's accept filter: True serves with ``listen_config``'s
    #: ``ready_rule`` set to what fits the scenario (READY_RULES)
    filtered: bool = False

    @property
    def socketserver_api(self) -> bool:
        """True when it has serve_forever()/shutdown() (shutdown is measured)."""
        return self.cls is not None


SERVERS: List[ServerSpec] = [
    ServerSpec("native", "C loop (reference)", "native", "native", "stdlib-tcp"),
    ServerSpec("fastlisten-tcp", "fastlisten TCPServer", "fastlisten", "inline",
               "stdlib-tcp", "fastlisten", "TCPServer"),
    ServerSpec("fastlisten-tcp+filter", "fastlisten TCPServer+filter", "fastlisten",
               "inline", "stdlib-tcp", "fastlisten", "TCPServer", filtered=True),
    ServerSpec("stdlib-tcp", "stdlib TCPServer", "stdlib", "inline",
               "stdlib-tcp", "socketserver", "TCPServer"),
    ServerSpec("fastlisten-threading", "fastlisten ThreadingTCPServer", "fastlisten",
               "threading", "stdlib-threading", "fastlisten", "ThreadingTCPServer"),
    ServerSpec("fastlisten-threading+filter", "fastlisten ThreadingTCP+filter",
               "fastlisten", "threading", "stdlib-threading", "fastlisten",
               "ThreadingTCPServer", filtered=True),
    ServerSpec("stdlib-threading", "stdlib ThreadingTCPServer", "stdlib", "threading",
               "stdlib-threading", "socketserver", "ThreadingTCPServer"),
    ServerSpec("fastlisten-forking", "fastlisten ForkingTCPServer", "fastlisten",
               "forking", "stdlib-forking", "fastlisten", "ForkingTCPServer"),
    ServerSpec("stdlib-forking", "stdlib ForkingTCPServer", "stdlib", "forking",
               "stdlib-forking", "socketserver", "ForkingTCPServer"),
    ServerSpec("asyncio", "asyncio streams", "peer", "async", "stdlib-tcp"),
    ServerSpec("uvloop", "uvloop streams", "peer", "async", "stdlib-tcp"),
    ServerSpec("gevent", "gevent StreamServer", "peer", "async", "stdlib-tcp"),
]

#: The accept filter's rule for each scenario (the ``filtered`` servers):
#: what the scenario's client sends before it waits for a reply (echo: a
#: line; http-close: a request head), and 'none' where the server speaks
#: first (daytime, burst: the client sends nothing).
READY_RULES: Dict[str, str] = {"echo": "line", "http-close": "http",
                               "daytime": "none", "burst": "none"}

_BY_NAME: Dict[str, ServerSpec] = {s.name: s for s in SERVERS}


def by_name(name: str) -> ServerSpec:
    """The spec called name (KeyError lists the known ones)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown server {name!r}: one of {', '.join(_BY_NAME)}") from None


def unavailable_reason(spec: ServerSpec) -> Optional[str]:
    """Why spec cannot run here, or None when it can (checked without
    importing the peers, which is slow and would load them into the runner)."""
    if spec.name == "native":
        return None if native_available() else "needs the compiled extensions (fastlisten.benchmark._native)"
    if spec.name in ("uvloop", "gevent"):
        if importlib.util.find_spec(spec.name) is None:
            return f"{spec.name} is not installed (pip install 'fastlisten[bench]')"
        return None
    if spec.module == "fastlisten":
        import fastlisten
        if not hasattr(fastlisten, spec.cls or ""):
            return f"this fastlisten has no {spec.cls} yet"
    if spec.kind == "forking":
        import os
        if not hasattr(os, "fork"):
            return "needs os.fork"
    return None
