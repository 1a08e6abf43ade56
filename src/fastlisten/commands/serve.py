"""``fastlisten serve``: run a TCP (or Unix socket) server from the command line.

    fastlisten serve daytime --bind 127.0.0.1:4481
    fastlisten serve echo --bind [::1]:7 --threads 32 --stats-interval 10
    fastlisten serve mypkg.handlers:Handler --processes 4 --bind :8000

The handler is a built-in (daytime, RFC 867; echo; discard) or any
``module:Class`` socketserver request handler (anything called as
``Class(request, client_address, server)``); the current directory is
searched for the module.  Connections run in a pool of threads (default) or
each in a forked process, at most ``--threads``/``--processes`` at once;
the rest wait in the kernel's accept queue, visible in the counters.

The first line on stdout is ``listening on ADDRESS`` (with the port the
kernel chose for port 0).  SIGUSR1 logs the counters (so does
``--stats-interval``); SIGINT or SIGTERM stop accepting, give running
handlers ``--grace`` seconds, then end them, and exit 0 (a second signal
ends them at once).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import select
import signal
import socket
import sys
import threading
import queue
from time import monotonic
from typing import Any, Callable, Dict, List, Optional, Set

from fastlisten import config as _config
from fastlisten.errors import format_address
from fastlisten.listener import Listener
from fastlisten.services import BUILTIN

_log = logging.getLogger("fastlisten.serve")

#: Most connections taken per wake-up.
_BATCH = 64

#: The signals serve handles.  Every thread but the main one blocks them, so
#: that the kernel delivers them where Python runs its handlers.
_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGCHLD}


def add_parser(subparsers: Any) -> None:
    """Register ``serve``."""
    p = subparsers.add_parser(
        "serve", help="run a server: daytime, echo, discard or module:Class",
        description=(__doc__ or "").split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("handler", metavar="HANDLER",
                   help="daytime, echo, discard, or module:Class (a request handler)")
    _config.add_arguments(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--threads", type=int, default=None, metavar="N",
                      help="handle connections in a pool of N threads (default 16)")
    mode.add_argument("--processes", type=int, default=None, metavar="N",
                      help="handle each connection in a forked process, at most N at once")
    p.add_argument("--stats-interval", type=float, default=None, metavar="SECONDS",
                   help="log the counters this often (SIGUSR1 logs them any time)")
    p.add_argument("--grace", type=float, default=5.0, metavar="SECONDS",
                   help="on SIGINT/SIGTERM, how long running handlers may finish (default 5)")
    p.set_defaults(run=run)


def load_handler(spec: str) -> Callable[..., Any]:
    """A built-in handler's class, or ``module:Class`` imported (the current
    directory is on the path).  Raises ValueError saying what is wrong."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if ":" not in spec:
        raise ValueError(f"unknown handler {spec!r}: use one of "
                         f"{', '.join(sorted(BUILTIN))}, or module:Class")
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"handler {spec!r}: cannot import {module_name!r}: {exc}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"handler {spec!r}: {module_name!r} has no {attr!r}") from None
    if not callable(obj):
        raise ValueError(f"handler {spec!r} is not callable (a request handler class)")
    return obj


def format_counters(c: Dict[str, Any]) -> str:
    """Counters as one log line."""
    errors = ", ".join(f"{errno.errorcode.get(e, e)}={n}" for e, n in c["errors"].items())
    parts = [
        f"accepted={c['accepted']}", f"batches={c['batches']}",
        f"max_batch={c['max_batch']}", f"handlers_running={c['handlers_running']}",
        f"handlers_peak={c['handlers_peak']}", f"queued={c['queued']}",
        f"deepest_queue={c['deepest_queue']}", f"backlog={c['backlog']}",
        f"accept_errors={{{errors}}}", f"capacity_episodes={c['capacity_episodes']}",
        f"ListenOverflows=+{c['listen_overflows_since_open']}",
        f"ListenDrops=+{c['listen_drops_since_open']}",
    ]
    return " ".join(parts)


class CommandServer:
    """The server ``fastlisten serve`` runs: an accept loop over a Listener
    dispatching each connection to a pool of threads or a forked process.

    Two roles, so that no signal is ever lost: an *acceptor* thread waits in
    ``accept_many`` (signals blocked there, as in the workers), and the main
    thread supervises: it sleeps on a self-pipe that the C-level signal
    handler writes to (``signal.set_wakeup_fd``), so a signal arriving at any
    instant wakes it, runs the Python handlers, logs counters, reaps
    children, and wakes the acceptor through ``Listener.wakeup()``.  (A
    signal that lands just before a thread enters poll() would otherwise
    wait for the next connection.)

    Handlers see it as their ``server``: ``server_address``, ``listener``,
    ``handler``.  Methods for the caller: serve() (from the main thread),
    stop(), request_stats(), close().
    """

    def __init__(self, listener: Listener, handler: Callable[..., Any], *,
                 threads: Optional[int] = None, processes: Optional[int] = None,
                 stats_interval: Optional[float] = None, grace: float = 5.0) -> None:
        for name, value in (("threads", threads), ("processes", processes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"--{name} must be a positive integer, not {value!r}")
        if stats_interval is not None and not stats_interval > 0:
            raise ValueError(f"--stats-interval must be positive, not {stats_interval!r}")
        if not grace >= 0:
            raise ValueError(f"--grace must be >= 0, not {grace!r}")
        self.listener = listener
        self.handler = handler
        self.server_address = listener.address
        self.forking = processes is not None
        self.limit = processes if processes is not None else (threads or 16)
        self.stats_interval = stats_interval
        self.grace = grace
        self._stopping = False
        self._force = False
        self._stats_requested = False
        self._slots = threading.Condition()     # guards the four below
        self._in_flight = 0
        self._conns: Set[socket.socket] = set()
        self._children: Set[int] = set()
        self._accept_error: Optional[BaseException] = None
        self._jobs: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._threads: List[threading.Thread] = []   # workers, made by the acceptor
        self._idle = 0                                # workers waiting for a job
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- requests (signal handlers call these: flags and a wake-up only) --

    def stop(self) -> None:
        """Stop accepting and shut down; a second call ends running handlers
        at once.  Safe from a signal handler and from any thread."""
        if self._stopping:
            self._force = True
        self._stopping = True
        self._wake()

    def request_stats(self) -> None:
        """Log the counters at once (SIGUSR1)."""
        self._stats_requested = True
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass    # full: a wake-up is pending anyway; closed: we are done

    def _sleep(self, timeout: Optional[float]) -> None:
        """Wait until something wrote to the self-pipe (a signal, a handler
        done, stop()) or ``timeout`` passed; Python signal handlers run."""
        select.select([self._wake_r], [], [], timeout)
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    # -- the supervisor (main thread) --------------------------------------

    def serve(self) -> None:
        """Serve until stop(); then let running handlers finish (``grace``)."""
        # Threads inherit the signal mask of the thread that starts them:
        # the acceptor starts the workers, so only the main thread takes signals.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            acceptor = threading.Thread(target=self._accept_loop,
                                        name="fastlisten-serve-accept")
            acceptor.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        next_stats = None if self.stats_interval is None else monotonic() + self.stats_interval
        try:
            while not self._stopping:
                timeout = None if next_stats is None else max(next_stats - monotonic(), 0.0)
                self._sleep(timeout)
                if self.forking:
                    self._reap()
                if next_stats is not None and monotonic() >= next_stats:
                    self._stats_requested = True
                    next_stats = monotonic() + self.stats_interval  # type: ignore[operator]
                if self._stats_requested:
                    self._stats_requested = False
                    _log.info("counters: %s", format_counters(self.counters()))
        finally:
            self._stopping = True
            with self._slots:
                self._slots.notify_all()
            self.listener.wakeup()
            acceptor.join()
            self._finish()
        if self._accept_error is not None:
            raise self._accept_error

    def counters(self) -> Dict[str, Any]:
        """The listener's counters (see Listener.counters)."""
        return self.listener.counters()

    # -- the acceptor thread ------------------------------------------------

    def _accept_loop(self) -> None:
        try:
            while True:
                with self._slots:
                    while self._in_flight >= self.limit and not self._stopping:
                        self._slots.wait()      # a handler finishing notifies
                    free = self.limit - self._in_flight
                if self._stopping:
                    return
                for conn, addr in self.listener.accept_many(min(free, _BATCH)):
                    self._dispatch(conn, addr)
        except BaseException as exc:   # noqa: BLE001 - reported by serve()
            self._accept_error = exc
            self.stop()

    def _dispatch(self, conn: socket.socket, addr: Any) -> None:
        if self._stopping:
            conn.close()
            return
        if self.forking:
            self._fork(conn, addr)
            return
        with self._slots:
            self._in_flight += 1
            self._conns.add(conn)
            spawn = self._idle == 0 and len(self._threads) < self.limit
            if spawn:           # threads are made as the load asks, then reused
                self._idle += 1
        if spawn:
            t = threading.Thread(target=self._worker,
                                 name=f"fastlisten-serve-{len(self._threads)}")
            t.start()
            self._threads.append(t)
        self._jobs.put((conn, addr))

    # -- threads --------------------------------------------------------------

    def _worker(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._slots:
                self._idle -= 1
            conn, addr = job
            try:
                self._handle(conn, addr)
            finally:
                with self._slots:
                    self._in_flight -= 1
                    self._idle += 1
                    self._conns.discard(conn)
                    self._slots.notify()
                self._wake()

    def _handle(self, conn: socket.socket, addr: Any) -> None:
        """Run the handler on one connection, then shut it down as
        socketserver's shutdown_request does."""
        try:
            with self.listener.handling():
                self.handler(conn, addr, self)
        except Exception:   # noqa: BLE001 - one connection's failure is logged, not fatal
            _log.exception("handler failed on a connection from %s", format_address(addr))
        finally:
            try:
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            conn.close()

    # -- processes ------------------------------------------------------------

    def _fork(self, conn: socket.socket, addr: Any) -> None:
        with self._slots:      # counted before the child can exit and be reaped
            self._in_flight += 1
            pid = os.fork()
            if pid:
                self._children.add(pid)
        if pid == 0:   # the child: handle this one connection and leave
            status = 1
            try:
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGINT, signal.SIGUSR1):
                    signal.signal(sig, signal.SIG_IGN)   # the parent decides when we stop
                for sig in (signal.SIGTERM, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
                os.close(self._wake_r)
                os.close(self._wake_w)
                self.listener.close()
                self._handle(conn, addr)
                status = 0
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(status)
        conn.close()
        self.listener.handler_started()

    def _reap(self) -> None:
        """Collect exited children (main thread, woken by SIGCHLD)."""
        while True:
            with self._slots:
                if not self._children:
                    return
                try:
                    pid, _ = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    pid, gone = 0, len(self._children)
                    self._children.clear()   # reaped by someone else
                    self._in_flight -= gone
                    for _ in range(gone):
                        self.listener.handler_finished()
                    self._slots.notify_all()
                    return
                if pid == 0:
                    return
                if pid in self._children:
                    self._children.discard(pid)
                    self._in_flight -= 1
                    self.listener.handler_finished()
                    self._slots.notify()

    # -- shutting down ----------------------------------------------------------

    def _finish(self) -> None:
        """Stop listening, give handlers the grace period, then end them."""
        self.listener.close()
        grace_end = monotonic() + self.grace
        while self._busy() and not self._force and monotonic() < grace_end:
            self._sleep(max(grace_end - monotonic(), 0.0))
        if self._busy():
            _log.info("ending %d running handler(s)", self._in_flight)
            self._end_handlers()
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()
        self._threads = []
        deadline: Optional[float] = monotonic() + 5.0
        while self._busy():       # children told to end: wait (SIGCHLD wakes us)
            if deadline is not None and monotonic() >= deadline:
                with self._slots:
                    children = list(self._children)
                for pid in children:     # ignored SIGTERM: no more asking
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                deadline = None
            self._sleep(None if deadline is None else max(deadline - monotonic(), 0.0))

    def _busy(self) -> bool:
        if self.forking:
            self._reap()
        with self._slots:
            return self._in_flight > 0

    def _end_handlers(self) -> None:
        with self._slots:
            conns = list(self._conns)
            children = list(self._children)
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for conn in conns:   # their recv() returns b"", their send() fails: handlers end
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        """Release the server's own descriptors (serve() closes the listener)."""
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1


def run(args: argparse.Namespace) -> int:
    """Run the server until SIGINT/SIGTERM; 0 on a clean shutdown."""
    try:
        handler = load_handler(args.handler)
        cfg = _config.from_args(args)
    except (ValueError, TypeError, OverflowError, OSError) as exc:
        print(f"fastlisten serve: error: {exc}", file=sys.stderr)
        return 2
    try:
        listener = Listener.from_config(cfg)
    except OSError as exc:
        print(f"fastlisten serve: {exc}", file=sys.stderr)
        return 1
    try:
        server = CommandServer(listener, handler, threads=args.threads,
                               processes=args.processes,
                               stats_interval=args.stats_interval, grace=args.grace)
    except ValueError as exc:
        listener.close()
        print(f"fastlisten serve: error: {exc}", file=sys.stderr)
        return 2
    mode = (f"{server.limit} processes" if server.forking else f"{server.limit} threads")
    previous = {}
    handlers = {signal.SIGINT: lambda s, f: server.stop(),
                signal.SIGTERM: lambda s, f: server.stop(),
                signal.SIGUSR1: lambda s, f: server.request_stats(),
                signal.SIGCHLD: lambda s, f: None}   # the wake-up fd does the work
    old_wakeup_fd = None
    try:
        for sig, fn in handlers.items():
            previous[sig] = signal.signal(sig, fn)
        old_wakeup_fd = signal.set_wakeup_fd(server._wake_w, warn_on_full_buffer=False)
        # Only now, with the handlers in place, tell the world we are up.
        print(f"listening on {format_address(listener.address)}", flush=True)
        _log.info("serving %s on %s (%s, backlog %s, %s core); SIGUSR1 logs counters, "
                  "SIGINT/SIGTERM stop", args.handler, format_address(listener.address),
                  mode, listener.backlog, "compiled" if _compiled() else "pure-Python")
        server.serve()
    finally:
        if old_wakeup_fd is not None:
            signal.set_wakeup_fd(old_wakeup_fd)
        for sig, old in previous.items():
            signal.signal(sig, old)
        server.close()
        listener.close()
    _log.info("stopped; counters: %s", format_counters(listener.counters()))
    return 0


def _compiled() -> bool:
    from fastlisten._backend import compiled
    return compiled
