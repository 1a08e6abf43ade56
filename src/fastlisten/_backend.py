"""Chooses the core: the compiled ``fastlisten._core``, or its pure-Python
twin ``fastlisten._corepy`` when the extension is absent or
``FASTLISTEN_NO_EXTENSIONS=1`` is set (msgpack's and pyzmq's pattern)."""

import logging
import os

_log = logging.getLogger("fastlisten")

if os.environ.get("FASTLISTEN_NO_EXTENSIONS", "") not in ("", "0"):
    from fastlisten import _corepy as core
else:
    try:
        from fastlisten import _core as core  # type: ignore[no-redef]
    except ImportError as exc:
        _log.debug("compiled core unavailable (%s); using the pure-Python core", exc)
        from fastlisten import _corepy as core

#: True when the compiled core is in use.
compiled: bool = core.__name__ == "fastlisten._core"

RawListener = core.RawListener
#: The PROXY protocol parser and reader (fastlisten.proxy has their header and errors).
proxy_parse = core.proxy_parse
proxy_read = core.proxy_read
#: A request handler's file objects over its connection (StreamRequestHandler).
SocketReader = core.SocketReader
SocketWriter = core.SocketWriter

__all__ = ["core", "compiled", "RawListener", "proxy_parse", "proxy_read",
           "SocketReader", "SocketWriter"]
