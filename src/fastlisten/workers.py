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
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import logging
import mmap
import os
import random
import select
import signal
import socket
import struct
import sys
import sysconfig
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from fastlisten import sysinfo
from fastlisten._queued import serve_queued
from fastlisten._wakeup import Waker
from fastlisten.config import ListenConfig
from fastlisten.errors import EphemeralPortWarning, user_error_line, user_traceback
from fastlisten.listener import Listener
from fastlisten.server import _own_method
from fastlisten.systemd import Notifier

__all__ = ["Workers"]

_log = logging.getLogger("fastlisten.workers")

class _Record:
    """One worker's record, in memory it shares with the supervisor:
    heartbeat (CLOCK_MONOTONIC seconds), connections accepted, handlers
    running, handlers peak.  Each field is an aligned 8-byte word stored and
    loaded whole (one machine store or load, through memoryview casts), so
    the supervisor never reads a half-written record.  (struct.pack_into
    zero-fills before it writes: a heartbeat read as 0.0 in between made the
    supervisor kill a healthy worker, and reset the connections it held.)"""

    def __init__(self) -> None:
        self._shm = mmap.mmap(-1, 32)
        view = memoryview(self._shm)
        self._time = view[:8].cast("d")
        self._counts = view[8:].cast("Q")
        view.release()

    def write(self, heartbeat: float, accepted: int, running: int, peak: int) -> None:
        counts = self._counts
        counts[0], counts[1], counts[2] = accepted, running, peak
        self._time[0] = heartbeat

    def read(self) -> Tuple[float, int, int, int]:
        counts = self._counts
        return self._time[0], counts[0], counts[1], counts[2]

    def close(self) -> None:
        self._time.release()
        self._counts.release()
        self._shm.close()


#: Bytes a worker writes on its status pipe; _FAILED is followed by what
#: kept it from starting (a line, then its traceback) until the pipe ends.
_READY, _RECYCLE, _FAILED = b"R", b"M", b"F"

#: The most of a failure's text a worker sends (well below a pipe's buffer).
_FAILURE_MAX = 16384

_SO_ATTACH_REUSEPORT_CBPF = 51
_SO_DETACH_REUSEPORT_BPF = 68


# -- the reuseport steering program -------------------------------------------

# Classic BPF opcodes (linux/filter.h) for the program below.
_BPF_LD_W_ABS = 0x00 | 0x00 | 0x20      # BPF_LD | BPF_W | BPF_ABS
_BPF_ALU_MOD_K = 0x04 | 0x90 | 0x00     # BPF_ALU | BPF_MOD | BPF_K
_BPF_JEQ_K = 0x05 | 0x10 | 0x00         # BPF_JMP | BPF_JEQ | BPF_K
_BPF_RET_K = 0x06 | 0x00                # BPF_RET | BPF_K
_SKF_AD_RANDOM = -0x1000 + 56           # SKF_AD_OFF + SKF_AD_RANDOM


def steering_program(indices: List[int]) -> List[Tuple[int, int, int, int]]:
    """A classic BPF program for ``SO_ATTACH_REUSEPORT_CBPF`` that sends
    each new connection to one of the reuseport group members at
    ``indices`` (positions in the group's socket array), uniformly at
    random: ``A = random % len(indices)`` then a jump table."""
    if not indices:
        raise ValueError("steering needs at least one socket to steer to")
    prog = [(_BPF_LD_W_ABS, 0, 0, _SKF_AD_RANDOM & 0xFFFFFFFF),
            (_BPF_ALU_MOD_K, 0, 0, len(indices))]
    for j, index in enumerate(indices[:-1]):
        prog.append((_BPF_JEQ_K, 0, 1, j))      # A == j ? next : skip the ret
        prog.append((_BPF_RET_K, 0, 0, index))
    prog.append((_BPF_RET_K, 0, 0, indices[-1]))
    return prog


def _attach_cbpf(fd: int, prog: List[Tuple[int, int, int, int]]) -> None:
    """setsockopt(SO_ATTACH_REUSEPORT_CBPF) with a struct sock_fprog."""
    filters = (ctypes.c_uint8 * (8 * len(prog)))()
    for i, insn in enumerate(prog):
        struct.pack_into("=HBBI", filters, 8 * i, *insn)
    fprog = struct.pack("=HxxxxxxQ", len(prog), ctypes.addressof(filters))
    sock = socket.socket(fileno=fd)
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_CBPF, fprog)
    finally:
        sock.detach()


def _detach_cbpf(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_DETACH_REUSEPORT_BPF, 0)
    except OSError as exc:
        if exc.errno != errno.ENOENT:     # no program attached
            raise
    finally:
        sock.detach()


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


# -- the parent's view of one worker -------------------------------------------

@dataclass
class _Worker:
    pid: int
    slot: int
    generation: int
    status_fd: int
    record: _Record
    limit: int                      # max_requests (+ jitter) for this worker; 0: none
    started: float
    state: str = "starting"         # starting -> ready -> retiring
    ready_at: Optional[float] = None
    deadline: Optional[float] = None    # retiring: SIGKILL after this
    recycle: bool = False           # asked to be replaced (max_requests)
    steered_at: Optional[float] = None  # reuseport slot closing: steered away since
    failure: Optional[bytes] = None     # what kept it from starting, as it said


@dataclass
class _Slot:
    """A reuseport slot: its socket (None while it has none)."""
    listener: Optional[Listener] = None


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
    flight land meanwhile).
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
        for name, value in (("workers", workers), ("max_requests", max_requests),
                            ("max_requests_jitter", max_requests_jitter)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an integer, not {type(value).__name__}: "
                                f"{value!r}")
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers!r}")
        if max_requests < 0 or max_requests_jitter < 0:
            raise ValueError(f"max_requests and max_requests_jitter must be >= 0, not "
                             f"{max_requests!r} and {max_requests_jitter!r}")
        for name, value in (("timeout", timeout), ("graceful_timeout", graceful_timeout),
                            ("backoff", backoff), ("max_backoff", max_backoff),
                            ("min_uptime", min_uptime), ("linger", linger)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number of seconds, not "
                                f"{type(value).__name__}: {value!r}")
            if not value >= 0 or (name == "timeout" and not value > 0):
                raise ValueError(f"{name} must be {'> 0' if name == 'timeout' else '>= 0'}"
                                 f" seconds, not {value!r}")
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
        self.target = workers
        self.timeout = float(timeout)
        self.graceful_timeout = float(graceful_timeout)
        self.max_requests = max_requests
        self.max_requests_jitter = max_requests_jitter
        self.pid_file = os.fspath(pid_file) if pid_file is not None else None
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self.min_uptime, self.linger = float(min_uptime), float(linger)
        self.notifier = Notifier.from_environment() if notify else Notifier()
        #: What a closing reuseport socket does with its queue: "migrate"
        #: (net.ipv4.tcp_migrate_req=1) or "steer" (BPF, then empty it).
        self.handover: Optional[str] = None
        self._slots: List[_Slot] = []
        self._group: List[int] = []       # reuseport: slot of each group array position
        self._steered: Optional[Tuple[int, ...]] = None
        self._shared: Optional[Listener] = None
        self._workers: Dict[int, _Worker] = {}
        self._generation = 0
        self._failures = 0
        self._next_spawn = 0.0
        self._last_failure = 0.0
        self._requests: Deque[str] = deque()
        self._waker: Optional[Waker] = None
        self._lifeline: Optional[Tuple[int, int]] = None
        self._stopping: Optional[str] = None   # None, "graceful", "now"
        self._stop_deadline: Optional[float] = None
        self._reloading = False
        self._ready_sent = False
        self._next_watchdog = 0.0
        self._pid_written = False
        self._exited: Dict[str, int] = {}
        self._failure_shown: Optional[str] = None   # the start failure's traceback, logged

    # -- control (any thread, or a signal handler) ---------------------------

    def _request(self, what: str) -> None:
        self._requests.append(what)
        waker = self._waker
        if waker is not None:
            waker.wakeup()

    def stop(self, graceful: bool = True) -> None:
        """Stop: gracefully (workers finish running handlers within
        graceful_timeout), or at once (SIGKILL)."""
        self._request("stop" if graceful else "quit")

    def reload(self) -> None:
        """Start a new generation of workers (handler imported afresh);
        each old worker stops accepting once its successor accepts."""
        self._request("reload")

    def add_worker(self) -> None:
        """One worker more (SIGTTIN)."""
        self._request("ttin")

    def remove_worker(self) -> None:
        """One worker fewer, never below one (SIGTTOU)."""
        self._request("ttou")

    def log_counters(self) -> None:
        """Log the counters (SIGUSR1)."""
        self._request("usr1")

    # -- the listening socket(s) ------------------------------------------------

    @property
    def address(self) -> Any:
        """The bound address (after bind())."""
        listener = self._shared if self._shared is not None else (
            self._slots[0].listener if self._slots else None)
        if listener is None:
            raise RuntimeError("Workers.address: not bound yet (call bind() or run())")
        return listener.address

    def bind(self) -> None:
        """Bind and listen now (run() does it if you did not).  Raises the
        OSError of a failing bind, explained, with nothing left open."""
        if self._shared is not None or self._slots:
            return
        if not self.reuse_port:
            self._shared = Listener.from_config(self._socket_config())
            return
        migrate = sysinfo.tcp_migrate_req()
        self.handover = "migrate" if migrate == 1 else "steer"
        try:
            for _ in range(self.target):
                self._open_slot()
        except BaseException:
            for slot in self._slots:
                if slot.listener is not None:
                    slot.listener.close()
            self._slots.clear()
            self._group.clear()
            raise
        _log.info("reuse-port: %d sockets; a closing socket's queue %s", self.target,
                  "moves to a live socket (net.ipv4.tcp_migrate_req=1)"
                  if self.handover == "migrate" else
                  "is kept: new connections are steered away by a classic BPF program "
                  "(SO_ATTACH_REUSEPORT_CBPF) and the worker empties it before it closes "
                  f"(net.ipv4.tcp_migrate_req={migrate})")

    def _socket_config(self) -> ListenConfig:
        """The config of the listening socket(s) the parent opens: the PROXY
        protocol and TLS options are for the servers in the workers, which
        read the header and run the handshake of each connection (a
        Listener refuses them)."""
        return self.config.socket_only()

    def _open_slot(self) -> int:
        config = self._socket_config().replace(reuse_port=True)
        if self._slots and config.family != socket.AF_UNIX:
            first = next(s.listener for s in self._slots if s.listener is not None)
            config = config.replace(port=first.address[1])
            with warnings.catch_warnings():     # said once, for the first socket
                warnings.simplefilter("ignore", EphemeralPortWarning)
                listener = Listener.from_config(config)
        else:
            listener = Listener.from_config(config)
        for i, slot in enumerate(self._slots):
            if slot.listener is None:
                self._slots[i] = _Slot(listener)
                break
        else:
            self._slots.append(_Slot(listener))
            i = len(self._slots) - 1
        self._group.append(i)
        return i

    def _close_slot(self, i: int) -> None:
        slot = self._slots[i]
        if slot.listener is not None:
            slot.listener.close()
            # The kernel fills the hole with the group's last socket.
            pos = self._group.index(i)
            self._group[pos] = self._group[-1]
            self._group.pop()
        self._slots[i] = _Slot()
        self._steered = None

    def _socket_fd(self, slot: int) -> int:
        if self._shared is not None:
            return self._shared.fileno()
        listener = self._slots[slot].listener
        assert listener is not None
        return listener.fileno()

    # -- running ------------------------------------------------------------------

    def run(self) -> int:
        """Bind, start the workers and supervise them until stopped; returns
        0.  Called from the main thread, it handles SIGTERM, SIGINT, SIGQUIT,
        SIGHUP, SIGTTIN, SIGTTOU, SIGUSR1 (and SIGCHLD) until it returns."""
        self.bind()
        self._waker = Waker(pipe=True)
        r, w = os.pipe2(os.O_CLOEXEC)
        self._lifeline = (r, w)
        handlers: Dict[int, Any] = {}
        old_wakeup: Optional[int] = None
        main = threading.current_thread() is threading.main_thread()
        try:
            if main:
                for sig, what in _SIGNALS.items():
                    handlers[sig] = signal.signal(sig, self._on_signal(what))
                old_wakeup = signal.set_wakeup_fd(self._waker.write_fileno(),
                                                  warn_on_full_buffer=False)
            self._write_pid_file()
            _log.info("supervisor %d: %d worker(s) on %s (%s)", os.getpid(), self.target,
                      self._describe_address(),
                      "one SO_REUSEPORT socket per worker" if self.reuse_port
                      else "one shared socket")
            self._notify(STATUS=f"starting {self.target} worker(s)")
            self._loop()
        finally:
            self._kill_all()
            if main:
                if old_wakeup is not None:
                    signal.set_wakeup_fd(old_wakeup)
                for sig, old in handlers.items():
                    signal.signal(sig, old)
            self._close()
        return 0

    def _describe_address(self) -> str:
        from fastlisten.address import format_address
        try:
            return format_address(self.address)
        except (OSError, RuntimeError):
            return "?"

    def _on_signal(self, what: str) -> Callable[[int, Any], None]:
        # The Python handler may run after the loop has drained the byte
        # set_wakeup_fd wrote and looked at the requests: it wakes the loop
        # itself, so that the request is seen at once, not at the next tick.
        def handler(signum: int, frame: Any) -> None:
            self._request(what)
        return handler

    def _loop(self) -> None:
        waker = self._waker
        assert waker is not None
        while True:
            self._reap()
            self._handle_requests()
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
            self._watchdog(now)
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
                self._read_status(by_fd[fd])

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
        if self.notifier.watchdog_interval is not None:
            times.append(self._next_watchdog)
        return None if not times else max(min(times) - now, 0.0)

    def _read_status(self, w: _Worker) -> bool:
        """Read what worker w said; False once there is nothing to read."""
        try:
            data = os.read(w.status_fd, _FAILURE_MAX + 64)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:            # the worker is gone (or closed its end): SIGCHLD reaps it
            os.close(w.status_fd)
            w.status_fd = -1
            return False
        if w.failure is not None:
            w.failure = (w.failure + data)[:_FAILURE_MAX]
            return True
        if _FAILED in data:
            data, _, failure = data.partition(_FAILED)
            w.failure = failure[:_FAILURE_MAX]
        if _READY in data and w.state == "starting":
            w.state, w.ready_at = "ready", time.monotonic()
            _log.debug("worker %d (slot %d, generation %d) accepting", w.pid, w.slot,
                       w.generation)
        if _RECYCLE in data and not w.recycle:
            w.recycle = True
            _log.info("worker %d reached max_requests (%d): replacing it", w.pid, w.limit)
        return True

    # -- requests -------------------------------------------------------------------

    def _handle_requests(self) -> None:
        while self._requests:
            what = self._requests.popleft()
            if what == "chld":
                continue            # the loop reaps on every pass
            if what == "stop" and self._stopping is None:
                self._begin_stop("graceful")
            elif what == "stop" and self._stopping == "graceful":
                self._begin_stop("now")     # a second SIGTERM/SIGINT: do not wait
            elif what == "quit" and self._stopping != "now":
                self._begin_stop("now")
            elif self._stopping is not None:
                continue
            elif what == "reload":
                self._generation += 1
                self._reloading = True
                self._failures = 0
                self._failure_shown = None
                _log.info("reloading: starting generation %d", self._generation)
                self.notifier.reloading(f"reloading: starting generation {self._generation}")
            elif what == "ttin":
                self.target += 1
                _log.info("one worker more: %d", self.target)
            elif what == "ttou":
                if self.target > 1:
                    self.target -= 1
                    _log.info("one worker fewer: %d", self.target)
            elif what == "usr1":
                self._log_counters()

    def _begin_stop(self, how: str) -> None:
        self._stopping = how
        _log.info("stopping %s: %d worker(s)", "gracefully" if how == "graceful" else "now",
                  len(self._workers))
        self._notify(STOPPING=1, STATUS="stopping")
        # New connections are refused from now on (a socket systemd passed
        # stays open in systemd, and queues them for the next start).
        self._close_listeners()
        if how == "now":
            for w in self._workers.values():
                self._signal(w, signal.SIGKILL)
            self._stop_deadline = None
            return
        self._stop_deadline = time.monotonic() + self.graceful_timeout + 1.0
        # Each worker empties its socket's queue before its copy closes: the
        # sockets close with the last of them, and would reset what is queued
        # (not systemd's socket: its queue waits for the next start).
        empty = self.config.fd is None
        for w in list(self._workers.values()):
            if w.state not in ("retiring", "killed"):
                self._retire(w, close_slot=False, empty_queue=empty)

    def _stop_step(self, now: float) -> None:
        if self._stop_deadline is not None and now >= self._stop_deadline:
            for w in self._workers.values():
                _log.warning("worker %d still running after graceful_timeout: killing it",
                             w.pid)
                self._signal(w, signal.SIGKILL)
            self._stop_deadline = None
        for w in self._workers.values():
            if w.deadline is not None and now >= w.deadline:
                self._signal(w, signal.SIGKILL)
                w.deadline = None

    # -- workers ----------------------------------------------------------------

    def _check_workers(self, now: float) -> None:
        for w in list(self._workers.values()):
            if w.state == "killed":
                continue
            if w.state == "retiring":
                if w.deadline is not None and now >= w.deadline:
                    _log.warning("worker %d did not finish within graceful_timeout: killing "
                                 "it", w.pid)
                    self._signal(w, signal.SIGKILL)
                    w.deadline = None
                continue
            if w.state == "starting":
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
                           "has not started" if w.state == "starting" else "has not "
                           "run its serving loop", now - last)
                self._signal(w, signal.SIGKILL)
                w.state, w.deadline = "killed", None

    def _balance(self, now: float) -> None:
        live = [w for w in self._workers.values() if w.state not in ("retiring", "killed")]
        for w in live:
            if w.state == "closing" and w.slot < self.target:   # SIGTTIN took it back
                w.state, w.steered_at = "ready", None
        for slot in range(self.target):
            if self.reuse_port and (slot >= len(self._slots)
                                    or self._slots[slot].listener is None):
                self._open_slot_at(slot)
            here = [w for w in live if w.slot == slot]
            current = [w for w in here if w.generation == self._generation and not w.recycle]
            if not current:
                if self._failures and now < self._next_spawn:
                    continue
                self._spawn(slot)
                continue
            if any(w.state == "ready" for w in current):
                for w in here:
                    if w not in current:
                        self._retire(w, close_slot=False)
        for w in live:
            if w.slot >= self.target:
                self._retire(w, close_slot=self.reuse_port)
        if self.reuse_port:
            for i in range(self.target, len(self._slots)):
                slot = self._slots[i]
                if slot.listener is not None and not any(
                        w.slot == i for w in self._workers.values()):
                    self._close_slot(i)
            while self._slots and self._slots[-1].listener is None and \
                    len(self._slots) > self.target:
                self._slots.pop()

    def _open_slot_at(self, slot: int) -> None:
        # a slot above the old target that TTOU closed and TTIN wants again
        i = self._open_slot()
        assert i == slot, (i, slot)

    def _retire(self, w: _Worker, close_slot: bool, empty_queue: bool = False) -> None:
        """Tell worker w to stop accepting and finish (SIGTERM).  A reuseport
        slot that closes after it is first steered away from (linger).
        ``empty_queue`` (a stop: the socket closes for good after it): the
        worker makes the kernel complete no new connection on it and serves
        what is queued first (SIGINT)."""
        now = time.monotonic()
        if close_slot and self.handover == "steer" and w.state in ("ready", "closing"):
            if w.steered_at is None:
                w.steered_at = now
                w.state = "closing"      # _steer() takes it out of the program now
            if now < w.steered_at + self.linger:
                return
        w.state = "retiring"
        w.steered_at = None
        w.deadline = now + self.graceful_timeout + 1.0
        # SIGUSR2: also empty the socket's queue, it closes after this worker
        # (steering or the kernel's migration keeps new connections away).
        # SIGINT: the same, the stop's: no new connection is let in first.
        if empty_queue:
            self._signal(w, signal.SIGINT)
        else:
            self._signal(w, signal.SIGUSR2 if close_slot else signal.SIGTERM)

    def _spawn(self, slot: int) -> None:
        limit = 0
        if self.max_requests:
            limit = self.max_requests + random.randint(0, self.max_requests_jitter)
        record = _Record()
        record.write(time.monotonic(), 0, 0, 0)
        r, w = os.pipe2(os.O_CLOEXEC)
        generation = self._generation
        try:
            pid = os.fork()
        except OSError:
            os.close(r)
            os.close(w)
            record.close()
            raise
        if pid == 0:        # the worker
            code = 1
            try:
                os.close(r)
                code = self._worker_main(slot, generation, w, record, limit)
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
            while w.status_fd >= 0 and self._read_status(w):
                pass            # what it said before it ended
            if w.status_fd >= 0:
                os.close(w.status_fd)
            w.record.close()
            self._exited_worker(w, status)

    def _exited_worker(self, w: _Worker, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        how = f"exit code {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
        expected = w.state in ("retiring", "closing") or self._stopping is not None
        self._exited["expected" if expected else "unexpected"] = \
            self._exited.get("expected" if expected else "unexpected", 0) + 1
        if expected:
            _log.debug("worker %d ended (%s)", w.pid, how)
            if self.reuse_port and w.slot >= self.target and self._stopping is None:
                if not any(x.slot == w.slot for x in self._workers.values()):
                    self._close_slot(w.slot)
            return
        now = time.monotonic()
        if w.ready_at is None:
            self._failures += 1
            self._last_failure = now
            delay = min(self.backoff * 2 ** (self._failures - 1), self.max_backoff)
            self._next_spawn = now + delay
            cause = self._start_failure(w, how)
            if any(x.generation < w.generation and x.state == "ready"
                   for x in self._workers.values()):
                _log.error("reload failed: the old generation is still serving; retrying "
                           "in %.3g s (worker %d: %s)", delay, w.pid, cause)
            else:
                _log.error("worker %d could not start (%s); %d failure(s) in a row: "
                           "next start in %.3g s", w.pid, cause, self._failures, delay)
            self._notify(STATUS=f"workers failing to start ({self._failures} in a row); "
                                f"retrying in {delay:.3g} s")
            if self._reloading and w.generation == self._generation:
                # Type=notify-reload waits for READY=1: the old workers still serve.
                self._reloading = False
                self._notify(READY=1, STATUS=f"reload failed ({cause}): the previous "
                                             "workers go on serving")
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

    def _signal(self, w: _Worker, sig: int) -> None:
        """Send sig to worker w; SIGKILL goes to its process group, so that
        the processes it forked (ForkingMixIn handlers) end with it."""
        try:
            if sig == signal.SIGKILL:
                try:
                    os.killpg(w.pid, sig)
                    return
                except ProcessLookupError:
                    pass        # not its own group yet: the worker alone
            os.kill(w.pid, sig)
        except ProcessLookupError:
            pass

    def _kill_all(self) -> None:
        """On the way out (also after an error): no worker left behind."""
        for w in self._workers.values():
            self._signal(w, signal.SIGKILL)
        for pid, w in list(self._workers.items()):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            if w.status_fd >= 0:
                os.close(w.status_fd)
            w.record.close()
        self._workers.clear()

    def _close_listeners(self) -> None:
        if self._shared is not None:
            self._shared.close()
            self._shared = None
        for i in range(len(self._slots)):
            if self._slots[i].listener is not None:
                self._close_slot(i)
        self._slots.clear()

    def _close(self) -> None:
        self._close_listeners()
        if self._lifeline is not None:
            for fd in self._lifeline:
                os.close(fd)
            self._lifeline = None
        if self._waker is not None:
            self._waker.close()
            self._waker = None
        self._remove_pid_file()
        if self._stopping is not None:
            self._notify(STATUS="stopped")

    # -- reuseport steering ----------------------------------------------------

    def _steer(self) -> None:
        """Point new connections at the slots whose worker accepts."""
        if not self.reuse_port or len(self._group) < 2:
            return
        accepting = {w.slot for w in self._workers.values() if w.state == "ready"
                     and w.slot < self.target}
        indices = tuple(i for i, slot in enumerate(self._group) if slot in accepting)
        if indices == self._steered:
            return
        fd = self._socket_fd(self._group[0])
        try:
            if not indices or len(indices) == len(self._group):
                _detach_cbpf(fd)
            else:
                _attach_cbpf(fd, steering_program(list(indices)))
        except OSError as exc:
            _log.warning("cannot steer reuse-port connections (%s): a closing socket may "
                         "reset the connections queued on it", exc)
        self._steered = indices

    # -- readiness and systemd ---------------------------------------------------

    def _report_readiness(self) -> None:
        ready = {w.slot for w in self._workers.values()
                 if w.state == "ready" and w.generation == self._generation}
        if len(ready & set(range(self.target))) < self.target:
            return
        if not self._ready_sent:
            self._ready_sent = True
            _log.info("%d worker(s) accepting", self.target)
            self._notify(READY=1, STATUS=f"{self.target} worker(s) accepting")
        elif self._reloading and not any(w.generation < self._generation
                                         and w.state not in ("retiring", "killed")
                                         for w in self._workers.values()):
            self._reloading = False
            _log.info("reloaded: generation %d accepting", self._generation)
            self._notify(READY=1, STATUS=f"{self.target} worker(s) accepting "
                                         f"(generation {self._generation})")

    def _notify(self, **fields: Any) -> None:
        self.notifier.notify(fields)

    def _watchdog(self, now: float) -> None:
        interval = self.notifier.watchdog_interval
        if interval is not None and now >= self._next_watchdog:
            self.notifier.watchdog()
            self._next_watchdog = now + interval

    # -- counters -----------------------------------------------------------------

    def counters(self) -> Dict[str, Any]:
        """Counters summed over the live workers, and per worker:
        ``workers`` ({pid: {"accepted", "handlers_running", "handlers_peak",
        "slot", "generation", "state"}}), ``accepted``, ``handlers_running``,
        ``imbalance`` (max/min accepted among ready workers), ``exited``
        (workers that ended, expected or not)."""
        per: Dict[int, Dict[str, Any]] = {}
        for w in self._workers.values():
            _, accepted, running, peak = w.record.read()
            per[w.pid] = {"accepted": accepted, "handlers_running": running,
                          "handlers_peak": peak, "slot": w.slot,
                          "generation": w.generation, "state": w.state}
        counts = [p["accepted"] for p in per.values() if p["state"] == "ready"]
        out: Dict[str, Any] = {
            "workers": per, "target": self.target, "generation": self._generation,
            "accepted": sum(p["accepted"] for p in per.values()),
            "handlers_running": sum(p["handlers_running"] for p in per.values()),
            "imbalance": (max(counts) / min(counts)) if counts and min(counts) else None,
            "exited": dict(self._exited),
        }
        listeners = [self._shared] if self._shared is not None else [
            s.listener for s in self._slots if s.listener is not None]
        queued = 0
        for listener in listeners:
            try:
                queued += listener.queue()[0]
            except OSError:
                pass
        out["queued"] = queued
        return out

    def _log_counters(self) -> None:
        c = self.counters()
        per = " ".join(f"{pid}:{p['accepted']}" for pid, p in sorted(c["workers"].items()))
        imbalance = "-" if c["imbalance"] is None else f"{c['imbalance']:.2f}"
        _log.info("counters: workers=%d accepted=%d handlers_running=%d queued=%d "
                  "max/min=%s per-worker accepted {%s}", len(c["workers"]), c["accepted"],
                  c["handlers_running"], c["queued"], imbalance, per)

    # -- pid file ---------------------------------------------------------------------

    def _write_pid_file(self) -> None:
        if self.pid_file is None:
            return
        tmp = f"{self.pid_file}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, self.pid_file)
        self._pid_written = True

    def _remove_pid_file(self) -> None:
        if not self._pid_written or self.pid_file is None:
            return
        self._pid_written = False
        try:
            with open(self.pid_file) as f:
                mine = f.read().strip() == str(os.getpid())
            if mine:
                os.unlink(self.pid_file)
        except OSError:
            pass

    # -- the worker process ------------------------------------------------------

    def _worker_main(self, slot: int, generation: int, status_fd: int, record: _Record,
                     limit: int) -> int:
        """The body of a worker process (after fork); returns its exit code."""
        # Its own process group: the supervisor's SIGKILL reaches the
        # processes it forks too, and a terminal's Ctrl-C reaches the
        # supervisor alone, which decides.
        os.setpgid(0, 0)
        os.register_at_fork(after_in_child=_handler_process_after_fork)
        signal.set_wakeup_fd(-1)
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN,
                    signal.SIGTTOU, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)   # the parent's business
        lifeline = self._worker_close_parent_fds(slot, status_fd)
        my_fd = self._socket_fd(slot)
        try:
            server = self._worker_server(generation, my_fd)
        except Exception as exc:   # noqa: BLE001 - said once, by the supervisor
            _tell_failure(status_fd, exc)
            return 1
        return _WorkerLoop(server, status_fd, record, limit, lifeline,
                           min(0.1, self.timeout / 4), self.graceful_timeout).run()

    def _worker_server(self, generation: int, my_fd: int) -> Any:
        """The worker's server on the inherited socket, its handler (and
        class) imported afresh after a reload."""
        handler, server_class = self.handler, self.server_class
        if isinstance(handler, str):
            from fastlisten.services import load_handler
            handler = load_handler(handler)
        if generation > 0:
            handler, server_class = _fresh(handler), _fresh(server_class)
        sock = socket.socket(fileno=my_fd)
        server = server_class(self.config.address if self.config.fd is None
                              else sock.getsockname(), handler, bind_and_activate=False)
        _adopt_socket(server, sock)
        if hasattr(server, "_fl_config"):
            # a fastlisten server: Workers' listen_config is its own (the
            # PROXY protocol and connection options apply in the worker)
            server._fl_config = self.config
        return server

    def _worker_close_parent_fds(self, slot: int, status_fd: int) -> int:
        """Close what the parent holds that this worker must not keep: the
        other slots' sockets (else a closed slot would live on here), the
        other workers' pipes, the parent's waker and lifeline write end."""
        for other in self._workers.values():
            if other.status_fd >= 0:
                os.close(other.status_fd)
                other.status_fd = -1
        if self.reuse_port:
            for i, s in enumerate(self._slots):
                if i != slot and s.listener is not None:
                    os.close(s.listener.fileno())
        if self._waker is not None:
            for fd in {self._waker.fileno(), self._waker.write_fileno()}:
                os.close(fd)
        assert self._lifeline is not None
        os.close(self._lifeline[1])
        return self._lifeline[0]


#: The supervisor's signals and what each asks.
_SIGNALS = {
    signal.SIGTERM: "stop", signal.SIGINT: "stop", signal.SIGQUIT: "quit",
    signal.SIGHUP: "reload", signal.SIGTTIN: "ttin", signal.SIGTTOU: "ttou",
    signal.SIGUSR1: "usr1", signal.SIGCHLD: "chld",
}


def _tell_failure(status_fd: int, exc: BaseException) -> None:
    """In a worker that cannot start: tell the supervisor why (a line, then
    the traceback of the user's code only), for it to say once, instead of
    every worker logging the same traceback at every retry."""
    text = f"{user_error_line(exc)}\n{user_traceback(exc)}".encode("utf-8", "replace")
    data = memoryview(_FAILED + text[:_FAILURE_MAX])
    try:
        while data:
            data = data[os.write(status_fd, data):]
    except OSError:
        pass        # the supervisor is gone


def _handler_process_after_fork() -> None:
    """In a process a worker forks (ForkingMixIn): the worker's signal
    handling is not its own; SIGTERM from the worker's end_handlers() ends it."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # the worker's, as it was


def _fastlisten_drain(server: Any) -> Optional[Callable[[float], int]]:
    """fastlisten's drain() of a server built on its classes (not a drain
    a subclass defines for its own purposes), or None for another server."""
    try:
        return _own_method(server, "drain")
    except AttributeError:
        return None


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

    def __init__(self, server: Any, status_fd: int, record: _Record, limit: int,
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
        self.waker = Waker(pipe=True)
        fast = getattr(server, "_fl_handlers", None)
        self._handlers = fast if fast is not None else (lambda: (0, 0))
        if not hasattr(server, "_fl_get_listener"):
            self._count_requests()

    def _count_requests(self) -> None:
        verify = self.server.verify_request

        def counting_verify(request: Any, client_address: Any) -> bool:
            self.counted += 1
            return bool(verify(request, client_address))
        self.server.verify_request = counting_verify

    def accepted(self) -> int:
        listener = getattr(self.server, "_fl_listener", None)
        if listener is not None:
            return int(listener.stats()["accepted"])
        return self.counted

    def beat(self) -> None:
        """Heartbeat and counters into the parent's shared memory (the
        serving loop calls this through service_actions)."""
        accepted = self.accepted()
        running, peak = self._handlers()
        self.record.write(time.monotonic(), accepted, running, peak)
        if self.limit and accepted >= self.limit and not self.recycle_sent:
            self.recycle_sent = True
            self._tell(_RECYCLE)

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
        service_actions.fl_periodic = True      # type: ignore[attr-defined]
        server.service_actions = service_actions
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGUSR2, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.set_wakeup_fd(self.waker.write_fileno(), warn_on_full_buffer=False)
        outcome: List[Any] = []

        def serve() -> None:
            try:
                server.serve_forever(self.poll_interval)
                outcome.append(None)
            except _StopServing:
                outcome.append(None)
            except BaseException as exc:    # noqa: BLE001 - reported below
                outcome.append(exc)
            finally:
                self.waker.wakeup()

        self.beat()
        thread = threading.Thread(target=serve, name="fastlisten-worker", daemon=True)
        thread.start()
        self._tell(_READY)
        poller = select.poll()
        poller.register(self.waker.fileno(), select.POLLIN)
        poller.register(self.lifeline, select.POLLIN)
        while not outcome:
            events = poller.poll()
            if any(fd == self.lifeline for fd, _ in events) and self.stop is None:
                _log.warning("worker %d: the supervisor is gone; stopping", os.getpid())
                self.stop = "orphan"
                poller.unregister(self.lifeline)
            self.waker.drain()
            if self.stop is not None and not self.stopping.is_set():
                self.stopping.set()
                wake = getattr(server, "_fl_wake", None)
                if wake is not None:
                    wake()          # a fastlisten loop runs service_actions at once
        thread.join()
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        if self.stop is None:
            return 1            # serve_forever returned by itself
        if self.stop in ("empty", "final"):
            self._empty_queue(final=self.stop == "final")
        # Stop listening before the handlers drain: this copy of the socket
        # must not hold connections nobody will accept.
        server.socket.close()
        drain = _fastlisten_drain(server)
        if drain is not None:
            ended = drain(self.graceful_timeout)
            if ended:
                _log.info("worker %d: ended %d handler(s) after %.3g s", os.getpid(), ended,
                          self.graceful_timeout)
        server.server_close()
        self.beat()
        return 0

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop is None:
            self.stop = {signal.SIGUSR2: "empty", signal.SIGINT: "final"}.get(
                signum, "graceful")
        # The main thread may have drained set_wakeup_fd's byte and looked
        # at self.stop before this handler ran: wake it again.
        self.waker.wakeup()

    def _empty_queue(self, final: bool) -> None:
        """Serve the connections still queued on this worker's socket, which
        closes after it: no reset for them.  ``final`` (a stop: it closes for
        good): first the kernel is made to complete no new connection on it;
        else (a reuseport slot that goes away) what is queued now is served,
        and steering or the kernel's migration sees to the rest."""
        # a fastlisten server's own call also serves what its loop kept
        own = getattr(self.server, "serve_queued", None)
        try:
            if own is not None and final:
                own()
            else:
                serve_queued(self.server, door=final)
        except OSError as exc:
            _log.warning("worker %d: cannot empty the accept queue: %s", os.getpid(), exc)
