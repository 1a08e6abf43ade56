"""What forked children tell the process that forked them: one byte per
event over a pipe made before the fork.

A server whose handlers run in forked children (``ForkingMixIn``) counts
and logs their PROXY headers, TLS handshakes and handler deadlines in the
server process: each child writes a byte per event, the server process
reads them whenever it reaps children and in ``counters()``.  The pipe is
non-blocking: a child never waits on a server that stopped reading.  A
byte that finds the pipe full is counted in memory shared with the
children, so that the loss itself is known (:meth:`ChildReports.lost`).
"""

from __future__ import annotations

import errno
import mmap
import os
import struct

__all__ = ["ChildReports"]


class ChildReports:
    """The pipe and the lost-report counter of one server's children."""

    def __init__(self) -> None:
        self._pid = os.getpid()
        #: reports the children could not write (a uint64 in MAP_SHARED
        #: memory, which two children losing one at the same instant may
        #: count once)
        self._lost = mmap.mmap(-1, 8)
        self._lost_seen = 0         # what newly_lost() reported so far
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def in_child(self) -> bool:
        """True in a process forked since (where :meth:`send` applies)."""
        return os.getpid() != self._pid

    def send(self, code: int) -> None:
        """In a forked child: report event ``code`` (0-255)."""
        if self._w < 0:
            return
        try:
            os.write(self._w, bytes((code,)))
        except BlockingIOError:     # full: the server process reads no more
            lost = self._lost
            if not lost.closed:
                struct.pack_into("=Q", lost, 0, struct.unpack_from("=Q", lost)[0] + 1)
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.EBADF):
                raise

    def read(self) -> bytes:
        """In the process that made it: every report the children sent
        since the last call (b'' elsewhere, or once closed)."""
        if self._r < 0 or self.in_child():
            return b""
        chunks = []
        while True:
            try:
                data = os.read(self._r, 4096)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)

    def lost(self) -> int:
        """Reports that found the pipe full, so far (0 in a child)."""
        if self.in_child() or self._lost.closed:
            return 0
        n: int = struct.unpack_from("=Q", self._lost)[0]
        return n

    def newly_lost(self) -> int:
        """Reports lost since the last call (for a warning when it is not
        0); 0 in a child."""
        n = self.lost()
        new, self._lost_seen = max(0, n - self._lost_seen), max(n, self._lost_seen)
        return new

    def close(self) -> None:
        """In the process that made it: close the pipe and the counter
        (read what you need first).  Elsewhere: forget them."""
        if not self.in_child():
            for fd in (self._r, self._w):
                if fd >= 0:
                    os.close(fd)
            self._lost.close()
        self._r = self._w = -1
