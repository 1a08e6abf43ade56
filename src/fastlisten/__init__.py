"""fastlisten: fast, trustworthy TCP listeners.

A Cython core makes the socket, bind, listen and accept4 system calls and
drains the accept queue in batches without the GIL; a thin Python layer adds
configuration, clear errors and dispatch.

The drop-in ``socketserver`` is the module ``fastlisten.server`` (what
``install()`` puts in ``sys.modules["socketserver"]``).  This package
re-exports it whole, so ``import fastlisten as socketserver`` gives the very
same objects, the stdlib's private names included, and its ``__version__``
(socketserver's "0.4", deprecated from CPython 3.15 on with the stdlib's
own warning).  fastlisten's own version is ``fastlisten.VERSION``.
"""
from typing import Any

from fastlisten._backend import compiled, proxy_parse, proxy_read
from fastlisten._install import install
from fastlisten._version import VERSION  # fastlisten's (``__version__`` is socketserver's)
from fastlisten.config import ListenConfig
from fastlisten.errors import (
    BacklogTruncatedWarning,
    EphemeralPortWarning,
    FastlistenWarning,
    OptionIneffectiveWarning,
)
from fastlisten.listener import Listener, default_backlog, listen
from fastlisten.running import serve_until_signalled
from fastlisten.server import *  # noqa: F401,F403  (the drop-in socketserver)
from fastlisten.server import __all__ as _server_all
from fastlisten.workers import Workers

__all__ = ["compiled", "Listener", "listen", "default_backlog", "proxy_parse", "proxy_read"]
__all__ += ["install", "Workers", "serve_until_signalled", "VERSION"] + _server_all
__all__ += ["ListenConfig", "FastlistenWarning", "EphemeralPortWarning",
            "BacklogTruncatedWarning", "OptionIneffectiveWarning"]


def __getattr__(name: str) -> Any:
    # Names of the stdlib's socketserver that fastlisten.server forwards
    # (private helpers such as _ServerSelector, __version__), for code that
    # treats this package as socketserver.
    from fastlisten import server
    try:
        return vars(server)[name]
    except KeyError:
        return server._stdlib_attribute(name, stacklevel=2)
