"""A worker process: what runs after the supervisor's fork (see
:mod:`fastlisten.workers`).

The supervisor describes what to run in a frozen :class:`WorkerJob`;
:func:`worker_main` sets the process up (its own process group, the
supervisor's signals left to the supervisor, the supervisor's descriptors
closed), builds the server on the inherited listening socket and runs
:class:`_WorkerLoop`: ``serve_forever()`` in a thread, the heartbeat written
from the serving loop, and the stops the supervisor asks for by signal
(handled through :class:`fastlisten.running.Signals`, as
``serve_until_signalled`` handles its own, with the same serving thread
and the same reset in a process forked for a handler).
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import socket
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from fastlisten._heartbeat import Record
from fastlisten._queued import grace_left, serve_queued
from fastlisten._server_hooks import FastServer, PeriodicActions
from fastlisten.config import ListenConfig
from fastlisten.errors import user_error_line, user_traceback
from fastlisten.running import Outcome, Signals, _method
from fastlisten.services import load_handler

__all__ = ["WorkerJob", "worker_main", "READY", "RECYCLE", "FAILED", "FAILURE_MAX"]

_log = logging.getLogger("fastlisten.workers")

#: Bytes a worker writes on its status pipe; FAILED is followed by what
#: kept it from starting (a line, then its traceback) until the pipe ends.
READY, RECYCLE, FAILED = b"R", b"M", b"F"

#: The most of a failure's text a worker sends (well below a pipe's buffer).
FAILURE_MAX = 16384


@dataclass(frozen=True)
class WorkerJob:
    """What one worker process runs, as the supervisor decided it before
    the fork."""

    #: Called as ``server_class(address, handler, bind_and_activate=False)``.
    server_class: Callable[..., Any]
    #: The request handler class, or ``"module:Class"``.
    handler: Any
    #: The listener options (the address, and what the server applies:
    #: PROXY protocol, TLS, connection options).
    config: ListenConfig
    #: 0 for the first workers; a reload's import the handler afresh.
    generation: int
    #: The inherited listening socket this worker serves.
    listen_fd: int
    #: Where the worker says READY, RECYCLE or FAILED.
    status_fd: int
    #: Read end of the pipe whose end tells the supervisor died.
    lifeline_fd: int
    #: Heartbeat and counters, shared with the supervisor.
    record: Record
    #: Connections after which the worker asks to be replaced (0: never).
    limit: int
    #: serve_forever's poll_interval (so the heartbeat's period).
    poll_interval: float
    #: Seconds the running handlers get when the worker stops.
    graceful_timeout: float
    #: The supervisor's descriptors this worker must not keep (other
    #: workers' pipes, other slots' sockets, its waker, the lifeline's
    #: write end).
    parent_fds: Tuple[int, ...]
    #: The signals the supervisor handles (back to their defaults here).
    supervisor_signals: Tuple[int, ...]


def worker_main(job: WorkerJob) -> int:
    """The body of a worker process (after fork); returns its exit code."""
    # Its own process group: the supervisor's SIGKILL reaches the
    # processes it forks too, and a terminal's Ctrl-C reaches the
    # supervisor alone, which decides.
    os.setpgid(0, 0)
    signal.set_wakeup_fd(-1)
    for sig in job.supervisor_signals:
        signal.signal(sig, signal.SIG_DFL)
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN,
                signal.SIGTTOU, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)   # the parent's business
    for fd in job.parent_fds:
        os.close(fd)
    try:
        server = _worker_server(job)
    except Exception as exc:   # noqa: BLE001 - said once, by the supervisor
        _tell_failure(job.status_fd, exc)
        return 1
    return _WorkerLoop(server, job.status_fd, job.record, job.limit, job.lifeline_fd,
                       job.poll_interval, job.graceful_timeout).run()


def _worker_server(job: WorkerJob) -> Any:
    """The worker's server on the inherited socket, its handler (and
    class) imported afresh after a reload."""
    handler, server_class = job.handler, job.server_class
    if isinstance(handler, str):
        handler = load_handler(handler)
    if job.generation > 0:
        handler, server_class = _fresh(handler), _fresh(server_class)
    sock = socket.socket(fileno=job.listen_fd)
    server = server_class(job.config.address if job.config.fd is None
                          else sock.getsockname(), handler, bind_and_activate=False)
    _adopt_socket(server, sock)
    if isinstance(server, FastServer):
        # Workers' listen_config is its own (the PROXY protocol and
        # connection options apply in the worker)
        server._fl_config = job.config
    return server


# -- re-importing the handler on reload ----------------------------------------

_STDLIB = tuple({sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib")})


def _fresh(obj: Any) -> Any:
    """``obj`` (a class) looked up again after its top-level package and
    submodules are imported afresh from disk; ``obj`` itself when it lives
    in ``__main__``, the standard library or fastlisten (those stay)."""
    module_name = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module_name or not qualname or module_name == "__main__":
        return obj
    top = module_name.partition(".")[0]
    module = sys.modules.get(top)
    path = getattr(module, "__file__", None) or ""
    if top in ("fastlisten", "builtins") or top in sys.builtin_module_names \
            or not path or path.startswith(_STDLIB):
        return obj
    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        del sys.modules[name]
    importlib.invalidate_caches()
    fresh: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        fresh = getattr(fresh, part)
    return fresh


# -- the worker's serving loop ---------------------------------------------------

def _tell_failure(status_fd: int, exc: BaseException) -> None:
    """In a worker that cannot start: tell the supervisor why (a line, then
    the traceback of the user's code only), for it to say once, instead of
    every worker logging the same traceback at every retry."""
    text = f"{user_error_line(exc)}\n{user_traceback(exc)}".encode("utf-8", "replace")
    data = memoryview(FAILED + text[:FAILURE_MAX])
    try:
        while data:
            data = data[os.write(status_fd, data):]
    except OSError:
        pass        # the supervisor is gone


def _fastlisten_drain(server: Any) -> Optional[Callable[[float], int]]:
    """fastlisten's drain() of a server built on its classes (not a drain
    a subclass defines for its own purposes), or None for another server."""
    return _method(server, "drain")


def _adopt_socket(server: Any, sock: socket.socket) -> None:
    """Give a server built with bind_and_activate=False the listening socket
    ``sock`` (what server_bind() and server_activate() would have made)."""
    old = getattr(server, "socket", None)
    if old is not None and old is not sock:
        old.close()
    # Non-blocking, and left so: the file description is shared with the
    # other workers, whose loops rely on EAGAIN (a blocking accept4() after
    # another worker took the connection would hang a graceful stop).
    sock.setblocking(False)
    server.socket = sock
    server.server_address = sock.getsockname()
    http = sys.modules.get("http.server")
    if http is not None and isinstance(server, http.HTTPServer):
        # what HTTPServer.server_bind (and WSGIServer's) set after binding
        host, port = server.server_address[:2]
        server.server_name = socket.getfqdn(host)
        server.server_port = port
        if hasattr(server, "setup_environ"):
            server.setup_environ()


#: The signals a worker stops on, and how: SIGTERM leaves the socket's
#: queue to a successor, SIGUSR2 serves what is queued (its reuse-port slot
#: closes), SIGINT (the supervisor's stop) first lets no new connection in.
_STOPS: Dict[int, str] = {signal.SIGTERM: "graceful", signal.SIGUSR2: "empty",
                          signal.SIGINT: "final"}


class _StopServing(BaseException):
    """Raised by a worker's service_actions to end serve_forever() between
    two batches: every connection the loop accepted has been handed to the
    server (shutdown() from another thread may close part of a batch)."""


class _WorkerLoop:
    """A worker: serve_forever() in a thread; the main thread waits for
    SIGTERM (graceful stop), SIGUSR2 (graceful stop that empties the
    socket's queue first), SIGINT (the supervisor's stop: as SIGUSR2, after
    the kernel is made to let no new connection in) or the parent's death
    (the lifeline pipe ends)."""

    def __init__(self, server: Any, status_fd: int, record: Record, limit: int,
                 lifeline: int, poll_interval: float, graceful_timeout: float) -> None:
        self.server = server
        self.status_fd = status_fd
        self.record = record
        self.limit = limit
        self.lifeline = lifeline
        self.poll_interval = poll_interval
        self.graceful_timeout = graceful_timeout
        self.stop: Optional[str] = None
        self.stopping = threading.Event()
        self.recycle_sent = False
        self.counted = 0      # connections, for servers without fastlisten's counters
        #: The server's fastlisten hooks, if it has them.
        self.fast: Optional[FastServer] = server if isinstance(server, FastServer) else None
        if self.fast is None:
            self._count_requests()

    def _count_requests(self) -> None:
        verify = self.server.verify_request

        def counting_verify(request: Any, client_address: Any) -> bool:
            self.counted += 1
            return bool(verify(request, client_address))
        self.server.verify_request = counting_verify

    def accepted(self) -> int:
        listener = self.fast._fl_listener if self.fast is not None else None
        if listener is not None:
            return int(listener.stats()["accepted"])
        return self.counted

    def beat(self) -> None:
        """Heartbeat and counters into the parent's shared memory (the
        serving loop calls this through service_actions)."""
        accepted = self.accepted()
        running, peak = self.fast._fl_handlers() if self.fast is not None else (0, 0)
        self.record.write(time.monotonic(), accepted, running, peak)
        if self.limit and accepted >= self.limit and not self.recycle_sent:
            self.recycle_sent = True
            self._tell(RECYCLE)

    def _tell(self, what: bytes) -> None:
        try:
            os.write(self.status_fd, what)
        except OSError:
            pass        # the parent is gone: the lifeline says so too

    def run(self) -> int:
        server = self.server
        actions = server.service_actions

        def service_actions() -> None:
            actions()
            self.beat()
            if self.stopping.is_set():
                raise _StopServing
        # Every poll_interval is enough (a fastlisten ThreadingMixIn keeps
        # leader/follower for it: its serving thread then accepts nothing).
        server.service_actions = PeriodicActions(service_actions)
        # Handled until the worker exits (the queue's serving and the drain
        # included); a process forked for a handler resets them
        # (running.reset_after_fork).
        with Signals(_STOPS) as signals:
            self.beat()
            served = Outcome(lambda: server.serve_forever(self.poll_interval),
                             "fastlisten-worker", signals.wakeup)
            self._tell(READY)
            self._wait(signals, served)
            served.thread.join()
            if served.exception is not None and not isinstance(served.exception,
                                                               _StopServing):
                raise served.exception
            if self.stop is None:
                return 1            # serve_forever returned by itself
            # Every stop serves what is queued now, the successor's socket
            # too (a reload, a recycle): a connection whose one wake-up went
            # to this worker's threads just before its loop stopped
            # (EPOLLEXCLUSIVE wakes one waiting thread) wakes nobody else,
            # and would otherwise wait for the next one to arrive.
            # (one deadline for the queue, the accept filter's waiting
            # connections and the drain)
            deadline = time.monotonic() + self.graceful_timeout
            # (the accept filter's waiting connections too, as they become
            # ready within the grace: taking no new one, a successor's)
            self._empty_queue(final=self.stop == "final", timeout=self.graceful_timeout)
            # Stop listening before the handlers drain: this copy of the socket
            # must not hold connections nobody will accept.
            server.socket.close()
            drain = _fastlisten_drain(server)
            if drain is not None:
                ended = drain(max(0.0, deadline - time.monotonic()))
                if ended:
                    _log.info("worker %d: ended %d handler(s) after %.3g s", os.getpid(),
                              ended, self.graceful_timeout)
            server.server_close()
            self.beat()
        return 0

    def _wait(self, signals: Signals, served: Outcome) -> None:
        """Until serve_forever() returns: the first stop signal (or the
        supervisor's death: the lifeline ends) sets :attr:`stop` and makes
        the serving loop stop between two batches."""
        lifeline: Tuple[int, ...] = (self.lifeline,)
        while not served.done:
            ended = signals.wait(None, lifeline)
            if self.stop is None and signals.first is not None:
                self.stop = _STOPS[signals.first]
            if ended:
                lifeline = ()       # (read to its end: watched no more)
                if self.stop is None:
                    _log.warning("worker %d: the supervisor is gone; stopping", os.getpid())
                    self.stop = "orphan"
            if self.stop is not None and not self.stopping.is_set():
                self._stop_gracefully()
                self.stopping.set()
                if self.fast is not None:
                    self.fast._fl_wake()    # its loop runs service_actions at once

    def _stop_gracefully(self) -> None:
        """Before the loop stops: a fastlisten server leaves the
        connections waiting in its accept filter to _empty_queue(), which
        serves those that become ready within the grace."""
        graceful = _method(self.server, "_fl_stop_gracefully")
        if graceful is not None:
            graceful()

    def _serve_kept(self) -> None:
        """The connections a fastlisten loop had accepted when it stopped
        still reach a handler (else they would wait unanswered until this
        worker exits)."""
        serve_kept = _method(self.server, "_fl_serve_kept")
        if serve_kept is not None:
            serve_kept()

    def _empty_queue(self, final: bool, timeout: float) -> None:
        """Serve the connections still queued on this worker's socket: no
        reset for them when it closes.  ``final`` (a stop: it closes for
        good): first the kernel is made to complete no new connection on it;
        else (a reuseport slot that goes away, or a successor that shares
        the socket) what is queued now is served, and steering, the
        kernel's migration or the successor sees to the rest.  With an
        accept filter, the connections waiting in it are served as they
        become ready within ``timeout`` seconds (0: not waited for), then
        the rest are closed."""
        # a fastlisten server's own call also serves what its loop kept
        # (fastlisten's implementation: a subclass's serve_queued is its own)
        own = _method(self.server, "serve_queued")
        start = time.monotonic()
        try:
            if own is not None and final:
                own(timeout=timeout)
            else:
                self._serve_kept()      # (the grace counts from the start)
                serve_queued(self.server, door=final, timeout=grace_left(timeout, start))
        except OSError as exc:
            _log.warning("worker %d: cannot empty the accept queue: %s", os.getpid(), exc)
