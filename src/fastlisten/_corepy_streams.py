"""The pure-Python twin of the compiled core's ``_streams.pxi``: a request
handler's file objects."""

from __future__ import annotations

import io as _io
import socket as _socket
import socketserver as _socketserver


class SocketReader(_socket.SocketIO):
    """The raw, read-only stream of a connected socket with the reference
    ``sock.makefile("rb")`` takes: the stdlib's own SocketIO, which the
    compiled core's SocketReader does in C."""

    def __init__(self, sock: _socket.socket) -> None:
        try:
            sock._io_refs += 1      # type: ignore[attr-defined]
        except BaseException:
            # closed already, so that nothing is given back when collected
            _io.RawIOBase.close(self)
            raise
        super().__init__(sock, "rb")


#: The unbuffered write stream of a connected socket: the stdlib's own,
#: which the compiled core's SocketWriter does in C.
SocketWriter = _socketserver._SocketWriter  # type: ignore[attr-defined]
