"""A wake-up descriptor for loops that wait in poll()/select()."""

from __future__ import annotations

import os
import signal
from typing import Optional


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


class SignalWakeup:
    """For a wait in poll() in the main thread: while entered, a pipe of
    its own is the interpreter's ``signal.set_wakeup_fd``, so that a signal
    arriving at any instant (in any thread, or in this one just before its
    poll() began, after the interpreter last ran the handlers) makes
    :attr:`fd` readable, and the wait ends; the Python handlers run as soon
    as the waiting thread runs Python again.  :attr:`fd` is -1 (nothing to
    watch) outside the main thread, or when the application has a wake-up
    descriptor of its own (asyncio's): that one is left alone."""

    def __init__(self) -> None:
        self.fd = -1
        self._pipe: Optional[Waker] = None

    def __enter__(self) -> "SignalWakeup":
        try:
            pipe = Waker(pipe=True)
        except OSError:
            return self         # out of descriptors: the wait's timeout stays the bound
        try:
            previous = signal.set_wakeup_fd(pipe.write_fileno(), warn_on_full_buffer=False)
        except ValueError:      # not the main thread of the main interpreter
            pipe.close()
            return self
        if previous != -1:
            signal.set_wakeup_fd(previous)
            pipe.close()
            return self
        self._pipe, self.fd = pipe, pipe.fileno()
        return self

    def drain(self) -> None:
        """Empty the pipe once the wait saw it readable."""
        if self._pipe is not None:
            self._pipe.drain()

    def __exit__(self, *exc: object) -> None:
        pipe, self._pipe, self.fd = self._pipe, None, -1
        if pipe is not None:
            signal.set_wakeup_fd(-1)
            pipe.close()
