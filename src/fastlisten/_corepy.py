"""The pure-Python twin of ``fastlisten._core``: the same RawListener API
built on the standard library's ``socket`` and ``select`` modules.

Used when the extension is absent or ``FASTLISTEN_NO_EXTENSIONS=1``.  Every
test runs against both; a behaviour difference between them is a bug.
"""

from __future__ import annotations

import collections
import errno
import os
import select
import signal
import socket as _socket
import struct
import threading
import weakref
from time import monotonic
from typing import Any, Dict, List, Optional, Tuple

from fastlisten import proxy as _proxy
from fastlisten._corepy_proxy import _proxy_parse, crc32c, proxy_parse, proxy_read
from fastlisten._corepy_streams import SocketReader, SocketWriter
from fastlisten._coreshared import (
    BACKOFF_FIRST_MS,
    BACKOFF_MAX_MS,
    CAPACITY,
    DEFAULT_BATCH,
    DEFAULT_MAX_WAITING,
    DEFAULT_READY_MAX_BYTES,
    DEFAULT_READY_TIMEOUT,
    DROP_REASONS,
    ERRNO_SLOTS,
    IGNORABLE,
    MAX_WAIT_MS,
    TLS_RECORD_MAX,
    VERDICTS,
    c_int,
    check_filter,
    check_max,
    check_min_rate,
    closed_error,
    remaining,
    timeout_ms,
)
from fastlisten._wakeup import Waker
from fastlisten.address import check_numeric, decode_unix_path

__all__ = ["RawListener", "Waiter", "Stop", "proxy_parse", "proxy_read", "crc32c",
           "SocketReader", "SocketWriter", "ready_check"]

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
        #: Their epoll objects that watch the listener, by id: the listener's fd.
        self._watching: Dict[int, Tuple[Any, int]] = {}

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
            # Off the listener's wait queue too (see the compiled core's
            # Stop.fence): a thread still asleep in a fenced waiter must not
            # take the one wake-up EPOLLEXCLUSIVE gives a new connection
            # from one that accepts.
            watching, self._watching = self._watching, {}
        for ep, lfd in watching.values():
            try:
                ep.unregister(lfd)
            except (OSError, ValueError):   # ValueError: closed meanwhile
                pass

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
        self._filtered = False      # its epoll set watches the listener's accept filter
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
                        if self._stop is not None:      # before fence() can look
                            self._stop._watching[id(ep)] = (ep, lfd)
                    finally:
                        if self._stop is not None:
                            self._stop._leave()
                ep.register(wake_r, select.EPOLLIN)
                if self.stop_fd >= 0:
                    ep.register(self.stop_fd, select.EPOLLIN)
                if listener._filtering:
                    ep.register(listener._filter.fileno(),  # type: ignore[union-attr]
                                select.EPOLLIN)
                    self._filtered = True
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
            if self._stop is not None:
                self._stop._watching.pop(id(poller.ep), None)
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
        self._filter: Optional[_Filter] = None     # set_accept_filter's
        self._filtering = False
        self._accepting = True      # set_accepting's
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
        if self._filter is not None:
            self._filter.shut()
            self._filtering = False

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

    def set_accept_filter(self, rule: str, timeout: float = DEFAULT_READY_TIMEOUT,
                          max_bytes: int = DEFAULT_READY_MAX_BYTES,
                          max_waiting: int = DEFAULT_MAX_WAITING, proxy: int = 0,
                          proxy_max_v2: int = _proxy.DEFAULT_MAX_V2, min_rate: int = 0) -> None:
        """Make accept_many return only connections that are *ready* (see
        the compiled core's docstring: the same contract).  This twin keeps
        a socket object per waiting connection; the compiled core keeps
        none.  Leader/follower waiters must be made after it."""
        code, ms, mb, cap, versions, max_v2 = check_filter(
            rule, timeout, max_bytes, max_waiting, proxy, proxy_max_v2)
        rate = check_min_rate(min_rate)
        self._open_sock()
        if self._busy:
            raise OSError(errno.EBUSY, "cannot change the accept filter while accept_many "
                                       "is waiting")
        if self._filter is None:
            self._filter = _Filter()
            _FILTERED.add(self)
        self._filter.configure(code, ms, mb, cap, versions, max_v2)
        with self._filter.lock:
            self._filter.min_rate = rate
        self._filtering = code != 0 or versions != 0

    def set_accepting(self, on: bool) -> None:
        """False: accept_many takes no new connection from the kernel's
        queue, only those waiting in the accept filter as they become
        ready (none without a filter, nor with a waiter); True again: as
        before (see the compiled core: the same contract)."""
        self._accepting = bool(on)

    def close_waiting(self) -> int:
        """Close every connection waiting in the accept filter ('shutdown')
        and return how many; the listener stays open (see the compiled
        core: the same contract)."""
        filt = self._filter
        return 0 if filt is None else filt.clear(_DROP["shutdown"])

    def forget_filter_after_fork(self) -> int:
        """In a process just forked: let go of the connections waiting in
        the parent's accept filter and of its epoll set, closed without
        unregistering (see the compiled core: the same contract; runs by
        itself after every os.fork)."""
        filt = self._filter
        return 0 if filt is None else filt.forget()

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
        filt = self._filter if self._filtering else None
        if not self._accepting and (filt is None or waiter is not None):
            self._open_sock()
            return []           # nothing to take but what the filter holds
        if waiter is not None:
            if filt is not None and not waiter._filtered:
                raise ValueError("that waiter was made before set_accept_filter: make "
                                 "waiters after setting the filter")
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
                # the gate, as the compiled core does; through the filter,
                # with what it has ready, if there is one)
                if filt is not None:
                    if gate._fenced:
                        ready = False   # stopped: touch nothing
                    else:
                        err = self._filter_work(sock, filt, True, True, gate, max, out)
                        ready = not out and not err
                elif not gate._enter():
                    ready = False       # stopped: touch nothing
                else:
                    try:
                        err = self._drain(sock, max, out)
                    finally:
                        gate._leave()
                    ready = not out and not err
            while ready and filt is not None:
                ready, err = self._filtered_round(sock, filt, gen, max, ms, deadline, out,
                                                  waiter)
            while ready and filt is None:
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

    def _filtered_round(self, sock: _socket.socket, filt: "_Filter", gen: int, max: int,
                        ms: int, deadline: Optional[float],
                        out: List[Tuple[_socket.socket, Any]],
                        waiter: Optional[Waiter] = None) -> Tuple[bool, int]:
        """One wait of accept_many on a filtering listener (the compiled
        core's fl_filter_wait_accept): poll the listener, the wake-up
        descriptor and the filter's epoll set until the earlier of the
        call's deadline and the oldest waiting connection's; judge what
        became readable, accept what is queued, expire what is overdue.
        With a waiter, on its epoll set (fl_filter_wait_accept_ep).
        Returns (wait again, errno that ended the batch)."""
        lfd, wfd = sock.fileno(), self._waker.fileno()  # type: ignore[union-attr]
        gate = waiter._stop if waiter is not None else None
        poller: Any
        if waiter is None:
            poller = select.poll()
            if self._accepting:     # (else the filter's connections only)
                poller.register(lfd, _POLLIN)
            poller.register(wfd, _POLLIN)
            poller.register(filt.fileno(), _POLLIN)
        else:
            poller = waiter._poller
        until = filt.next_deadline()
        if deadline is not None and (until is None or deadline < until):
            until = deadline
        wait_ms = ms if until is None else timeout_ms(remaining(until))
        events = self._wait(poller, wait_ms, until)
        if self._close_pending:
            return False, 0
        if waiter is not None and waiter.stop_fd >= 0 and waiter.stop_fd in events:
            return False, 0
        if wfd in events:
            with self._lock:
                if gen == self._gen:
                    self._gen += 1
                    self._old = self._busy
            return False, 0
        if events.get(lfd, 0) & _POLLNVAL:
            return False, errno.EBADF
        if gate is not None and gate._fenced:
            return False, 0
        err = self._filter_work(sock, filt, filt.fileno() in events, lfd in events, gate,
                                max, out)
        if out or err:
            return False, err
        if deadline is not None and remaining(deadline) <= 0:
            return False, 0
        return True, 0

    def _filter_work(self, sock: _socket.socket, filt: "_Filter", filt_ready: bool,
                     listener_ready: bool, gate: Optional[Stop], max: int,
                     out: List[Tuple[_socket.socket, Any]]) -> int:
        """Judge what the filter reports, accept what is queued (inside the
        gate, if any), expire what is overdue (fl_filter_round).  Returns
        the errno that ended the accepts, or 0."""
        err = 0
        with filt.lock:
            now = monotonic()
            if filt_ready:
                filt.events(out, max, now)
            if listener_ready and len(out) < max and (gate is None or gate._enter()):
                try:
                    err = self._drain(sock, max, out, filt, now)
                finally:
                    if gate is not None:
                        gate._leave()
            filt.made_ready(len(out))   # (before expiries: they begin the next run)
            filt.expire(now)
        self._count_batch(len(out), err)
        return err

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
               out: List[Tuple[_socket.socket, Any]], filt: Optional["_Filter"] = None,
               now: float = 0.0) -> int:
        """accept until EAGAIN or max; returns the errno that stopped early, or 0.
        With a filter (its lock held), only ready connections go to out;
        the others wait in it or are dropped."""
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
                if filt is not None and not filt.admit(conn, addr, now):
                    continue        # waits in the filter, or was dropped
                out.append((conn, addr))
        except BaseException:
            for s, _ in out:
                s.close()
            del out[:]
            raise
        n = len(out)
        if n and filt is None:
            self._count_batch(n, err)
        return err

    def _count_batch(self, n: int, err: int) -> None:
        """n >= 1 connections handed over in one batch (fl_stats_count_batch)."""
        if n:
            with self._counting:
                self._accepted += n
                self._batches += 1
                if n > self._max_batch:
                    self._max_batch = n
                if err == 0:
                    self._in_capacity_episode = False

    # -- counters ------------------------------------------------------

    @property
    def capacity_episodes(self) -> int:
        """How many runs of capacity errors (EMFILE, ...) accept has met."""
        return self._capacity_episodes

    @property
    def last_capacity_errno(self) -> int:
        """The errno of the latest capacity error, 0 if none."""
        return self._last_capacity_errno

    @property
    def drop_episodes(self) -> int:
        """How many runs of drops the accept filter has begun (see the
        compiled core)."""
        filt = self._filter
        return 0 if filt is None else filt.drop_runs

    def last_drop_episode(self) -> Tuple[int, Optional[str], bool, int]:
        """The latest run of drops: (drop_episodes, reason, ongoing, drops)
        (see the compiled core)."""
        filt = self._filter
        if filt is None or not filt.drop_runs:
            return (0, None, False, 0)
        return (filt.drop_runs, DROP_REASONS[filt.run_reason - 1], filt.dropping,
                filt.run_drops)

    def stats(self) -> Dict[str, Any]:
        """Counters: accepted, batches, max_batch, capacity_episodes, errors
        {errno: n}; and the accept filter's (see the compiled core)."""
        out = {
            "accepted": self._accepted,
            "batches": self._batches,
            "max_batch": self._max_batch,
            "capacity_episodes": self._capacity_episodes,
            "errors": dict(sorted(self._errors.items())),
        }
        filt = self._filter
        out.update(_Filter.counters(filt))
        return out

    def __repr__(self) -> str:
        return f"<fastlisten._corepy.RawListener fd={self.fileno()} family={self.family}>"


# -- the accept filter (the C core's csrc/fl_filter.c) --------------------

_RULE_NONE, _RULE_DATA, _RULE_LINE, _RULE_HTTP, _RULE_TLS = range(5)
_READY, _WAIT, _MALFORMED, _OVERSIZE, _CLOSED = 1, 0, -1, -2, -3
_DROP = {name: i for i, name in enumerate(DROP_REASONS, 1)}
#: Drops that neither begin nor end a run (health checks, scanners, asked for).
_NO_RUN = frozenset((_DROP["closed"], _DROP["reset"], _DROP["shutdown"]))


def _judge_line(p: bytes, eof: bool, max_bytes: int) -> int:
    if b"\n" in p[:max_bytes]:
        return _READY
    if len(p) >= max_bytes:
        return _OVERSIZE
    if eof:
        return _READY if p else _CLOSED
    return _WAIT


def _judge_http(p: bytes, eof: bool, max_bytes: int) -> int:
    look = p[:max_bytes]
    first = look.find(b"\n")
    if first >= 0:
        if b"HTTP/" not in look[:first]:
            return _READY           # HTTP/0.9: the request line is all
        if look.find(b"\n\n", first) >= 0 or look.find(b"\n\r\n", first) >= 0:
            return _READY
    if len(p) >= max_bytes:
        return _OVERSIZE
    if eof:
        return _READY if p else _CLOSED
    return _WAIT


def _judge_tls(p: bytes, eof: bool) -> int:
    m = len(p)
    if m >= 1 and p[0] != 22:
        return _MALFORMED
    if m >= 2 and p[1] != 3:
        return _MALFORMED
    if m >= 5:
        n = (p[3] << 8) | p[4]
        if not 4 <= n <= TLS_RECORD_MAX:
            return _MALFORMED
        if m >= 6 and p[5] != 1:
            return _MALFORMED
        if m >= 5 + n:
            return _READY
    return _CLOSED if eof else _WAIT


def _judge(buf: bytes, eof: bool, rule: int, max_bytes: int, proxy: int, max_v2: int) -> int:
    """fl_ready_judge: the verdict on a connection's first bytes."""
    if proxy:
        parsed = _proxy_parse(buf, proxy, max_v2)
        if type(parsed) is int:
            if parsed < 0:
                return _MALFORMED
            return _CLOSED if eof else _WAIT
        buf = buf[parsed.length:]
        if parsed.command == "LOCAL" and not buf:
            return _CLOSED if eof else _WAIT    # a health check: something must follow
    if rule == _RULE_DATA:
        return _READY if buf else (_CLOSED if eof else _WAIT)
    if rule == _RULE_LINE:
        return _judge_line(buf, eof, max_bytes)
    if rule == _RULE_HTTP:
        return _judge_http(buf, eof, max_bytes)
    if rule == _RULE_TLS:
        return _judge_tls(buf, eof)
    return _READY


def _peek_size(rule: int, max_bytes: int, proxy: int, max_v2: int) -> int:
    """fl_ready_peek_size: how much of a connection the judge may need."""
    head = {_RULE_DATA: 1, _RULE_LINE: max_bytes, _RULE_HTTP: max_bytes,
            _RULE_TLS: 5 + TLS_RECORD_MAX}.get(rule, 0)
    return (max(max_v2, _proxy.V1_MAX) if proxy else 0) + head + 1


def ready_check(data: Any, rule: str, max_bytes: int = DEFAULT_READY_MAX_BYTES,
                proxy: int = 0, proxy_max_v2: int = _proxy.DEFAULT_MAX_V2,
                eof: bool = False) -> str:
    """The accept filter's verdict on ``data``, the first bytes a connection
    sent (see the compiled core's docstring: the same contract)."""
    code, _, mb, _, versions, max_v2 = check_filter(rule, 1.0, max_bytes, 1, proxy,
                                                    proxy_max_v2)
    return VERDICTS[_judge(bytes(data), bool(eof), code, mb, versions, max_v2)]


class _Filter:
    """The waiting connections of one listener (csrc/fl_filter.c's
    fl_filter): an epoll set (edge-triggered: the bytes stay unread), the
    connections in accept order (which is deadline order: one timeout for
    all), and the counters.  Everything but counters() runs with ``lock``
    held."""

    def __init__(self) -> None:
        self.ep: Optional[select.epoll] = select.epoll()
        self.lock = threading.Lock()
        # fd -> (socket, address, deadline), oldest first
        self.waiting: "collections.OrderedDict[int, Tuple[_socket.socket, Any, float]]" = \
            collections.OrderedDict()
        self.rule = _RULE_NONE
        self.timeout = DEFAULT_READY_TIMEOUT
        self.max_bytes = DEFAULT_READY_MAX_BYTES
        self.cap = DEFAULT_MAX_WAITING
        self.proxy = 0
        self.max_v2 = _proxy.DEFAULT_MAX_V2
        self.peek = 1
        self.min_rate = 0               # bytes per second, 0: none
        self.seen = 0                   # what judge()'s peek showed last
        self.peak = self.entered = self.ready = 0
        self.dropped = [0] * (len(DROP_REASONS) + 1)
        # runs of drops (fl_filter_stats' drop_runs ...): begun, the latest's
        # first reason, whether it goes on, its drops so far
        self.drop_runs = 0
        self.run_reason = 0
        self.dropping = False
        self.run_drops = 0

    def fileno(self) -> int:
        return -1 if self.ep is None else self.ep.fileno()

    def configure(self, rule: int, ms: int, max_bytes: int, cap: int, proxy: int,
                  max_v2: int) -> None:
        with self.lock:
            if self.waiting:
                raise OSError(errno.EBUSY, "cannot change the accept filter while "
                                           "connections wait in it")
            self.rule, self.timeout, self.max_bytes, self.cap = rule, ms / 1000, max_bytes, cap
            self.proxy, self.max_v2 = proxy, max_v2
            self.peek = _peek_size(rule, max_bytes, proxy, max_v2)

    def next_deadline(self) -> Optional[float]:
        with self.lock:
            for _, _, deadline in self.waiting.values():
                return deadline
        return None

    def judge(self, conn: _socket.socket, eof: bool) -> Tuple[int, bool]:
        """(verdict, reset) from what MSG_PEEK shows of conn."""
        # With a timeout (socket.setdefaulttimeout), the socket module waits
        # before recv() even with MSG_DONTWAIT: non-blocking meanwhile.
        self.seen = 0
        timeout = conn.gettimeout()
        if timeout:
            conn.settimeout(0.0)
        try:
            data = conn.recv(self.peek, _socket.MSG_PEEK | _socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return (_CLOSED if eof else _WAIT), False
        except OSError:
            return _CLOSED, True
        finally:
            if timeout:
                conn.settimeout(timeout)
        if not data:
            return _CLOSED, False
        self.seen = len(data)
        return _judge(data, eof, self.rule, self.max_bytes, self.proxy, self.max_v2), False

    def drop(self, conn: _socket.socket, why: int) -> None:
        """Close conn, counted as ``why``, and the run of drops it begins
        or extends (fl_count_drop).  Counted first, as fl_drop_fd: a peer
        that sees its connection closed finds the drop counted."""
        self.dropped[why] += 1
        if why not in _NO_RUN:
            if not self.dropping:
                self.dropping = True
                self.run_reason = why
                self.run_drops = 0
                self.drop_runs += 1
            self.run_drops += 1
        conn.close()

    def drop_waiting(self, fd: int, conn: _socket.socket, why: int) -> None:
        """drop() a connection that waited (already out of self.waiting):
        out of the epoll set first, as fl_drop (csrc/fl_filter.c) says why:
        a descriptor of it alive elsewhere (a process forked meanwhile)
        would keep the registration, whose events would come under fd, the
        number of whichever connection gets it next."""
        if self.ep is not None:
            try:
                self.ep.unregister(fd)
            except (OSError, ValueError):
                pass
        self.drop(conn, why)

    def forget(self) -> int:
        """In a process just forked (fl_filter_forget): close the waiting
        connections' copies and the epoll set's, never unregistering (the
        epoll set is the parent's too); empty, with a new lock and epoll
        set.  How many were let go."""
        n = 0
        for conn, _, _ in self.waiting.values():
            conn.close()
            n += 1
        self.waiting = collections.OrderedDict()
        self.dropping = False
        self.lock = threading.Lock()    # the parent's holder is not here
        if self.ep is not None:
            self.ep.close()
            try:
                self.ep = select.epoll()
            except OSError:
                self.ep = None      # a connection that must wait: dropped ('error')
        return n

    def made_ready(self, n: int) -> None:
        """n >= 0 connections handed over by one round: a connection made
        ready ends a run of drops."""
        if n:
            self.ready += n
            self.dropping = False

    def admit(self, conn: _socket.socket, addr: Any, now: float) -> bool:
        """A connection just accepted: True if it is ready (the caller hands
        it over); else it waits here, or was closed and counted."""
        verdict, reset = self.judge(conn, False)
        if verdict == _READY:
            return True
        if verdict < 0:
            self.drop(conn, _DROP["reset"] if reset else -verdict)
            return False
        if len(self.waiting) >= self.cap:
            old_fd, (old, _, _) = self.waiting.popitem(last=False)
            self.drop_waiting(old_fd, old, _DROP["evicted"])
        try:
            self.ep.register(conn.fileno(),   # type: ignore[union-attr]
                             select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
        except (OSError, AttributeError):     # (AttributeError: no epoll set, forget())
            self.drop(conn, _DROP["error"])
            return False
        self.waiting[conn.fileno()] = (conn, addr, now + self.timeout)
        self.entered += 1
        if len(self.waiting) > self.peak:
            self.peak = len(self.waiting)
        return False

    def too_slow(self, deadline: float, now: float) -> bool:
        """Below the minimum rate (fl_too_slow): a connection not ready,
        whose peek showed self.seen bytes, has waited a second or more and
        sent fewer than min_rate bytes a second."""
        waited = now - (deadline - self.timeout)
        return bool(self.min_rate) and waited >= 1.0 and self.seen < self.min_rate * waited

    def events(self, out: List[Tuple[_socket.socket, Any]], max: int, now: float) -> None:
        """Judge what epoll reports; ready connections go to out (up to max)."""
        while max > len(out):
            want = min(max - len(out), 64)
            found = self.ep.poll(0, want)  # type: ignore[union-attr]
            for fd, mask in found:
                item = self.waiting.get(fd)
                if item is None:
                    continue
                conn, addr, deadline = item
                if mask & select.EPOLLERR:
                    del self.waiting[fd]
                    self.drop_waiting(fd, conn, _DROP["reset"])
                    continue
                verdict, reset = self.judge(conn, bool(mask & (select.EPOLLRDHUP
                                                               | select.EPOLLHUP)))
                if verdict == _WAIT:
                    if self.too_slow(deadline, now):
                        del self.waiting[fd]
                        self.drop_waiting(fd, conn, _DROP["slow"])
                    continue
                del self.waiting[fd]
                if verdict < 0:
                    self.drop_waiting(fd, conn, _DROP["reset"] if reset else -verdict)
                    continue
                self.ep.unregister(fd)  # type: ignore[union-attr]
                out.append((conn, addr))
            if len(found) < want:
                return

    def expire(self, now: float) -> None:
        """Close every connection whose deadline passed."""
        while self.waiting:
            fd, (conn, _, deadline) = next(iter(self.waiting.items()))
            if deadline > now:
                return
            del self.waiting[fd]
            self.drop_waiting(fd, conn, _DROP["expired"])

    def clear(self, why: int) -> int:
        """Close every waiting connection, counted as ``why``; how many."""
        n = 0
        with self.lock:
            while self.waiting:
                fd, (conn, _, _) = self.waiting.popitem(last=False)
                self.drop_waiting(fd, conn, why)
                n += 1
        return n

    def shut(self) -> None:
        """Close every waiting connection ('shutdown') and the epoll set."""
        self.clear(_DROP["shutdown"])
        ep, self.ep = self.ep, None
        if ep is not None:
            ep.close()

    @staticmethod
    def counters(filt: Optional["_Filter"]) -> Dict[str, Any]:
        """stats()'s filter counters (zeros without a filter)."""
        if filt is None:
            return {"waiting": 0, "waiting_peak": 0, "waited": 0, "made_ready": 0,
                    "dropped": {}}
        dropped = list(filt.dropped)
        return {
            "waiting": len(filt.waiting),
            "waiting_peak": filt.peak,
            "waited": filt.entered,
            "made_ready": filt.ready,
            "dropped": {name: dropped[i] for i, name in enumerate(DROP_REASONS, 1)
                        if dropped[i]},
        }


#: The listeners that have an accept filter: a forked child lets go of what
#: waits in them (RawListener.forget_filter_after_fork).
_FILTERED: "weakref.WeakSet[RawListener]" = weakref.WeakSet()


def _forget_filters_after_fork() -> None:
    """os.register_at_fork's after_in_child: every fork, whoever makes it
    (ForkingMixIn, os.fork in a handler, multiprocessing), leaves the
    parent's waiting connections to the parent."""
    for listener in list(_FILTERED):
        listener.forget_filter_after_fork()


os.register_at_fork(after_in_child=_forget_filters_after_fork)
