"""The pure-Python twin of ``fastlisten._core``: the same RawListener API
built on the standard library's ``socket`` and ``select`` modules.

Used when the extension is absent or ``FASTLISTEN_NO_EXTENSIONS=1``.  Every
test runs against both; a behaviour difference between them is a bug.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket as _socket
import struct
import threading
from time import monotonic
from typing import Any, Dict, List, Optional, Tuple

from fastlisten._corepy_proxy import crc32c, proxy_parse, proxy_read
from fastlisten._corepy_streams import SocketReader, SocketWriter
from fastlisten._coreshared import (
    BACKOFF_FIRST_MS,
    BACKOFF_MAX_MS,
    CAPACITY,
    DEFAULT_BATCH,
    ERRNO_SLOTS,
    IGNORABLE,
    MAX_WAIT_MS,
    c_int,
    check_max,
    closed_error,
    remaining,
    timeout_ms,
)
from fastlisten._wakeup import Waker
from fastlisten.address import check_numeric, decode_unix_path

__all__ = ["RawListener", "Waiter", "Stop", "proxy_parse", "proxy_read", "crc32c",
           "SocketReader", "SocketWriter"]

#: The head of Linux's struct tcp_info (<linux/tcp.h>), as far as queue()
#: reads it: on a listener, tcpi_unacked is the accept queue's length and
#: tcpi_sacked its effective size (what the compiled core reads by name).
_TCP_INFO_FIELDS = ("state", "ca_state", "retransmits", "probes", "backoff", "options",
                    "wscale", "flags", "rto", "ato", "snd_mss", "rcv_mss", "unacked",
                    "sacked")
_TCP_INFO_HEAD = struct.Struct("=8B6I")

_POLLIN = select.POLLIN
_POLLNVAL = select.POLLNVAL


class _EpollPoller:
    """select.epoll with the register/unregister/poll(ms) of select.poll,
    as RawListener._wait uses it."""

    def __init__(self) -> None:
        self.ep = select.epoll()

    def register(self, fd: int, events: int) -> None:
        self.ep.register(fd, events)

    def unregister(self, fd: int) -> None:
        self.ep.unregister(fd)

    def poll(self, ms: int) -> List[Tuple[int, int]]:
        return self.ep.poll(-1 if ms < 0 else ms / 1000)


class Stop:
    """The stop of a group of leader/follower waiters (see
    ``fastlisten._core.Stop``; this class behaves the same): fence()
    returns once none of their accept_many calls can touch the listening
    descriptor any more; set() is fence() and wakes the waiting ones."""

    def __init__(self) -> None:
        self._waker: Optional[Waker] = Waker()
        self._lock = threading.Lock()
        self._out = threading.Condition(self._lock)   # fence() waits on it
        self._fenced = False
        self._woken = False
        self._inside = 0        # waiters touching the listening descriptor now
        self._users = 0         # open waiters made with this stop
        self._close_pending = False

    def fileno(self) -> int:
        """The descriptor set() makes readable; -1 once closed."""
        return -1 if self._waker is None else self._waker.fileno()

    @property
    def fenced(self) -> bool:
        """True once fence() or set() was called."""
        return self._fenced

    def fence(self) -> None:
        """Keep every waiter made with this stop off the listening
        descriptor from now on (see the compiled core)."""
        with self._lock:
            self._fenced = True
            while self._inside:
                self._out.wait()

    def set(self) -> None:
        """fence(), and wake every waiting one."""
        self.fence()
        with self._lock:
            if not self._woken and self._waker is not None:
                self._woken = True
                self._waker.wakeup()

    def wakeup(self) -> None:
        """set(), under the name shutdown() calls on a loop's wake-up source."""
        self.set()

    def close(self) -> None:
        """Close the descriptor, now or when the last waiter made with this
        stop is closed.  Idempotent."""
        with self._lock:
            self._close_pending = True
            if self._users == 0:
                self._close_now()

    def _close_now(self) -> None:
        waker, self._waker = self._waker, None
        if waker is not None:
            waker.close()

    def __del__(self) -> None:
        try:
            self._close_now()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def _enter(self) -> bool:
        """True: the caller may touch the listening descriptor (then _leave());
        False: set() was called."""
        with self._lock:
            if self._fenced:
                return False
            self._inside += 1
            return True

    def _leave(self) -> None:
        with self._lock:
            self._inside -= 1
            if not self._inside and self._fenced:
                self._out.notify_all()

    def _retain(self) -> int:
        """A waiter is made with this stop: its descriptor (-1 once set and
        closed: that waiter only stops)."""
        with self._lock:
            if self._waker is None and not self._fenced:
                raise ValueError("that stop is closed")
            self._users += 1
            return self.fileno()

    def _release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0 and self._close_pending:
                self._close_now()

    def __repr__(self) -> str:
        return (f"<fastlisten._corepy.Stop fd={self.fileno()} fenced={self._fenced} "
                f"woken={self._woken} waiters={self._users}>")


class Waiter:
    """One thread's way to wait in ``RawListener.accept_many(..., waiter=)``
    (see ``fastlisten._core.Waiter``; this class behaves the same): an
    epoll object watching the listener (EPOLLEXCLUSIVE where the kernel has
    it), the listener's wake-up descriptor and ``stop_fd`` (or a Stop's)."""

    def __init__(self, listener: "RawListener", lfd: int, wake_r: int, stop: Any) -> None:
        self._listener = listener
        self._stop: Optional[Stop] = stop if isinstance(stop, Stop) else None
        self.stop_fd = c_int(stop, "stop") if self._stop is None else -1
        self.exclusive = False
        self._poller: Optional[_EpollPoller] = _EpollPoller()
        ep = self._poller.ep
        try:
            if self._stop is not None:
                self.stop_fd = self._stop._retain()
            try:
                # the listener only while the stop lets this thread touch it
                if self._stop is None or self._stop._enter():
                    try:
                        self._register_listener(ep, lfd)
                    finally:
                        if self._stop is not None:
                            self._stop._leave()
                ep.register(wake_r, select.EPOLLIN)
                if self.stop_fd >= 0:
                    ep.register(self.stop_fd, select.EPOLLIN)
            except BaseException:
                if self._stop is not None:
                    self._stop._release()
                raise
        except BaseException:
            ep.close()
            self._poller = None
            raise

    def _register_listener(self, ep: "select.epoll", lfd: int) -> None:
        flag = getattr(select, "EPOLLEXCLUSIVE", 0)
        if flag:
            try:
                ep.register(lfd, select.EPOLLIN | flag)
                self.exclusive = True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
        if not self.exclusive:
            ep.register(lfd, select.EPOLLIN)

    def fileno(self) -> int:
        """The epoll descriptor, -1 once closed."""
        return -1 if self._poller is None else self._poller.ep.fileno()

    def close(self) -> None:
        """Close the epoll descriptor.  Idempotent."""
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.ep.close()
            if self._stop is not None:
                self._stop._release()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def __repr__(self) -> str:
        return (f"<fastlisten._corepy.Waiter epfd={self.fileno()} stop_fd={self.stop_fd} "
                f"exclusive={self.exclusive}>")


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
        # Counters; updated under _counting: leader/follower waiters drain
        # at the same time (as the compiled core's atomics).
        self._counting = threading.Lock()
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
        self._open_sock().setsockopt(level, option, c_int(value, "value"))

    def getsockopt(self, level: int, option: int) -> int:
        """getsockopt(2) for an int value."""
        return self._open_sock().getsockopt(level, option)

    def bind(self, address: Any) -> None:
        """bind(2) to a numeric address: (host, port), (host, port, flow, scope) or a path."""
        sock = self._open_sock()
        sock.bind(check_numeric(self.family, address))

    def listen(self, backlog: int) -> None:
        """listen(2); a negative backlog is clamped to 0, as socket.listen does."""
        self._open_sock().listen(max(c_int(backlog, "backlog"), 0))

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
        with self._counting:
            self._errors[slot] = self._errors.get(slot, 0) + 1
            if err in CAPACITY:
                self._last_capacity_errno = err
                if not self._in_capacity_episode:
                    self._in_capacity_episode = True
                    self._capacity_episodes += 1

    def new_stop(self) -> Stop:
        """A :class:`Stop` for this listener's waiters (of this core)."""
        return Stop()

    def waiter(self, stop: Any = -1) -> Waiter:
        """A :class:`Waiter` for one thread's ``accept_many(..., waiter=)``
        calls on this listener (see the compiled core).  ``stop``: a
        :class:`Stop`, or a descriptor (-1: none)."""
        sock = self._open_sock()
        return Waiter(self, sock.fileno(), self._waker.fileno(), stop)  # type: ignore[union-attr]

    def accept_many(self, max: int = DEFAULT_BATCH, timeout: Optional[float] = None,
                    waiter: Optional[Waiter] = None) -> List[Tuple[_socket.socket, Any]]:
        """Wait for connections and accept up to ``max`` of them (see the
        compiled core's docstring: the same contract)."""
        if waiter is not None:
            if waiter._listener is not self:
                raise ValueError("that waiter belongs to another listener")
            if waiter._poller is None:
                raise ValueError("that waiter is closed")
            if waiter._stop is not None and waiter._stop._fenced:
                return []       # stopped: at once, whatever is queued
        max = check_max(max)
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
            gate = waiter._stop if waiter is not None else None
            if ready and gate is not None:
                # what is queued already is taken before any wait (inside
                # the gate, as the compiled core does)
                if not gate._enter():
                    ready = False       # stopped: touch nothing
                else:
                    try:
                        err = self._drain(sock, max, out)
                    finally:
                        gate._leave()
                    ready = not out and not err
            while ready:
                lfd, wfd = sock.fileno(), self._waker.fileno()  # type: ignore[union-attr]
                if waiter is None:
                    poller: Any = select.poll()
                    poller.register(lfd, _POLLIN)
                    poller.register(wfd, _POLLIN)
                else:
                    poller = waiter._poller
                events = self._wait(poller, ms, deadline)
                ready = False
                if self._close_pending or (waiter is not None and waiter.stop_fd in events):
                    events = {}         # closed meanwhile, or stopped: nothing to take
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
                    elif gate is not None and not gate._enter():
                        break       # stopped since the wait returned: touch nothing
                    else:
                        try:
                            err = self._drain(sock, max, out)
                        finally:
                            if gate is not None:
                                gate._leave()
                    if waiter is not None and not out and not err:
                        # another waiter took it: wait again for the time left
                        if deadline is not None:
                            ms = timeout_ms(remaining(deadline))
                        ready = ms != 0
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
                poller.unregister(sig_r)

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
            with self._counting:
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
