"""fastlisten: fast, trustworthy TCP listeners.

A Cython core makes the socket, bind, listen and accept4 system calls and
drains the accept queue in batches without the GIL; a thin Python layer adds
configuration, clear errors and dispatch.
"""
from fastlisten.config import ListenConfig
from fastlisten.errors import (
    BacklogTruncatedWarning, EphemeralPortWarning, FastlistenWarning, OptionIneffectiveWarning,
)
from fastlisten._backend import compiled
from fastlisten.listener import Listener, listen, default_backlog

from fastlisten.server import *  # noqa: F401,F403  (the drop-in socketserver)
from fastlisten.server import __all__ as _server_all
from fastlisten._install import install

__all__ = ["compiled", "Listener", "listen", "default_backlog"]
__all__ += ["install"] + _server_all
__version__ = "0.1.0"
__all__ += ["ListenConfig", "FastlistenWarning", "EphemeralPortWarning",
            "BacklogTruncatedWarning", "OptionIneffectiveWarning"]
