"""The pure-Python twin of ``fastlisten._core``: the same RawListener API
built on the standard library's ``socket`` and ``select`` modules.

Used when the extension is absent or ``FASTLISTEN_NO_EXTENSIONS=1``.  Every
test runs against both; a behaviour difference between them is a bug.
"""

from __future__ import annotations

import errno
import os
import select
import struct
import signal
import socket as _socket
import threading
from time import monotonic
from typing import Any, Dict, List, Optional, Tuple

from fastlisten._coreshared import (
    BACKOFF_FIRST_MS, BACKOFF_MAX_MS, CAPACITY, ERRNO_SLOTS, IGNORABLE, MAX_WAIT_MS,
    check_max, closed_error, remaining, timeout_ms,
)
from fastlisten._wakeup import Waker
from fastlisten.address import check_numeric, decode_unix_path

__all__ = ["RawListener"]

#: The head of Linux's struct tcp_info (<linux/tcp.h>), as far as queue()
#: reads it: on a listener, tcpi_unacked is the accept queue's length and
#: tcpi_sacked its effective size (what the compiled core reads by name).
_TCP_INFO_FIELDS = ("state", "ca_state", "retransmits", "probes", "backoff", "options",
                    "wscale", "flags", "rto", "ato", "snd_mss", "rcv_mss", "unacked",
                    "sacked")
_TCP_INFO_HEAD = struct.Struct("=8B6I")

_POLLIN = select.POLLIN
_POLLNVAL = select.POLLNVAL


class RawListener:
    """A listening socket's descriptor (pure-Python core).

    RawListener(family=AF_INET, type=SOCK_STREAM, proto=0, fileno=None, owned=True)

    See ``fastlisten._core.RawListener``; this class behaves the same.
    """

    def __init__(self, family: int = _socket.AF_INET, type: int = _socket.SOCK_STREAM,
                 proto: int = 0, fileno: Optional[int] = None, *, owned: bool = True) -> None:
        self._sock: Optional[_socket.socket] = None
        self._waker: Optional[Waker] = None
        self._sig: Optional[Waker] = None   # the signal.set_wakeup_fd pipe
        self.family = int(family)
        self.type = int(type)
        self.proto = int(proto)
        self._owned = owned if fileno is not None else True
        self._lock = threading.Lock()
        self._busy = 0
        # Wake-up generations, as in the compiled core (under _lock): the
        # calls in flight when a wake-up is seen (_old of them still inside)
        # each return once; the last of them clears it; calls that start
        # meanwhile wait on _parked, not on the descriptor.
        self._gen = 0
        self._old = 0
        self._again = False
        self._parked = threading.Condition(self._lock)
        self._close_pending = False
        self._backoff_ms = BACKOFF_FIRST_MS
        self._accepted = self._batches = self._max_batch = 0
        self._capacity_episodes = 0
        self._in_capacity_episode = False
        self._last_capacity_errno = 0
        self._errors: Dict[int, int] = {}
        self._waker = Waker()
        try:
            # Made now, not at the first wait: a process out of descriptors
            # must still be able to accept once one is free.
            self._sig = Waker(pipe=True)
        except BaseException:
            self._close_wakeup()
            raise
        try:
            if fileno is None:
                sock = _socket.socket(family, type, proto)
            else:
                if fileno < 0:
                    raise ValueError(f"negative file descriptor: {fileno}")
                sock = _socket.socket(family, type, proto, fileno=fileno)
            try:
                sock.setblocking(False)
            except BaseException:
                if self._owned:
                    sock.close()
                else:
                    sock.detach()
                raise
        except BaseException:
            self._close_wakeup()
            raise
        self._sock = sock

    # -- lifecycle -----------------------------------------------------

    def _close_wakeup(self) -> None:
        for waker in (self._waker, self._sig):
            if waker is not None:
                waker.close()
        self._waker = self._sig = None

    def _close_now(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._owned:
                sock.close()
            else:
                sock.detach()
        self._close_wakeup()

    def _open_sock(self) -> _socket.socket:
        if self._sock is None or self._close_pending:
            raise closed_error()
        return self._sock

    def __del__(self) -> None:
        try:
            self._close_now()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    @property
    def closed(self) -> bool:
        """True once close() was called."""
        return self._sock is None or self._close_pending

    def fileno(self) -> int:
        """The listening descriptor, or -1 once closed (like socket.fileno)."""
        return -1 if self.closed else self._sock.fileno()  # type: ignore[union-attr]

    def close(self) -> None:
        """Close the listener (and its wake-up descriptor).  Idempotent; see
        the compiled core for what happens while accept_many is waiting."""
        with self._lock:
            if self._sock is None:
                return
            if self._busy:
                self._close_pending = True
                self._waker.wakeup()    # type: ignore[union-attr]
                self._parked.notify_all()
                return
            self._close_now()

    def detach(self) -> int:
        """Stop owning the descriptor and return it (like socket.detach)."""
        if self._busy:
            raise OSError(errno.EBUSY, "cannot detach while accept_many is waiting")
        fd = self._sock.fileno() if self._sock is not None else -1
        self._owned = False
        self._close_now()
        return fd

    # -- set-up --------------------------------------------------------

    def setsockopt(self, level: int, option: int, value: int) -> None:
        """setsockopt(2) with an int value."""
        self._open_sock().setsockopt(level, option, int(value))

    def getsockopt(self, level: int, option: int) -> int:
        """getsockopt(2) for an int value."""
        return self._open_sock().getsockopt(level, option)

    def bind(self, address: Any) -> None:
        """bind(2) to a numeric address: (host, port), (host, port, flow, scope) or a path."""
        sock = self._open_sock()
        sock.bind(check_numeric(self.family, address))

    def listen(self, backlog: int) -> None:
        """listen(2); a negative backlog is clamped to 0, as socket.listen does."""
        self._open_sock().listen(max(int(backlog), 0) if isinstance(backlog, int) else backlog)

    def getsockname(self) -> Any:
        """The bound address, in the stdlib's form."""
        name = self._open_sock().getsockname()
        if self.family == _socket.AF_UNIX and isinstance(name, bytes):
            return decode_unix_path(name)
        return name

    def queue(self) -> Tuple[int, int]:
        """(queued, backlog): the accept queue now and its effective size (TCP_INFO)."""
        sock = self._open_sock()
        if not hasattr(_socket, "TCP_INFO"):
            raise OSError(errno.ENOPROTOOPT, os.strerror(errno.ENOPROTOOPT))
        info = sock.getsockopt(_socket.IPPROTO_TCP, _socket.TCP_INFO, _TCP_INFO_HEAD.size)
        fields = dict(zip(_TCP_INFO_FIELDS, _TCP_INFO_HEAD.unpack_from(info)))
        return fields["unacked"], fields["sacked"]

    # -- the loop ------------------------------------------------------

    def wakeup(self) -> None:
        """Make a blocked (or the next) accept_many return at once.  Thread-safe.

        Every call waiting when the wake-up is seen returns once (an empty
        batch); calls made after that wait for connections again.
        """
        with self._lock:
            if self._waker is None:
                return
            if self._old > 0:
                self._again = True    # for the calls parked meanwhile
            else:
                self._waker.wakeup()

    def _leave(self, gen: int) -> None:
        """Bookkeeping when an accept_many call of generation gen returns
        (with _lock held)."""
        self._busy -= 1
        if gen == self._gen or self._old == 0:
            return
        self._old -= 1
        if self._old > 0:
            return
        # The last call the wake-up was for is out.
        if self._again:
            # another came during the delivery: for the parked calls (or, if
            # none, the next call), so the descriptor stays set
            self._again = False
            self._gen += 1
            self._old = self._busy
        elif self._waker is not None:
            self._waker.drain()
        self._parked.notify_all()

    def _park(self, gen: int, deadline: Optional[float]) -> None:
        """With _lock held: wait while a wake-up is being delivered to calls
        that started before this one (see the compiled core)."""
        while self._old > 0 and gen == self._gen and not self._close_pending:
            if deadline is None:
                self._parked.wait()
            else:
                left = deadline - monotonic()
                if left <= 0:
                    return
                self._parked.wait(left)

    def _count_error(self, err: int) -> None:
        slot = err if 0 <= err < ERRNO_SLOTS else ERRNO_SLOTS - 1
        self._errors[slot] = self._errors.get(slot, 0) + 1

    def accept_many(self, max: int = 64, timeout: Optional[float] = None
                    ) -> List[Tuple[_socket.socket, Any]]:
        """Wait for connections and accept up to ``max`` of them (see the
        compiled core's docstring: the same contract)."""
        check_max(max)
        ms = timeout_ms(timeout)
        deadline = None if ms < 0 else monotonic() + timeout  # type: ignore[operator]
        with self._lock:            # so that close() cannot slip in between
            sock = self._open_sock()
            gen = self._gen
            self._busy += 1
        out: List[Tuple[_socket.socket, Any]] = []
        err = 0
        try:
            with self._lock:
                if self._old > 0:
                    self._park(gen, deadline)
                ready = self._old == 0 and gen == self._gen and not self._close_pending
            if ready:
                lfd, wfd = sock.fileno(), self._waker.fileno()  # type: ignore[union-attr]
                poller = select.poll()
                poller.register(lfd, _POLLIN)
                poller.register(wfd, _POLLIN)
                events = self._wait(poller, ms, deadline)
                if self._close_pending:
                    events = {}         # closed meanwhile: nothing to take
                if wfd in events:
                    with self._lock:
                        if gen == self._gen:
                            # The first to see this wake-up: it is for every
                            # call in flight now; the last of them clears it.
                            self._gen += 1
                            self._old = self._busy
                elif lfd in events:
                    if events[lfd] & _POLLNVAL:
                        err = errno.EBADF
                    else:
                        err = self._drain(sock, max, out)
        finally:
            with self._lock:
                self._leave(gen)
                closing, last = self._close_pending, self._busy == 0
        if closing:
            # closed while we waited: every waiter raises, the last one out
            # closes the descriptor
            for s, _ in out:
                s.close()
            if last:
                with self._lock:
                    self._close_now()
            raise closed_error()
        if not out:
            if err == 0:
                return out
            if err in CAPACITY:
                pause = self._backoff_ms if ms < 0 else min(self._backoff_ms, ms)
                select.select([self._waker.fileno()], [], [], pause / 1000)  # type: ignore[union-attr]
                self._backoff_ms = min(self._backoff_ms * 2, BACKOFF_MAX_MS)
                return out
            raise OSError(err, os.strerror(err))
        self._backoff_ms = BACKOFF_FIRST_MS
        return out

    def _wait(self, poller: "select.poll", ms: int, deadline: Optional[float]
              ) -> Dict[int, int]:
        """poll() the listener and the wake-up descriptor, as the C core does.

        select.poll retries EINTR itself (PEP 475) after running the Python
        signal handlers.  A signal that arrives after the interpreter last
        ran handlers but before poll() starts would be lost until the next
        connection; in the main thread, a signal.set_wakeup_fd pipe polled
        alongside closes that gap (unless the application already set its
        own wake-up fd, as asyncio does: then its fd is left alone).
        """
        sig_r = self._arm_signal_pipe()
        try:
            if sig_r >= 0:
                poller.register(sig_r, _POLLIN)
            while True:
                events = dict(poller.poll(ms))
                if not events and ms == MAX_WAIT_MS and deadline is not None:
                    ms = timeout_ms(remaining(deadline))
                    if ms > 0:
                        continue    # one step of a very long wait ended
                if sig_r not in events:
                    return events
                # the handlers ran as poll() returned; none raised: go on
                self._sig.drain()   # type: ignore[union-attr]
                del events[sig_r]
                if events:
                    return events
                if deadline is not None:
                    ms = timeout_ms(remaining(deadline))
        finally:
            if sig_r >= 0:
                signal.set_wakeup_fd(-1)

    def _arm_signal_pipe(self) -> int:
        """Make our pipe the signal wake-up fd; -1 if that is not ours to do."""
        if threading.current_thread() is not threading.main_thread():
            return -1
        sig = self._sig
        assert sig is not None
        previous = signal.set_wakeup_fd(sig.write_fileno(), warn_on_full_buffer=False)
        if previous not in (-1, sig.write_fileno()):
            signal.set_wakeup_fd(previous)
            return -1
        return sig.fileno()

    def _drain(self, sock: _socket.socket, max: int,
               out: List[Tuple[_socket.socket, Any]]) -> int:
        """accept until EAGAIN or max; returns the errno that stopped early, or 0."""
        family, proto = self.family, self.proto
        err = 0
        try:
            while len(out) < max:
                try:
                    fd, addr = sock._accept()  # type: ignore[attr-defined]
                except BlockingIOError:
                    break
                except OSError as exc:
                    e = exc.errno or 0
                    self._count_error(e)
                    if e in IGNORABLE:
                        continue
                    if e in CAPACITY:
                        self._last_capacity_errno = e
                        if not self._in_capacity_episode:
                            self._in_capacity_episode = True
                            self._capacity_episodes += 1
                    err = e
                    break
                try:
                    conn = _socket.socket(family, _socket.SOCK_STREAM, proto, fd)
                except BaseException:
                    os.close(fd)
                    raise
                if family == _socket.AF_UNIX and isinstance(addr, bytes):
                    addr = decode_unix_path(addr)
                out.append((conn, addr))
        except BaseException:
            for s, _ in out:
                s.close()
            del out[:]
            raise
        n = len(out)
        if n:
            self._accepted += n
            self._batches += 1
            if n > self._max_batch:
                self._max_batch = n
            if err == 0:
                self._in_capacity_episode = False
        return err

    # -- counters ------------------------------------------------------

    @property
    def capacity_episodes(self) -> int:
        """How many runs of capacity errors (EMFILE, ...) accept has met."""
        return self._capacity_episodes

    @property
    def last_capacity_errno(self) -> int:
        """The errno of the latest capacity error, 0 if none."""
        return self._last_capacity_errno

    def stats(self) -> Dict[str, Any]:
        """Counters: accepted, batches, max_batch, capacity_episodes, errors {errno: n}."""
        return {
            "accepted": self._accepted,
            "batches": self._batches,
            "max_batch": self._max_batch,
            "capacity_episodes": self._capacity_episodes,
            "errors": dict(sorted(self._errors.items())),
        }

    def __repr__(self) -> str:
        return f"<fastlisten._corepy.RawListener fd={self.fileno()} family={self.family}>"
