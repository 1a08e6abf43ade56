"""Serving until a signal says stop, as ``fastlisten serve`` does, for any program.

::

    server = fastlisten.ThreadingTCPServer(("127.0.0.1", 8000), Handler)
    with server:
        fastlisten.serve_until_signalled(server, grace=5.0)

:func:`serve_until_signalled` runs ``serve_forever()`` in a thread while
the main thread waits for SIGINT or SIGTERM (SIGUSR1, and a timer, can ask
for the counters); on the first stop signal the server stops accepting,
serves the connections the kernel had already queued (closing the socket
would reset them) and gives running handlers ``grace`` seconds before
they are ended; a second stop signal ends them at once.

Its parts are here for loops that need other signals or descriptors
(:class:`fastlisten.Workers`' worker processes): :class:`Signals` (Python
handlers that count, plus a ``signal.set_wakeup_fd`` pipe that wakes the
waiting thread whichever thread the kernel delivered the signal to),
:class:`Outcome` (a call run in a thread, its result or exception kept),
:func:`stop_serving` (the graceful stop), :func:`reset_after_fork`
(what a forked handler process must not inherit from the parent's signal
handling) and the counters line (:func:`log_counters`).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import threading
from functools import partial
from time import monotonic
from typing import Any, Callable, Dict, Iterable, List, Optional

from fastlisten._queued import serve_queued
from fastlisten._wakeup import Waker
from fastlisten.config import check_seconds
from fastlisten.sysinfo import listener_drops

__all__ = ["serve_until_signalled", "stop_serving", "Signals", "Outcome", "reset_after_fork",
           "counters", "format_counters", "log_counters"]

# The logger of what ``fastlisten serve`` says about its run (its lines
# have always been "fastlisten.serve"'s).
_log = logging.getLogger("fastlisten.serve")

#: The signals that ask for a graceful stop (a second one: at once).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Signals:
    """While entered (in the main thread): the Python handler of each of
    ``signals`` counts it (:meth:`count`), and a signal arriving at any
    instant, in any thread, wakes :meth:`wait` (``signal.set_wakeup_fd`` on
    a pipe).  On exit the previous handlers and wake-up descriptor are back.

    A process forked meanwhile (ForkingMixIn's handlers) shares the pipe:
    :func:`reset_after_fork` runs in it (registered once with
    ``os.register_at_fork``) while a Signals is entered.

    ``on_signal(signum)``, if given, is called by the handler too (after
    counting it): for a loop that must see every signal in the order they
    came (``fastlisten.Workers``' supervisor queues each as a control).
    ``waker``: a ``Waker(pipe=True)`` of the caller's to use (and leave
    open) instead of a pipe of its own, for a loop that waits on it
    itself and wakes it from other threads too."""

    def __init__(self, signals: Iterable[int] = STOP_SIGNALS,
                 on_signal: Optional[Callable[[int], None]] = None,
                 waker: Optional[Waker] = None) -> None:
        self.signals = tuple(signals)
        self.counts: Dict[int, int] = dict.fromkeys(self.signals, 0)
        #: The first of them to arrive (None: none yet), for a loop whose
        #: stop depends on which signal asked for it.
        self.first: Optional[int] = None
        self.waker: Optional[Waker] = None
        self._callback = on_signal
        self._given = waker
        self._previous: Dict[int, Any] = {}
        self._old_fd: Optional[int] = None

    def count(self, *signals: int) -> int:
        """How many of ``signals`` (default: all handled) arrived so far."""
        return sum(self.counts.get(s, 0) for s in signals or self.signals)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.counts[signum] = self.counts.get(signum, 0) + 1
        if self.first is None:
            self.first = signum
        if self._callback is not None:
            self._callback(signum)
        # The waiting thread may have read the wake-up byte and looked at
        # the counts before this handler ran: wake it again.
        self.wakeup()

    def __enter__(self) -> "Signals":
        global _entered
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signals are handled in the main thread: call this there")
        _register_after_fork()
        self.waker = self._given if self._given is not None else Waker(pipe=True)
        try:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            self._old_fd = signal.set_wakeup_fd(self.waker.write_fileno(),
                                                warn_on_full_buffer=False)
        except BaseException:
            self.__exit__()
            raise
        _entered += 1
        return self

    def __exit__(self, *exc: object) -> None:
        global _entered
        if self._old_fd is not None:
            signal.set_wakeup_fd(self._old_fd)
            self._old_fd = None
            _entered -= 1
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous.clear()
        if self.waker is not None and self.waker is not self._given:
            self.waker.close()
        self.waker = None

    def wakeup(self) -> None:
        """Wake :meth:`wait` (from any thread)."""
        if self.waker is not None:
            self.waker.wakeup()

    def wait(self, timeout: Optional[float] = None, fds: Iterable[int] = ()) -> List[int]:
        """Wait until a signal or :meth:`wakeup` arrives, one of ``fds`` is
        readable, or ``timeout`` seconds (None: no limit) pass; returns the
        readable ones of ``fds``.  The Python handlers have run by the time
        it returns."""
        assert self.waker is not None, "wait() outside the with block"
        poller = select.poll()      # (no FD_SETSIZE limit, unlike select())
        watched = list(fds)
        for fd in (self.waker.fileno(), *watched):
            poller.register(fd, select.POLLIN)
        ms = None if timeout is None else max(0, int(timeout * 1000) + 1)
        ready = [fd for fd, _ in poller.poll(ms)]
        self.waker.drain()
        return [fd for fd in watched if fd in ready]


#: Signals entered now (the after-fork reset applies while one is).
_entered = 0
_fork_hook = False


def reset_after_fork() -> None:
    """In a process forked to run a handler (ForkingMixIn) by a process
    whose signals are handled (:class:`Signals`, a ``Workers`` worker): its
    parent decides when it ends, so the parent's handling is not its own.
    The wake-up descriptor (the parent's pipe) is let go; SIGTERM (what
    ``end_handlers()`` sends) and SIGUSR2 end it (their defaults); SIGINT
    (Ctrl-C reaches the whole process group) and SIGUSR1 (counters) are
    ignored."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    for sig in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _after_fork_in_child() -> None:
    global _entered
    if _entered:
        _entered = 0
        reset_after_fork()


def _register_after_fork() -> None:
    global _fork_hook
    if not _fork_hook:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _fork_hook = True


class Outcome:
    """``target()`` run in a daemon thread named ``name``: :attr:`done`
    once it returned or raised, and ``wake()`` is called then."""

    def __init__(self, target: Callable[[], Any], name: str,
                 wake: Callable[[], None]) -> None:
        self._box: List[Any] = []
        self._ok = False

        def body() -> None:
            try:
                value = target()
                self._ok = True         # before done, which the box makes true
                self._box.append(value)
            except BaseException as exc:
                self._box.append(exc)
            finally:
                wake()

        self.thread = threading.Thread(target=body, name=name, daemon=True)
        self.thread.start()

    @property
    def done(self) -> bool:
        return bool(self._box)

    @property
    def exception(self) -> Optional[BaseException]:
        """What it raised (None: it returned, or is still running)."""
        return None if self._ok or not self._box else self._box[0]

    def result(self) -> Any:
        """What it returned; raises what it raised.  Only once :attr:`done`."""
        assert self._box, "result() before it is done"
        if not self._ok:
            raise self._box[0]
        return self._box[0]


def format_counters(c: Dict[str, Any]) -> str:
    """Counters (Listener.counters() or a server's counters()) as one log
    line; values the system cannot tell (None) are left out.

    ``queue_drops`` (see :func:`counters`) is the listener's own count of
    connections dropped from its full accept queue; only without it does the
    line show the kernel's ListenOverflows/ListenDrops, which count every
    listener on the machine, labelled ``machine_``."""
    errors = ", ".join(f"{errno.errorcode.get(e, e)}={n}"
                       for e, n in c.get("errors", {}).items())
    parts = [(name, c.get(name)) for name in (
        "accepted", "batches", "max_batch", "handlers_running", "handlers_peak", "queued",
        "deepest_queue", "backlog")]
    parts += [
        ("accept_errors", f"{{{errors}}}"), ("capacity_episodes", c.get("capacity_episodes")),
    ]
    if c.get("queue_drops") is not None:
        parts.append(("queue_drops", c["queue_drops"]))
    else:
        parts += [("machine_ListenOverflows", _plus(c.get("listen_overflows_since_open"))),
                  ("machine_ListenDrops", _plus(c.get("listen_drops_since_open")))]
    parts += [(name, c.get(name)) for name in (
        "proxy_accepted", "proxy_local", "proxy_rejected", "tls_handshakes", "tls_failures",
        "handler_timeouts")]
    if c.get("made_ready") or c.get("waiting") or c.get("dropped"):     # an accept filter
        parts += [(name, c.get(name)) for name in ("waiting", "waiting_peak", "made_ready")]
        parts.append(("dropped", "{" + ", ".join(
            f"{reason}={n}" for reason, n in c.get("dropped", {}).items()) + "}"))
    if c.get("proxy_errors"):
        parts.append(("proxy_errors", "{" + ", ".join(
            f"{reason}={n}" for reason, n in c["proxy_errors"].items()) + "}"))
    return " ".join(f"{name}={value}" for name, value in parts if value is not None)


def counters(server: Any, drops: Optional[int] = None) -> Dict[str, Any]:
    """The server's counters() for the counters line, with ``queue_drops``:
    the connections its own listening socket dropped because its accept
    queue was full (SO_MEMINFO's sk_drops, which the kernel counts per
    socket where /proc/net/netstat's ListenDrops counts the whole machine);
    ``drops`` (read earlier) if the socket cannot tell any more.  A Unix
    socket's line leaves the TCP figures out."""
    c = dict(server.counters())
    sock = server.socket
    if sock.family == socket.AF_UNIX:
        for key in ("listen_overflows_since_open", "listen_drops_since_open"):
            c.pop(key, None)
        return c
    own = listener_drops(sock)
    c["queue_drops"] = own if own is not None else drops
    return c


def _plus(n: Optional[int]) -> Optional[str]:
    return None if n is None else f"+{n}"


def log_counters(server: Any) -> None:
    """Log the server's counters as one line (``counters: accepted=...``):
    ``fastlisten serve``'s ``on_stats``."""
    _log.info("counters: %s", format_counters(counters(server)))


def _method(server: Any, name: str) -> Optional[Callable[..., Any]]:
    """fastlisten's own ``name`` (``serve_queued``, ``drain``,
    ``end_handlers``, ``counters``) bound to a server built on its classes,
    never a subclass's method of that name (the added names' policy); None
    for another server."""
    from fastlisten.server import _own_method

    try:
        return _own_method(server, name)
    except AttributeError:
        return None


def stop_serving(server: Any, signals: Signals, grace: float,
                 first: Optional[int] = None, shutdown: bool = True) -> int:
    """The graceful stop, with ``serve_forever()`` running in another
    thread: ``shutdown()`` (no new connection is accepted; without
    ``shutdown``, the loop has already returned), then the connections the
    kernel had queued are served (``serve_queued()``) and running handlers
    get what is left of ``grace`` seconds to finish (``drain()``), while
    ``signals`` are watched: one more stop signal than had arrived (or than
    ``first``), or the end of the grace, ends them (``end_handlers()``),
    which also closes what ``serve_queued()`` had not handed over yet (it
    may be waiting for room in a full pool).  With an accept filter, the
    connections still waiting in it when the stop begins (a client between
    its connect and its request) are served if they become ready within
    the same grace, then the rest are closed (``dropped['shutdown']``).
    Returns how many handlers were ended.  A server not built on
    fastlisten's classes gets the queue served and no drain."""
    if first is None:
        first = signals.count(*STOP_SIGNALS)
    if shutdown:
        graceful = _method(server, "_fl_stop_gracefully")
        if graceful is not None:
            graceful()      # its waiting connections are left to serve_queued()
        server.shutdown()
    deadline = monotonic() + grace
    own = _method(server, "serve_queued")
    queued = own if own is not None else partial(serve_queued, server)
    drain, end = _method(server, "drain"), _method(server, "end_handlers")
    counters = _method(server, "counters")
    if drain is None or end is None:
        queued(timeout=max(0.0, deadline - monotonic()))
        return 0
    running = counters()["handlers_running"] if counters is not None else 0
    if running:
        _log.info("stopped accepting; %d handler(s) running get up to %.3g s "
                  "(a second signal ends them now)", running, grace)

    def finish() -> int:
        queued(timeout=max(0.0, deadline - monotonic()))
        return int(drain(max(0.0, deadline - monotonic())))

    finished = Outcome(finish, "fastlisten-drain", signals.wakeup)
    ended, why = 0, None
    while not finished.done:
        signals.wait(None if why is not None else max(0.0, deadline - monotonic()))
        if why is None:
            if signals.count(*STOP_SIGNALS) > first:
                why = "on a second signal"
            elif monotonic() >= deadline:
                why = f"after {grace:.3g} s"
            if why is not None:
                ended = end()
    finished.thread.join()      # its last act wakes signals: not once they are closed
    result = int(finished.result())
    if ended or result:
        _log.info("ended %d handler(s) still running %s", max(ended, result),
                  why or f"after {grace:.3g} s")
    return max(ended, result)


def serve_until_signalled(server: Any, *, grace: float = 5.0,
                          poll_interval: float = 0.5,
                          on_ready: Optional[Callable[[], None]] = None,
                          on_stats: Optional[Callable[[], None]] = None,
                          stats_interval: Optional[float] = None,
                          on_stop: Optional[Callable[[], None]] = None,
                          log_stats: bool = False) -> int:
    """Serve with ``server`` until SIGINT or SIGTERM, then stop gracefully;
    returns how many handlers had to be ended (0: all finished in time).
    Call it from the main thread; close the server afterwards (``with
    server:``).

    ``serve_forever(poll_interval)`` runs in a thread named
    ``fastlisten-serve``.  The first stop signal makes the server stop
    accepting, serve what the kernel had queued (``serve_queued()``: no
    reset for those clients; with an accept filter, also the connections
    waiting in it that become ready within the grace) and wait up to
    ``grace`` seconds in all for running handlers (``drain()``) before
    ending them; a second stop signal ends
    them at once.  ``on_ready()`` is called once the signals are handled
    and the server runs (the moment to tell the world it is up);
    ``on_stats()`` on SIGUSR1 (handled only with ``on_stats``) and every
    ``stats_interval`` seconds; ``on_stop()`` on the first stop signal,
    while the server still accepts.  With ``log_stats``, the counters line
    (:func:`log_counters`) is what ``on_stats`` does unless given, and is
    logged once more when stopped (``stopped; counters: ...``, with the
    socket's queue drops read before the stop).  If ``serve_forever()``
    raises, the same stop runs, then its exception is raised.  The previous
    signal handlers are back when it returns."""
    grace = check_seconds("grace", grace, zero=True)
    if log_stats and on_stats is None:
        on_stats = partial(log_counters, server)
    if stats_interval is not None:
        stats_interval = check_seconds("stats_interval", stats_interval)
        if on_stats is None:
            raise ValueError("stats_interval needs on_stats")
    handled = STOP_SIGNALS + ((signal.SIGUSR1,) if on_stats is not None else ())
    with Signals(handled) as signals:
        served = Outcome(lambda: server.serve_forever(poll_interval), "fastlisten-serve",
                         signals.wakeup)
        if on_ready is not None:
            on_ready()
        usr1 = 0
        next_stats = None if stats_interval is None else monotonic() + stats_interval
        while not signals.count(*STOP_SIGNALS) and not served.done:
            signals.wait(None if next_stats is None else next_stats - monotonic())
            due = next_stats is not None and monotonic() >= next_stats
            if due:
                next_stats = monotonic() + stats_interval  # type: ignore[operator]
            if (due or signals.count(signal.SIGUSR1) > usr1) and on_stats is not None:
                usr1 = signals.count(signal.SIGUSR1)
                on_stats()
        first = signals.count(*STOP_SIGNALS)    # a later one is a second one
        if on_stop is not None:
            on_stop()
        # before the stop: the socket filter's dropped SYNs count as drops
        drops = counters(server).get("queue_drops") if log_stats else None
        ended = stop_serving(server, signals, grace, first, shutdown=not served.done)
        served.thread.join()    # serve_forever has returned: only its wake-up is left
        if log_stats:
            _log.info("stopped; counters: %s", format_counters(counters(server, drops)))
    served.result()
    return ended
