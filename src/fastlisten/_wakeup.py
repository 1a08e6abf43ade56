"""A wake-up descriptor for loops that wait in poll()/select()."""

from __future__ import annotations

import os


class Waker:
    """An eventfd (or a non-blocking pipe) that wakeup() makes readable."""

    def __init__(self, pipe: bool = False) -> None:
        if hasattr(os, "eventfd") and not pipe:
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._r = self._w = fd
        else:
            self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def fileno(self) -> int:
        return self._r

    def write_fileno(self) -> int:
        return self._w

    def wakeup(self) -> None:
        try:
            os.write(self._w, (1).to_bytes(8, "little"))
        except (BlockingIOError, OSError):
            pass

    def drain(self) -> None:
        try:
            while os.read(self._r, 64):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        for fd in {self._r, self._w} - {-1}:
            os.close(fd)
        self._r = self._w = -1
