"""Worker processes: every core, and restarts that lose no connection.

:class:`Workers` is a pre-fork supervisor for socketserver servers::

    import fastlisten
    from myapp.handlers import Handler

    fastlisten.Workers(fastlisten.ThreadingTCPServer, ("0.0.0.0", 8000), Handler,
                       workers=4).run()

The parent binds the listening socket(s), forks ``workers`` processes and
supervises them; it never runs a handler.  Each worker builds its own
server with ``server_class(server_address, RequestHandlerClass,
bind_and_activate=False)``, gives it the inherited listening socket and runs
``serve_forever()``.  Any ``socketserver.TCPServer``/``UnixStreamServer``
subclass works (fastlisten's, the stdlib's, ``http.server``'s); so does any
class called that way whose instances have a ``socket`` attribute,
``serve_forever(poll_interval)``, ``shutdown()`` and ``server_close()`` (a
``fastlisten.listen`` loop wrapped in ten lines).

Sharing the port (``reuse_port``):

- False (default): one socket, bound by the parent and inherited by every
  worker: one accept queue, nothing is lost while any worker accepts.
- True: one ``SO_REUSEPORT`` socket per worker slot, each a separate
  ``socket()`` call made by the parent; the kernel spreads connections over
  them.  A worker that is replaced (reload, recycling, crash) hands its slot's
  socket to its successor, so that queue is never closed.  When a slot goes
  away (fewer workers), its socket is closed without losing its queue: with
  ``net.ipv4.tcp_migrate_req=1`` the kernel moves the queue to a live socket;
  otherwise a classic BPF program (``SO_ATTACH_REUSEPORT_CBPF``) first steers
  new connections to the sockets that stay, and the worker empties the
  closing socket's queue before it ends.  The same program keeps new
  connections off a slot whose worker is not accepting (starting or dead).

Signals (run() installs them; the methods below do the same from code):
SIGTERM/SIGINT stop gracefully (workers stop accepting and serve the
connections the kernel had already queued, instead of letting the closing
socket reset them; running handlers get ``graceful_timeout`` seconds, then
are ended; a second one stops at once);
SIGQUIT stops at once; SIGHUP
reloads (new workers, with the handler's package imported afresh, accept
before the old ones stop accepting and drain); SIGTTIN/SIGTTOU add/remove a
worker; SIGUSR1 logs the counters summed over the workers, with each
worker's connections.

Supervision: a worker that dies is replaced; one that dies before it
accepts counts as a failure and the next start waits ``backoff`` seconds,
doubling up to ``max_backoff`` (reset once a worker started since has
accepted for ``min_uptime`` seconds).  Every
worker's serving loop writes a heartbeat (a CLOCK_MONOTONIC time) into
memory shared with the parent; the parent kills (SIGKILL) a worker whose
heartbeat is older than ``timeout`` seconds, without asking the worker's
Python anything.  With ``max_requests``, a worker that has accepted that
many connections (plus a random 0..``max_requests_jitter``) is replaced the
same way a reload replaces it: its successor accepts first.

systemd: ``listen_config=ListenConfig(fd='systemd')`` adopts a
socket-activated socket (workers inherit it); with ``$NOTIFY_SOCKET`` the
parent sends ``READY=1`` once the workers accept, ``STATUS=`` lines,
``RELOADING=1``/``MONOTONIC_USEC`` and ``READY=1`` around a reload,
``STOPPING=1``, and ``WATCHDOG=1`` every half ``WATCHDOG_USEC``.

Layout: this module is the supervisor's state machine, the parent's side
only: ``Workers`` (its loop, one ``_on_<control>`` method per
:class:`Control`, each worker's :class:`State`).  A worker process runs
:mod:`fastlisten._worker_process` (given a frozen ``WorkerJob``), which
uses a server through :mod:`fastlisten._server_hooks`; the counters are
:mod:`fastlisten._worker_counters`, what systemd and the log are told
:mod:`fastlisten._supervisor_status`, the reuse-port sockets and their
steering :mod:`fastlisten._reuseport`, the shared heartbeat record
:mod:`fastlisten._heartbeat`, the pid file :mod:`fastlisten._pidfile`;
signals are handled with :class:`fastlisten.running.Signals`.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import random
import select
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from fastlisten._heartbeat import Record
from fastlisten._pidfile import PidFile
from fastlisten._reuseport import ReusePortGroup
from fastlisten._supervisor_status import SupervisorStatus
from fastlisten._wakeup import Waker
from fastlisten._worker_counters import WorkerCounters, log_summary
from fastlisten._worker_process import FAILED, FAILURE_MAX, READY, RECYCLE, WorkerJob, worker_main
from fastlisten.config import ListenConfig, check_int, check_seconds
from fastlisten.listener import Listener
from fastlisten.running import Signals
from fastlisten.systemd import Notifier

__all__ = ["Workers"]

_log = logging.getLogger("fastlisten.workers")

# -- the parent's view of one worker -------------------------------------------

class State(enum.Enum):
    """Where a worker is, as the supervisor sees it: STARTING -> READY
    (it accepts) -> RETIRING (told to stop; killed after graceful_timeout).
    A READY worker whose reuse-port slot goes away is CLOSING first (new
    connections steered away from its socket for ``linger`` seconds); one
    that missed its heartbeat is KILLED (SIGKILL sent, not reaped yet)."""

    STARTING = "starting"
    READY = "ready"
    CLOSING = "closing"
    RETIRING = "retiring"
    KILLED = "killed"


class Control(enum.Enum):
    """What the supervisor is asked (by a signal, or a method from any
    thread); each is handled by ``Workers._on_<name>``."""

    STOP = "stop"                   # SIGTERM, SIGINT, stop(): gracefully
    QUIT = "quit"                   # SIGQUIT, stop(graceful=False): at once
    RELOAD = "reload"               # SIGHUP, reload()
    ADD_WORKER = "add_worker"       # SIGTTIN, add_worker()
    REMOVE_WORKER = "remove_worker"     # SIGTTOU, remove_worker()
    LOG_COUNTERS = "log_counters"   # SIGUSR1, log_counters()
    CHILD = "child"                 # SIGCHLD: the loop reaps on every pass


#: The supervisor's signals and what each asks.
_SIGNALS: Dict[int, Control] = {
    signal.SIGTERM: Control.STOP, signal.SIGINT: Control.STOP, signal.SIGQUIT: Control.QUIT,
    signal.SIGHUP: Control.RELOAD, signal.SIGTTIN: Control.ADD_WORKER,
    signal.SIGTTOU: Control.REMOVE_WORKER, signal.SIGUSR1: Control.LOG_COUNTERS,
    signal.SIGCHLD: Control.CHILD,
}


@dataclass
class _Worker:
    """The supervisor's view of one worker process: what it was started
    for, where it is, and its status pipe, heartbeat record and signals."""

    pid: int
    slot: int
    generation: int
    status_fd: int
    record: Record
    limit: int                      # max_requests (+ jitter) for this worker; 0: none
    started: float
    state: State = State.STARTING
    ready_at: Optional[float] = None
    deadline: Optional[float] = None    # retiring: SIGKILL after this
    recycle: bool = False           # asked to be replaced (max_requests)
    steered_at: Optional[float] = None  # reuseport slot closing: steered away since
    failure: Optional[bytes] = None     # what kept it from starting, as it said

    def read_status(self) -> bool:
        """Read what the worker said on its status pipe; False once there
        is nothing to read."""
        try:
            data = os.read(self.status_fd, FAILURE_MAX + 64)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:            # the worker is gone (or closed its end): SIGCHLD reaps it
            os.close(self.status_fd)
            self.status_fd = -1
            return False
        if self.failure is not None:
            self.failure = (self.failure + data)[:FAILURE_MAX]
            return True
        if FAILED in data:
            data, _, failure = data.partition(FAILED)
            self.failure = failure[:FAILURE_MAX]
        if READY in data and self.state is State.STARTING:
            self.state, self.ready_at = State.READY, time.monotonic()
            _log.debug("worker %d (slot %d, generation %d) accepting", self.pid, self.slot,
                       self.generation)
        if RECYCLE in data and not self.recycle:
            self.recycle = True
            _log.info("worker %d reached max_requests (%d): replacing it", self.pid,
                      self.limit)
        return True

    def send(self, sig: int) -> None:
        """Send sig to the worker; SIGKILL goes to its process group, so
        that the processes it forked (ForkingMixIn handlers) end with it."""
        try:
            if sig == signal.SIGKILL:
                try:
                    os.killpg(self.pid, sig)
                    return
                except ProcessLookupError:
                    pass        # not its own group yet: the worker alone
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        """Once reaped: its status pipe and its record."""
        if self.status_fd >= 0:
            os.close(self.status_fd)
            self.status_fd = -1
        self.record.close()


class Workers:
    """Serve ``server_class(server_address, RequestHandlerClass)`` in
    ``workers`` processes, supervised (see the module's documentation).

    Methods for the caller: run() (blocks; signals handled when called from
    the main thread), bind() (bind the socket(s) now, e.g. to read
    :attr:`address` first), and, from any thread or a signal handler of
    your own, stop(graceful=True), reload(), add_worker(), remove_worker(),
    log_counters(); counters() from the supervisor's thread.

    ``RequestHandlerClass`` may be a class or ``"module:Class"``.
    ``listen_config`` (default: ``server_class.listen_config`` if any) holds
    the listener options; ``fd='systemd'`` adopts socket activation.
    ``timeout``: seconds without a heartbeat before a worker is killed (the
    heartbeat is written by the serving loop, so with a synchronous server
    this also bounds a handler's run time).  ``graceful_timeout``: seconds a
    stopping worker's running handlers get.  ``max_requests`` (0: never)
    and ``max_requests_jitter``: connections after which a worker is
    replaced.  ``pid_file``: written at start, removed at the end.
    ``notify``: speak systemd's sd_notify protocol when ``$NOTIFY_SOCKET``
    is set.  ``linger``: seconds a reuseport socket about to close keeps
    being served after new connections are steered away (handshakes in
    flight land meanwhile).  The numbers are checked as ListenConfig's
    options are (``fastlisten.config.check_int``/``check_seconds``: a
    duration is finite).
    """

    def __init__(self, server_class: Callable[..., Any], server_address: Any = None,
                 RequestHandlerClass: Any = None, *, workers: int = 1,
                 listen_config: Optional[ListenConfig] = None, reuse_port: bool = False,
                 timeout: float = 30.0, graceful_timeout: float = 30.0,
                 max_requests: int = 0, max_requests_jitter: int = 0,
                 pid_file: Optional[str] = None, notify: bool = True,
                 backoff: float = 0.1, max_backoff: float = 10.0, min_uptime: float = 1.0,
                 linger: float = 0.2) -> None:
        if RequestHandlerClass is None:
            raise TypeError("Workers needs a RequestHandlerClass (a class or 'module:Class')")
        workers = check_int("workers", workers, 1)
        # (any number of connections: the C int bound is for socket options)
        max_requests = check_int("max_requests", max_requests, 0, sys.maxsize)
        max_requests_jitter = check_int("max_requests_jitter", max_requests_jitter, 0,
                                        sys.maxsize)
        timeout = check_seconds("timeout", timeout)
        graceful_timeout = check_seconds("graceful_timeout", graceful_timeout, zero=True)
        backoff = check_seconds("backoff", backoff, zero=True)
        max_backoff = check_seconds("max_backoff", max_backoff, zero=True)
        min_uptime = check_seconds("min_uptime", min_uptime, zero=True)
        linger = check_seconds("linger", linger, zero=True)
        if listen_config is None:
            own = getattr(server_class, "listen_config", None)
            # anything but a ListenConfig there is the class's own attribute
            listen_config = own if isinstance(own, ListenConfig) else None
        if listen_config is not None and not isinstance(listen_config, ListenConfig):
            raise TypeError(f"listen_config must be a fastlisten.ListenConfig, not "
                            f"{type(listen_config).__name__}")
        family = getattr(server_class, "address_family", None)
        base = listen_config or ListenConfig()
        if base.fd is None and server_address is None:
            raise TypeError("Workers needs a server_address (or listen_config with fd=)")
        self.config = base.for_address(server_address, family) if base.fd is None else base
        self.reuse_port = bool(reuse_port or self.config.reuse_port)
        if self.reuse_port and self.config.fd is not None:
            raise ValueError("reuse_port needs sockets of its own; it cannot share "
                             f"fd={self.config.fd!r}: use one inherited socket instead")
        if self.reuse_port:
            self.config.replace(reuse_port=True)    # raises what does not fit (a Unix path)
        self.server_class = server_class
        self.handler = RequestHandlerClass
        self.worker_count = workers
        self.timeout = timeout
        self.graceful_timeout = graceful_timeout
        self.max_requests = max_requests
        self.max_requests_jitter = max_requests_jitter
        self.pid_file = os.fspath(pid_file) if pid_file is not None else None
        self._pid_file = PidFile(self.pid_file)
        self.backoff, self.max_backoff = backoff, max_backoff
        self.min_uptime, self.linger = min_uptime, linger
        self._status = SupervisorStatus(Notifier.from_environment() if notify else Notifier())
        self._counters = WorkerCounters()
        self._reuse: Optional[ReusePortGroup] = None     # reuse_port: a socket per slot
        self._shared: Optional[Listener] = None            # else: the one socket
        self._workers: Dict[int, _Worker] = {}
        self._generation = 0
        self._failures = 0
        self._next_spawn = 0.0
        self._last_failure = 0.0
        #: Controls asked and not handled yet (appended from any thread).
        self.controls: Deque[Control] = deque()
        self._waker: Optional[Waker] = None
        self._lifeline: Optional[Tuple[int, int]] = None
        self._stopping: Optional[str] = None   # None, "graceful", "now"
        self._stop_deadline: Optional[float] = None
        self._failure_shown: Optional[str] = None   # the start failure's traceback, logged

    # -- control (any thread, or a signal handler) ---------------------------

    @property
    def target(self) -> int:
        """The number of workers wanted (the old name of worker_count)."""
        return self.worker_count

    @target.setter
    def target(self, value: int) -> None:
        self.worker_count = value

    @property
    def notifier(self) -> Notifier:
        """The systemd notifier (sends nothing without ``$NOTIFY_SOCKET``)."""
        return self._status.notifier

    @notifier.setter
    def notifier(self, value: Notifier) -> None:
        self._status.notifier = value

    @property
    def handover(self) -> Optional[str]:
        """What a closing reuseport socket does with its queue: "migrate"
        (net.ipv4.tcp_migrate_req=1) or "steer" (BPF, then empty it);
        None without reuse_port (or before bind())."""
        return self._reuse.handover if self._reuse is not None else None

    def _ask(self, control: Control) -> None:
        self.controls.append(control)
        waker = self._waker
        if waker is not None:
            waker.wakeup()

    def stop(self, graceful: bool = True) -> None:
        """Stop: gracefully (workers finish running handlers within
        graceful_timeout), or at once (SIGKILL)."""
        self._ask(Control.STOP if graceful else Control.QUIT)

    def reload(self) -> None:
        """Start a new generation of workers (handler imported afresh);
        each old worker stops accepting once its successor accepts."""
        self._ask(Control.RELOAD)

    def add_worker(self) -> None:
        """One worker more (SIGTTIN)."""
        self._ask(Control.ADD_WORKER)

    def remove_worker(self) -> None:
        """One worker fewer, never below one (SIGTTOU)."""
        self._ask(Control.REMOVE_WORKER)

    def log_counters(self) -> None:
        """Log the counters (SIGUSR1)."""
        self._ask(Control.LOG_COUNTERS)

    # -- the listening socket(s) ------------------------------------------------

    @property
    def address(self) -> Any:
        """The bound address (after bind())."""
        listener = self._shared if self._shared is not None else (
            self._reuse.listener(0) if self._reuse is not None else None)
        if listener is None:
            raise RuntimeError("Workers.address: not bound yet (call bind() or run())")
        return listener.address

    def bind(self) -> None:
        """Bind and listen now (run() does it if you did not).  Raises the
        OSError of a failing bind, explained, with nothing left open."""
        if self._shared is not None or (self._reuse is not None and len(self._reuse)):
            return
        if not self.reuse_port:
            self._shared = Listener.from_config(self._socket_config())
            return
        group = ReusePortGroup(self._socket_config().replace(reuse_port=True))
        group.open(self.worker_count)
        self._reuse = group

    def _socket_config(self) -> ListenConfig:
        """The config of the listening socket(s) the parent opens: the PROXY
        protocol and TLS options are for the servers in the workers, which
        read the header and run the handshake of each connection (a
        Listener refuses them)."""
        return self.config.socket_only()

    def _socket_fd(self, slot: int) -> int:
        if self._shared is not None:
            return self._shared.fileno()
        assert self._reuse is not None
        return self._reuse.fileno(slot)

    # -- running ------------------------------------------------------------------

    def run(self) -> int:
        """Bind, start the workers and supervise them until stopped; returns
        0.  Called from the main thread, it handles SIGTERM, SIGINT, SIGQUIT,
        SIGHUP, SIGTTIN, SIGTTOU, SIGUSR1 (and SIGCHLD) until it returns."""
        self.bind()
        self._waker = Waker(pipe=True)
        r, w = os.pipe2(os.O_CLOEXEC)
        self._lifeline = (r, w)
        try:
            main = threading.current_thread() is threading.main_thread()
            with (Signals(_SIGNALS, self._on_signal, self._waker) if main
                  else contextlib.nullcontext()):
                try:
                    self._pid_file.write()
                    _log.info("supervisor %d: %d worker(s) on %s (%s)", os.getpid(),
                              self.worker_count, self._describe_address(),
                              "one SO_REUSEPORT socket per worker" if self.reuse_port
                              else "one shared socket")
                    self._status.starting(self.worker_count)
                    self._loop()
                finally:
                    self._kill_all()
        finally:
            self._close()
        return 0

    def _describe_address(self) -> str:
        from fastlisten.address import format_address
        try:
            return format_address(self.address)
        except (OSError, RuntimeError):
            return "?"

    def _on_signal(self, signum: int) -> None:
        """A signal's control, asked in the order signals came (the Python
        handler also wakes the loop: it may run after the loop drained the
        wake-up byte and looked at the controls)."""
        self._ask(_SIGNALS[signum])

    def _loop(self) -> None:
        waker = self._waker
        assert waker is not None
        while True:
            self._reap()
            self._handle_controls()
            now = time.monotonic()
            if self._stopping is not None:
                if not self._workers:
                    return
                self._stop_step(now)
            else:
                self._check_workers(now)
                self._balance(now)
                self._steer()
                self._report_readiness()
            self._status.keep_alive(now)
            self._wait(waker, self._next_wakeup(now))

    def _wait(self, waker: Waker, timeout: Optional[float]) -> None:
        poller = select.poll()
        poller.register(waker.fileno(), select.POLLIN)
        by_fd = {w.status_fd: w for w in self._workers.values() if w.status_fd >= 0}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        ms = None if timeout is None else max(0, int(timeout * 1000) + 1)
        try:
            events = poller.poll(ms)
        except InterruptedError:
            events = []
        for fd, _ in events:
            if fd == waker.fileno():
                waker.drain()
            elif fd in by_fd:
                by_fd[fd].read_status()

    def _next_wakeup(self, now: float) -> Optional[float]:
        times: List[float] = []
        if self._workers:
            times.append(now + min(self.timeout / 4, 1.0))
        if self._failures and self._next_spawn > now:
            times.append(self._next_spawn)
        for w in self._workers.values():
            if w.deadline is not None:
                times.append(w.deadline)
            if w.steered_at is not None:
                times.append(w.steered_at + self.linger)
        if self._stop_deadline is not None:
            times.append(self._stop_deadline)
        if self._status.next_watchdog is not None:
            times.append(self._status.next_watchdog)
        return None if not times else max(min(times) - now, 0.0)

    # -- controls -------------------------------------------------------------------

    def _handle_controls(self) -> None:
        """Handle the controls asked since the last pass, each by its
        ``_on_*`` method; once stopping, only a further stop counts."""
        while self.controls:
            control = self.controls.popleft()
            if self._stopping is not None and control not in (Control.STOP, Control.QUIT,
                                                              Control.CHILD):
                continue
            getattr(self, f"_on_{control.value}")()

    def _on_stop(self) -> None:
        if self._stopping is None:
            self._begin_stop("graceful")
        elif self._stopping == "graceful":
            self._begin_stop("now")     # a second SIGTERM/SIGINT: do not wait

    def _on_quit(self) -> None:
        if self._stopping != "now":
            self._begin_stop("now")

    def _on_reload(self) -> None:
        self._generation += 1
        self._failures = 0
        self._failure_shown = None
        self._status.reload_started(self._generation)

    def _on_add_worker(self) -> None:
        self.worker_count += 1
        _log.info("one worker more: %d", self.worker_count)

    def _on_remove_worker(self) -> None:
        if self.worker_count > 1:
            self.worker_count -= 1
            _log.info("one worker fewer: %d", self.worker_count)

    def _on_log_counters(self) -> None:
        log_summary(self.counters())

    def _on_child(self) -> None:
        pass            # the loop reaps on every pass

    def _begin_stop(self, how: str) -> None:
        self._stopping = how
        _log.info("stopping %s: %d worker(s)", "gracefully" if how == "graceful" else "now",
                  len(self._workers))
        self._status.stopping()
        # New connections are refused from now on (a socket systemd passed
        # stays open in systemd, and queues them for the next start).
        self._close_listeners()
        if how == "now":
            for w in self._workers.values():
                w.send(signal.SIGKILL)
            self._stop_deadline = None
            return
        self._stop_deadline = time.monotonic() + self.graceful_timeout + 1.0
        # Each worker empties its socket's queue before its copy closes: the
        # sockets close with the last of them, and would reset what is queued
        # (not systemd's socket: its queue waits for the next start).
        empty = self.config.fd is None
        for w in list(self._workers.values()):
            if w.state not in (State.RETIRING, State.KILLED):
                self._retire(w, close_slot=False, empty_queue=empty)

    def _stop_step(self, now: float) -> None:
        if self._stop_deadline is not None and now >= self._stop_deadline:
            for w in self._workers.values():
                _log.warning("worker %d still running after graceful_timeout: killing it",
                             w.pid)
                w.send(signal.SIGKILL)
            self._stop_deadline = None
        for w in self._workers.values():
            if w.deadline is not None and now >= w.deadline:
                w.send(signal.SIGKILL)
                w.deadline = None

    # -- workers ----------------------------------------------------------------

    def _check_workers(self, now: float) -> None:
        for w in list(self._workers.values()):
            if w.state is State.KILLED:
                continue
            if w.state is State.RETIRING:
                if w.deadline is not None and now >= w.deadline:
                    _log.warning("worker %d did not finish within graceful_timeout: killing "
                                 "it", w.pid)
                    w.send(signal.SIGKILL)
                    w.deadline = None
                continue
            if w.state is State.STARTING:
                last = w.started
            else:
                last = w.record.read()[0]
                if self._failures and w.ready_at is not None and \
                        w.ready_at > self._last_failure and \
                        now - w.ready_at >= self.min_uptime:
                    self._failures = 0      # one started since, and stays up
                    self._failure_shown = None
            if now - last > self.timeout:
                _log.error("worker %d %s for %.3g s (timeout): killing it", w.pid,
                           "has not started" if w.state is State.STARTING else "has not "
                           "run its serving loop", now - last)
                w.send(signal.SIGKILL)
                w.state, w.deadline = State.KILLED, None

    def _balance(self, now: float) -> None:
        live = [w for w in self._workers.values()
                if w.state not in (State.RETIRING, State.KILLED)]
        for w in live:
            if w.state is State.CLOSING and w.slot < self.worker_count:  # SIGTTIN took it back
                w.state, w.steered_at = State.READY, None
        reuse = self._reuse
        for slot in range(self.worker_count):
            if reuse is not None and reuse.listener(slot) is None:
                reuse.open_slot_at(slot)
            here = [w for w in live if w.slot == slot]
            current = [w for w in here if w.generation == self._generation and not w.recycle]
            if not current:
                if self._failures and now < self._next_spawn:
                    continue
                self._spawn(slot)
                continue
            if any(w.state is State.READY for w in current):
                for w in here:
                    if w not in current:
                        self._retire(w, close_slot=False)
        for w in live:
            if w.slot >= self.worker_count:
                self._retire(w, close_slot=self.reuse_port)
        if reuse is not None:
            for i in range(self.worker_count, len(reuse)):
                if reuse.listener(i) is not None and not any(
                        w.slot == i for w in self._workers.values()):
                    reuse.close_slot(i)
            reuse.trim(self.worker_count)

    def _retire(self, w: _Worker, close_slot: bool, empty_queue: bool = False) -> None:
        """Tell worker w to stop accepting and finish (SIGTERM).  A reuseport
        slot that closes after it is first steered away from (linger).
        ``empty_queue`` (a stop: the socket closes for good after it): the
        worker makes the kernel complete no new connection on it and serves
        what is queued first (SIGINT)."""
        now = time.monotonic()
        if close_slot and self.handover == "steer" and w.state in (State.READY,
                                                                   State.CLOSING):
            if w.steered_at is None:
                w.steered_at = now
                w.state = State.CLOSING      # _steer() takes it out of the program now
            if now < w.steered_at + self.linger:
                return
        w.state = State.RETIRING
        w.steered_at = None
        w.deadline = now + self.graceful_timeout + 1.0
        # SIGUSR2: also empty the socket's queue, it closes after this worker
        # (steering or the kernel's migration keeps new connections away).
        # SIGINT: the same, the stop's: no new connection is let in first.
        if empty_queue:
            w.send(signal.SIGINT)
        else:
            w.send(signal.SIGUSR2 if close_slot else signal.SIGTERM)

    def _spawn(self, slot: int) -> None:
        limit = 0
        if self.max_requests:
            limit = self.max_requests + random.randint(0, self.max_requests_jitter)
        record = Record()
        record.write(time.monotonic(), 0, 0, 0)
        r, w = os.pipe2(os.O_CLOEXEC)
        generation = self._generation
        try:
            job = self._job(slot, generation, w, record, limit)
            pid = os.fork()
        except BaseException:
            os.close(r)
            os.close(w)
            record.close()
            raise
        if pid == 0:        # the worker
            code = 1
            try:
                os.close(r)
                code = worker_main(job)
            except BaseException:   # noqa: BLE001 - a worker never returns into the parent
                _log.exception("worker %d failed", os.getpid())
            finally:
                try:
                    logging.shutdown()
                finally:
                    os._exit(code)
        os.close(w)
        os.set_blocking(r, False)
        try:
            os.setpgid(pid, pid)    # as the worker does: whichever runs first
        except OSError:
            pass                    # it has done so, or is gone already
        self._workers[pid] = _Worker(pid=pid, slot=slot, generation=generation, status_fd=r,
                                     record=record, limit=limit, started=time.monotonic())
        _log.debug("started worker %d (slot %d, generation %d)", pid, slot, generation)

    def _reap(self) -> None:
        for pid, w in list(self._workers.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if not done:
                continue
            del self._workers[pid]
            while w.status_fd >= 0 and w.read_status():
                pass            # what it said before it ended
            w.close()
            self._exited_worker(w, status)

    def _exited_worker(self, w: _Worker, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        how = f"exit code {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
        expected = w.state in (State.RETIRING, State.CLOSING) or self._stopping is not None
        self._counters.count_exit(expected)
        if expected:
            _log.debug("worker %d ended (%s)", w.pid, how)
            if self.reuse_port and w.slot >= self.worker_count and self._stopping is None:
                if not any(x.slot == w.slot for x in self._workers.values()):
                    assert self._reuse is not None
                    self._reuse.close_slot(w.slot)
            return
        now = time.monotonic()
        if w.ready_at is None:
            self._failures += 1
            self._last_failure = now
            delay = min(self.backoff * 2 ** (self._failures - 1), self.max_backoff)
            self._next_spawn = now + delay
            cause = self._start_failure(w, how)
            if any(x.generation < w.generation and x.state is State.READY
                   for x in self._workers.values()):
                _log.error("reload failed: the old generation is still serving; retrying "
                           "in %.3g s (worker %d: %s)", delay, w.pid, cause)
            else:
                _log.error("worker %d could not start (%s); %d failure(s) in a row: "
                           "next start in %.3g s", w.pid, cause, self._failures, delay)
            self._status.start_failed(self._failures, delay, cause,
                                      ends_reload=w.generation == self._generation)
        else:
            _log.warning("worker %d ended (%s): replacing it", w.pid, how)

    def _start_failure(self, w: _Worker, how: str) -> str:
        """One line on why worker w could not start (what it said, else how
        it ended); its traceback is logged once, not again while the same
        failure repeats."""
        text = (w.failure or b"").decode("utf-8", "replace")
        line, _, trace = text.partition("\n")
        if trace and trace != self._failure_shown:
            self._failure_shown = trace
            _log.error("worker %d could not start:\n%s", w.pid, trace)
        return line or how

    def _kill_all(self) -> None:
        """On the way out (also after an error): no worker left behind."""
        for w in self._workers.values():
            w.send(signal.SIGKILL)
        for pid, w in list(self._workers.items()):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            w.close()
        self._workers.clear()

    def _close_listeners(self) -> None:
        if self._shared is not None:
            self._shared.close()
            self._shared = None
        if self._reuse is not None:
            self._reuse.close()

    def _close(self) -> None:
        self._close_listeners()
        if self._lifeline is not None:
            for fd in self._lifeline:
                os.close(fd)
            self._lifeline = None
        if self._waker is not None:
            self._waker.close()
            self._waker = None
        self._pid_file.remove()
        if self._stopping is not None:
            self._status.stopped()

    # -- reuseport steering ----------------------------------------------------

    def _steer(self) -> None:
        """Point new connections at the slots whose worker accepts."""
        if self._reuse is None:
            return
        self._reuse.steer({w.slot for w in self._workers.values()
                           if w.state is State.READY and w.slot < self.worker_count})

    # -- readiness and counters ----------------------------------------------------

    def _report_readiness(self) -> None:
        ready = {w.slot for w in self._workers.values()
                 if w.state is State.READY and w.generation == self._generation}
        if len(ready & set(range(self.worker_count))) < self.worker_count:
            return
        self._status.accepting(self.worker_count, self._generation, any(
            w.generation < self._generation and w.state not in (State.RETIRING, State.KILLED)
            for w in self._workers.values()))

    def counters(self) -> Dict[str, Any]:
        """Counters summed over the live workers, and per worker:
        ``workers`` ({pid: {"accepted", "handlers_running", "handlers_peak",
        "slot", "generation", "state"}}), ``accepted``, ``handlers_running``,
        ``imbalance`` (max/min accepted among ready workers), ``exited``
        (workers that ended, expected or not)."""
        listeners = [self._shared] if self._shared is not None else (
            self._reuse.listeners() if self._reuse is not None else [])
        return self._counters.summary(self._workers.values(), self.worker_count,
                                      self._generation, listeners)

    # -- the worker process ------------------------------------------------------

    def _job(self, slot: int, generation: int, status_fd: int, record: Record,
             limit: int) -> WorkerJob:
        """What the worker about to be forked for ``slot`` runs."""
        return WorkerJob(
            server_class=self.server_class, handler=self.handler, config=self.config,
            generation=generation, listen_fd=self._socket_fd(slot), status_fd=status_fd,
            lifeline_fd=self._lifeline_fds()[0], record=record, limit=limit,
            poll_interval=min(0.1, self.timeout / 4), graceful_timeout=self.graceful_timeout,
            parent_fds=self._parent_fds(slot), supervisor_signals=tuple(_SIGNALS))

    def _lifeline_fds(self) -> Tuple[int, int]:
        assert self._lifeline is not None
        return self._lifeline

    def _parent_fds(self, slot: int) -> Tuple[int, ...]:
        """What the parent holds that the worker for ``slot`` must not keep:
        the other slots' sockets (else a closed slot would live on there),
        the other workers' pipes, the parent's waker and lifeline write end."""
        fds = [other.status_fd for other in self._workers.values() if other.status_fd >= 0]
        if self._reuse is not None:
            fds += self._reuse.other_fds(slot)
        if self._waker is not None:
            fds += sorted({self._waker.fileno(), self._waker.write_fileno()})
        fds.append(self._lifeline_fds()[1])
        return tuple(fds)
