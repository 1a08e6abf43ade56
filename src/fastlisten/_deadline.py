"""The handler deadline (``ListenConfig.handler_timeout``): a connection
whose handler has run for that many seconds is shut down (``SHUT_RDWR``),
so a handler blocked on a client that dribbles its request gets its read
back (end of file, or an error) and its thread (or process) returns.

One :class:`Watchdog` per server and process: a heap of (deadline,
connection) entries and a single daemon thread, ``fastlisten-deadline``,
that waits on a condition until the earliest deadline; no thread, timer or
descriptor per connection.  :meth:`Watchdog.arm` and :meth:`Watchdog.disarm`
take one short lock and cost O(log n) and O(1) (amortized): a disarmed
entry is marked dead, dropped at once when it is the earliest, and the
heap is compacted when the dead outnumber the live, so it never holds
more than about twice the connections being handled.  An arm does not
wake the thread unless its deadline comes before the thread's next wake-up
(an idle thread waits one period, then until the next arm): a steady
stream of connections costs no context switch.

The descriptor is the handler's: the watchdog never closes it.  It shuts
the connection down under the same lock that :meth:`Watchdog.disarm`
takes, and the server disarms a connection before it closes it, so the
watchdog cannot shut down a descriptor the server closed (and the kernel
may have reused).  A handler that closes its own connection and runs on
past its deadline has a socket object whose descriptor is gone: the
shutdown fails (EBADF), harmlessly, and is counted all the same.

Expiries are counted (``counters()['handler_timeouts']``) and logged once
per episode at WARNING: the first of a run, then nothing until a handler
finishes in time again, which logs how many timed out meanwhile.  A
forked child (ForkingMixIn: one connection per process) arms its own copy
of the watchdog, reset after the fork (no lock, entry or thread of the
parent survives it), and reports to the server process over a pipe, one
byte per event, as the front door does: an expiry, and a handler that
finished in time while an episode was open (as the child saw it when it
was forked).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import socket
import threading
import time
import weakref
from typing import Any, Callable, List, Optional

from fastlisten._childreports import ChildReports
from fastlisten.address import format_address

_log = logging.getLogger("fastlisten")

__all__ = ["Watchdog", "THREAD_NAME"]

#: The watchdog thread's name.
THREAD_NAME = "fastlisten-deadline"

#: Disarmed entries the heap may hold beyond the live ones before it is
#: compacted (it is compacted once the dead outnumber the live, and more
#: than this many are dead).
_SLACK = 64

#: A forked child's report bytes.
_EXPIRED, _IN_TIME = b"x", b"o"

#: The shutdown of the socket itself: an SSLSocket's own shutdown() would
#: drop its SSL object under the handler's feet; the raw one leaves the TLS
#: state alone, and the handler's next read fails as at end of file.
_raw_shutdown: Callable[[Any, int], None] = socket.socket.shutdown

#: Every watchdog, so that a forked child resets them (see _after_fork).
_watchdogs: "weakref.WeakSet[Watchdog]" = weakref.WeakSet()


def _after_fork() -> None:
    for dog in list(_watchdogs):
        dog._reset_after_fork()


os.register_at_fork(after_in_child=_after_fork)


#: One armed connection, a heap item: [deadline, seq, sock, epoch], a list
#: so that the heap compares them in C (by deadline, then by the unique
#: seq: never by socket).  ``sock`` is None once disarmed or expired;
#: ``epoch`` is the watchdog state it belongs to (a forked child's is new).
Entry = List[Any]
_DEADLINE, _SOCK, _EPOCH = 0, 2, 3


class Watchdog:
    """Shut connections down ``seconds`` after they were armed.

    ``on_expire(sock)`` runs (under the watchdog's lock: keep it short, and
    take no lock in it) for each connection shut down, in the watchdog's
    thread; ``forking``: handlers run in forked children, which report to
    this process over a pipe (:meth:`collect` reads it).
    """

    def __init__(self, seconds: float, on_expire: Optional[Callable[[Any], None]] = None,
                 forking: bool = False) -> None:
        self.seconds = float(seconds)
        self._on_expire = on_expire
        self._pid = os.getpid()
        #: forked handlers' reports (None: handlers run in this process)
        self._reports = ChildReports() if forking else None
        self._expired = 0
        self._reset_state()
        _watchdogs.add(self)

    def _reset_state(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._heap: List[Entry] = []
        self._seq = itertools.count()
        self._live = 0
        self._dead = 0              # disarmed entries still in the heap
        self._wake_at = float("inf")     # when the thread wakes next (inf: only when told)
        self._arms = 0              # arms so far (the idle thread's "anything new?")
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self._failed = 0            # expiries in the current episode
        self._epoch = object()

    def _reset_after_fork(self) -> None:
        """In a forked child: nothing of the parent's thread, lock or
        entries is the child's (its connections are the parent's to end)."""
        failed = self._failed
        self._reset_state()
        # the parent's view of the episode, for the child's report of a
        # handler that finished in time
        self._failed = failed

    @property
    def expired(self) -> int:
        """Connections shut down so far (in this process, and reported by
        forked children)."""
        self.collect()
        return self._expired

    # -- per connection ---------------------------------------------------

    def arm(self, sock: Any) -> Optional[Entry]:
        """Start ``sock``'s deadline; give what this returns to
        :meth:`disarm` when its handler is done, before the socket is closed.
        Only a ``socket.socket`` (an ``ssl.SSLSocket`` too) is armed: for
        anything else (a subclass's own ``get_request`` may return what it
        likes) this returns None."""
        if not isinstance(sock, socket.socket):
            return None
        with self._lock:
            if self._thread is None:
                self._start()
            deadline = time.monotonic() + self.seconds
            entry = [deadline, next(self._seq), sock, self._epoch]
            heapq.heappush(self._heap, entry)
            self._live += 1
            self._arms += 1
            if deadline < self._wake_at:
                self._cond.notify()
        return entry

    def disarm(self, entry: Optional[Entry]) -> None:
        """The handler is done: from now on the watchdog leaves the socket
        alone (it may be closed).  Nothing to do if it expired already."""
        if entry is None:
            return
        report = 0
        with self._lock:
            if entry[_SOCK] is None or entry[_EPOCH] is not self._epoch:
                return      # expired, or armed by the parent of this forked process
            entry[_SOCK] = None
            self._live -= 1
            self._dead += 1
            heap = self._heap
            if heap[0] is entry:
                self._drop_dead()
            elif self._dead > _SLACK and self._dead > self._live:
                self._heap = [e for e in heap if e[_SOCK] is not None]
                heapq.heapify(self._heap)
                self._dead = 0
            if self._failed:
                report, self._failed = self._failed, 0
            if self._closed and self._live == 0:
                self._cond.notify()     # the thread leaves
        if report:
            self._in_time(report)

    def _drop_dead(self) -> None:
        heap = self._heap
        while heap and heap[0][_SOCK] is None:
            heapq.heappop(heap)
            self._dead -= 1

    # -- the thread ---------------------------------------------------------

    def _start(self) -> None:
        thread = self._thread = threading.Thread(target=self._run, name=THREAD_NAME,
                                                 daemon=True)
        try:
            thread.start()
        except RuntimeError:        # not started (a KeyboardInterrupt leaves it started)
            self._thread = None
            raise

    def _run(self) -> None:
        cond = self._cond
        seen = -1
        with cond:
            while True:
                self._drop_dead()
                heap = self._heap
                if self._closed and self._live == 0:
                    self._thread = None
                    self._wake_at = float("inf")
                    return
                now = time.monotonic()
                if not heap:
                    if seen == self._arms:
                        # idle for a whole period: wait until an arm says so
                        self._wake_at = float("inf")
                        cond.wait()
                    else:
                        # an arm from now on ends a period or more from now:
                        # no need to be told about it
                        seen = self._arms
                        self._wake_at = now + self.seconds
                        cond.wait(self.seconds)
                    continue
                top = heap[0]
                deadline = top[_DEADLINE]
                if deadline > now:
                    self._wake_at = deadline
                    cond.wait(min(deadline - now, threading.TIMEOUT_MAX))
                    continue
                heapq.heappop(heap)
                sock, top[_SOCK] = top[_SOCK], None
                self._live -= 1
                first = self._failed == 0
                peer = _peer(sock) if first else ""     # (before the descriptor may go)
                self._expire(sock)
                self._failed += 1
                if first:
                    # said outside the lock: a slow log must not hold up
                    # the handlers' arms and disarms
                    cond.release()
                    try:
                        self._log_first(peer)
                    finally:
                        cond.acquire()

    def _expire(self, sock: Any) -> None:
        """Shut ``sock`` down and count it (under the lock)."""
        try:
            _raw_shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass    # the peer is gone already (ENOTCONN), or the handler closed it
        if os.getpid() != self._pid:
            self._report(_EXPIRED)
        else:
            self._expired += 1
        if self._on_expire is not None:
            self._on_expire(sock)

    def _log_first(self, peer: str) -> None:
        if os.getpid() != self._pid:
            return      # the server process says it (collect)
        _log.warning("handler deadline: a handler ran for %gs (handler_timeout) and its "
                     "connection%s was shut down; further expiries are counted "
                     "(counters()['handler_timeouts']), not logged, until a handler "
                     "finishes in time", self.seconds, peer)

    def _in_time(self, expired: int) -> None:
        """A handler finished in time after ``expired`` expiries in a row."""
        if os.getpid() != self._pid:
            self._report(_IN_TIME)
        elif expired > 1:
            _log.warning("handler deadline: %d handlers in a row ran past handler_timeout "
                         "(%gs) before this one finished in time", expired, self.seconds)

    # -- forked children's reports ----------------------------------------------

    def _report(self, event: bytes) -> None:
        if self._reports is not None:
            self._reports.send(event[0])

    def collect(self) -> None:
        """In the server process: count (and log) what forked children
        reported."""
        reports = self._reports
        if reports is None or reports.in_child():
            return
        lost = reports.newly_lost()
        if lost:
            # a full pipe: the server process has not reaped its children
            # for 64 KiB of reports
            _log.warning("handler deadline: %d report(s) of forked handlers were lost (the "
                         "server process did not read them); handler_timeouts misses them",
                         lost)
        data = reports.read()
        if data:
            said: List[int] = []     # what to log, outside the lock: 0 for a first expiry
            with self._cond:
                for event in data:
                    if event == _EXPIRED[0]:
                        self._expired += 1
                        self._failed += 1
                        if self._failed == 1:
                            said.append(0)
                    elif self._failed:
                        said.append(self._failed)
                        self._failed = 0
            for n in said:
                if n:
                    self._in_time(n)
                else:
                    self._log_first(" (in a forked handler)")

    # -- the end -----------------------------------------------------------

    def close(self) -> None:
        """Stop the thread: at once when no connection is armed, else once
        the last is disarmed or expires (at most ``seconds`` from now: the
        handlers of a server that does not wait for them still have their
        deadline).  A later arm starts it again.  Closes the children's
        report pipe (after counting what is in it)."""
        with self._cond:
            self._closed = True
            thread = self._thread if self._live == 0 else None
            self._cond.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self.collect()
        reports, self._reports = self._reports, None
        if reports is not None:
            reports.close()


def _peer(sock: Any) -> str:
    """`` with 1.2.3.4:5`` for the log line, or '' when it cannot tell."""
    try:
        text = format_address(sock.getpeername())
    except (OSError, AttributeError):
        return ""
    return f" with {text}" if text else ""
