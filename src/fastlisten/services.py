"""Classic tiny TCP services, as socketserver request handlers.

``fastlisten serve daytime|echo|discard`` runs them; any socketserver
server can too::

    socketserver.ThreadingTCPServer(("127.0.0.1", 4481), DaytimeHandler)
"""

from __future__ import annotations

import importlib
import inspect
import os
import socketserver
import sys
import time
from typing import Any, Callable, Dict, Optional, Tuple, Type

from fastlisten.errors import user_traceback

__all__ = ["DaytimeHandler", "EchoHandler", "DiscardHandler", "BUILTIN", "load_handler",
           "default_ready_rule", "ready_rule_for"]

_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July",
           "August", "September", "October", "November", "December")


def daytime(now: float) -> str:
    """RFC 867's suggested form, in UTC, independent of the locale:
    ``Weekday, Month Day, Year HH:MM:SS-UTC``."""
    t = time.gmtime(now)
    return (f"{_DAYS[t.tm_wday]}, {_MONTHS[t.tm_mon - 1]} {t.tm_mday}, {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}-UTC")


class DaytimeHandler(socketserver.BaseRequestHandler):
    """Daytime (RFC 867): send the current date and time as one line of
    ASCII text and close, ignoring anything the client sends.  A client
    that has gone (reset, broken pipe) ends the conversation quietly, as
    for the other built-ins: it is no failure of the handler's."""

    def handle(self) -> None:
        try:
            self.request.sendall((daytime(time.time()) + "\r\n").encode("ascii"))
        except (ConnectionResetError, BrokenPipeError):
            pass


class EchoHandler(socketserver.BaseRequestHandler):
    """Echo (RFC 862): send back whatever arrives until the client closes
    (or resets the connection)."""

    def handle(self) -> None:
        recv, sendall = self.request.recv, self.request.sendall
        try:
            while True:
                data = recv(65536)
                if not data:
                    return
                sendall(data)
        except (ConnectionResetError, BrokenPipeError):
            pass


class DiscardHandler(socketserver.BaseRequestHandler):
    """Discard (RFC 863): read and throw away everything until the client
    closes (or resets the connection)."""

    def handle(self) -> None:
        recv = self.request.recv
        try:
            while recv(65536):
                pass
        except ConnectionResetError:
            pass


#: The handlers ``fastlisten serve`` knows by name.
BUILTIN: Dict[str, Type[socketserver.BaseRequestHandler]] = {
    "daytime": DaytimeHandler,
    "echo": EchoHandler,
    "discard": DiscardHandler,
}


def load_handler(spec: str) -> Callable[..., Any]:
    """A built-in handler's class, or ``module:Class`` imported (the current
    directory is on the path) and checked to be callable as
    ``Class(request, client_address, server)``.  Raises ValueError saying
    what is wrong."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if ":" not in spec:
        raise ValueError(f"unknown handler {spec!r}: use one of "
                         f"{', '.join(sorted(BUILTIN))}, or module:Class")
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        if _not_found(exc, module_name):
            raise ValueError(f"handler {spec!r}: cannot import {module_name!r}: "
                             f"{exc}") from None
        raise ValueError(_import_failed(spec, module_name, exc)) from None
    except Exception as exc:    # noqa: BLE001 - the module's own code failed: show where
        raise ValueError(_import_failed(spec, module_name, exc)) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"handler {spec!r}: {module_name!r} has no {attr!r}") from None
    if not callable(obj):
        raise ValueError(f"handler {spec!r} is not callable (a request handler class)")
    try:
        inspect.signature(obj).bind(None, None, None)
    except TypeError:
        raise ValueError(f"handler {spec!r} cannot be called as Class(request, "
                         "client_address, server): subclass "
                         "socketserver.BaseRequestHandler") from None
    except ValueError:
        pass        # no signature to check (a builtin): let it be tried
    return obj


def _not_found(exc: ImportError, module_name: str) -> bool:
    """True when the handler's module itself (or a package above it) does
    not exist, as opposed to its code failing to import something."""
    missing = getattr(exc, "name", None)
    return isinstance(exc, ModuleNotFoundError) and missing is not None and (
        module_name == missing or module_name.startswith(missing + "."))


def _import_failed(spec: str, module_name: str, exc: BaseException) -> str:
    """What to say when the handler's module raised while it was imported:
    its traceback, with the frames of its own code only (importlib's and
    fastlisten's say nothing about it)."""
    return (f"handler {spec!r}: importing {module_name!r} raised "
            f"{type(exc).__name__}:\n{user_traceback(exc)}")


def default_ready_rule(handler: Any, tls: bool) -> Tuple[str, str]:
    """The accept-filter rule (``ListenConfig.ready_rule``) that suits
    ``handler``'s protocol, and why, in a few words for a log line: one
    that keeps a silent client from holding a thread while every client
    of the protocol still reaches it (``fastlisten serve``'s default)."""
    # (http.server is not imported here: `import fastlisten` must not
    # import the stdlib's socketserver users; an HTTP handler's module has)
    http_server = sys.modules.get("http.server")
    if tls:
        return "tls", "TLS clients speak first"
    if isinstance(handler, type):
        if issubclass(handler, DaytimeHandler):
            return "none", "the server speaks first"
        if http_server is not None and issubclass(handler,
                                                  http_server.BaseHTTPRequestHandler):
            return "http", "an HTTP handler"
    return "data", "--ready-rule none if the server speaks first"


def ready_rule_for(handler: Any, given: Optional[str], tls: bool,
                   other_ready_options: bool) -> Tuple[Optional[str], str]:
    """The ``ready_rule`` to serve ``handler`` with, and where it came from
    (for a log line): ``given`` if not None; else default_ready_rule's,
    except that its 'none' and 'tls' are left to the server classes' own
    default (None: the PROXY header within ``proxy_timeout``, the
    ClientHello within ``handshake_timeout``) unless ``other_ready_options``
    (a ready_timeout, ready_max_bytes, max_waiting or ready_min_rate) ask
    for the filter.
    ValueError for a rule that cannot see through TLS."""
    if given is not None:
        if tls and given in ("line", "http"):
            raise ValueError(f"ready rule {given!r} cannot be seen through TLS (the client's "
                             "bytes are encrypted after its ClientHello): use 'tls', the "
                             "default with TLS, or 'data'")
        return given, "--ready-rule"
    rule, why = default_ready_rule(handler, tls)
    if rule in ("none", "tls") and not other_ready_options:
        return None, why
    return rule, why
