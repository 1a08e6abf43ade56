"""Classic tiny TCP services, as socketserver request handlers.

``fastlisten serve daytime|echo|discard`` runs them; any socketserver
server can too::

    socketserver.ThreadingTCPServer(("127.0.0.1", 4481), DaytimeHandler)
"""

from __future__ import annotations

import socketserver
import time
from typing import Dict, Type

__all__ = ["DaytimeHandler", "EchoHandler", "DiscardHandler", "BUILTIN"]

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
    ASCII text and close, ignoring anything the client sends."""

    def handle(self) -> None:
        self.request.sendall((daytime(time.time()) + "\r\n").encode("ascii"))


class EchoHandler(socketserver.BaseRequestHandler):
    """Echo (RFC 862): send back whatever arrives until the client closes."""

    def handle(self) -> None:
        recv, sendall = self.request.recv, self.request.sendall
        while True:
            data = recv(65536)
            if not data:
                return
            sendall(data)


class DiscardHandler(socketserver.BaseRequestHandler):
    """Discard (RFC 863): read and throw away everything until the client closes."""

    def handle(self) -> None:
        recv = self.request.recv
        while recv(65536):
            pass


#: The handlers ``fastlisten serve`` knows by name.
BUILTIN: Dict[str, Type[socketserver.BaseRequestHandler]] = {
    "daytime": DaytimeHandler,
    "echo": EchoHandler,
    "discard": DiscardHandler,
}
