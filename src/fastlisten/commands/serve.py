"""``fastlisten serve``: run a TCP (or Unix socket) server from the command line.

    fastlisten serve daytime --bind 127.0.0.1:4481
    fastlisten serve echo --bind [::1]:7 --threads 32 --stats-interval 10
    fastlisten serve mypkg.handlers:Handler --processes 4 --bind :8000
    fastlisten serve echo --bind :8000 --proxy-protocol v2 --trusted-proxy 10.0.0.0/8
    fastlisten serve echo --bind :8443 --tls-cert cert.pem --tls-key key.pem

The handler is a built-in (daytime, RFC 867; echo; discard) or any
module:Class socketserver request handler (anything called as
Class(request, client_address, server)); the current directory is searched
for the module.  The server is the library's own: a fastlisten
ThreadingTCPServer (a pool of at most --threads threads, 16 by default) or
ForkingTCPServer (at most --processes children), or their Unix socket
twins, so handlers see a real socketserver server as self.server.
Connections beyond those limits wait in the kernel's accept queue, visible
in the counters.

Behind a load balancer, --proxy-protocol makes every connection start with
a PROXY protocol header (HAProxy's send-proxy / send-proxy-v2), accepted
only from --trusted-proxy networks (default: loopback); handlers see the
real client.  --tls-cert/--tls-key serve TLS; handshakes run in the
handler's thread or process, never in the accept loop.

The first line on stdout is "listening on ADDRESS" (with the port the kernel
chose for port 0).  SIGUSR1 logs the counters (so does --stats-interval).
SIGINT or SIGTERM stop accepting, serve the connections the kernel had
already queued (closing the socket would reset them) and give running
handlers --grace seconds to finish; then they are ended (their connections
are shut down; processes get SIGTERM, then SIGKILL) and the command exits 0
without waiting for a thread that still does not return.  A second signal
ends them at once.

With --workers N the same server runs in N supervised processes
(fastlisten.Workers): SIGTERM/SIGINT stop them gracefully within --grace
(--graceful-timeout), SIGQUIT at once, SIGHUP reloads (new workers, with the
handler's package imported afresh, accept before the old ones stop),
SIGTTIN/SIGTTOU add or remove one, SIGUSR1 logs the counters of every
worker; --reuse-port gives each worker its own SO_REUSEPORT socket.  Each
worker is a process of its own, so what a handler keeps in memory is per
worker, and connections are not dealt out in turn (with the shared socket,
an idle server gives sequential clients mostly to one worker).
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import socket
import ssl
import sys
import threading
from time import monotonic
from typing import Any, Callable, Dict, List, Optional

from fastlisten import server as _server
from fastlisten._backend import compiled
from fastlisten._wakeup import Waker
from fastlisten.address import format_address
from fastlisten.commands import options
from fastlisten.config import ListenConfig
from fastlisten.services import load_handler
from fastlisten.sysinfo import listener_drops

_log = logging.getLogger("fastlisten.serve")

#: Threads in the pool unless --threads says otherwise.
DEFAULT_THREADS = 16


def add_parser(subparsers: Any) -> None:
    """Register ``serve``."""
    doc = __doc__ or ""
    p = subparsers.add_parser(
        "serve", help="run a server: daytime, echo, discard or module:Class",
        description=doc.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("handler", metavar="HANDLER",
                   help="daytime, echo, discard, or module:Class (a request handler)")
    options.add_arguments(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--threads", type=int, default=None, metavar="N",
                      help=f"handle connections in a pool of at most N threads "
                           f"(default {DEFAULT_THREADS})")
    mode.add_argument("--processes", type=int, default=None, metavar="N",
                      help="handle each connection in a forked process, at most N at once")
    p.add_argument("--stats-interval", type=float, default=None, metavar="SECONDS",
                   help="log the counters this often (SIGUSR1 logs them any time)")
    tls = p.add_argument_group("TLS")
    tls.add_argument("--tls-cert", metavar="FILE", default=None,
                     help="serve TLS with this PEM certificate chain (the key too, unless "
                          "--tls-key)")
    tls.add_argument("--tls-key", metavar="FILE", default=None,
                     help="the certificate's PEM private key")
    tls.add_argument("--handshake-timeout", type=float, default=10.0, metavar="SECONDS",
                     help="seconds a client has for the TLS handshake (default 10)")
    p.add_argument("--grace", "--graceful-timeout", dest="grace", type=float, default=5.0,
                   metavar="SECONDS",
                   help="on SIGINT/SIGTERM, how long running handlers may finish before "
                        "they are ended (default 5)")
    w = p.add_argument_group("worker processes (fastlisten.Workers)")
    w.add_argument("--workers", type=int, default=None, metavar="N",
                   help="serve in N supervised processes (SIGHUP reloads, SIGTTIN/SIGTTOU "
                        "add/remove one, SIGQUIT stops at once); with --reuse-port each has "
                        "its own SO_REUSEPORT socket, else they share one")
    w.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="kill a worker whose serving loop shows no heartbeat for this long "
                        "(default 30)")
    w.add_argument("--max-requests", type=int, default=0, metavar="N",
                   help="replace a worker after N connections (default 0: never)")
    w.add_argument("--max-requests-jitter", type=int, default=0, metavar="J",
                   help="add a random 0..J to each worker's --max-requests")
    w.add_argument("--pid-file", default=None, metavar="PATH",
                   help="write the supervisor's pid here (removed on exit)")
    p.set_defaults(run=run)


def format_counters(c: Dict[str, Any]) -> str:
    """Counters (Listener.counters() or a server's counters()) as one log
    line; values the system cannot tell (None) are left out.

    ``queue_drops`` (see :func:`counters`) is the listener's own count of
    connections dropped from its full accept queue; only without it does the
    line show the kernel's ListenOverflows/ListenDrops, which count every
    listener on the machine, labelled ``machine_``."""
    import errno

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
        "proxy_accepted", "proxy_local", "proxy_rejected", "tls_handshakes", "tls_failures")]
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


def tls_context(cert: Optional[str], key: Optional[str]) -> Optional[ssl.SSLContext]:
    """The server-side SSLContext for --tls-cert/--tls-key, or None;
    ValueError naming the file that cannot be used."""
    if cert is None:
        if key is not None:
            raise ValueError("--tls-key needs --tls-cert")
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot use --tls-cert {cert!r}"
                         f"{f' / --tls-key {key!r}' if key else ''}: {exc}") from None
    return context


def server_class(config: ListenConfig, threads: Optional[int],
                 processes: Optional[int], ssl_context: Optional[ssl.SSLContext] = None,
                 handshake_timeout: float = 10.0) -> type:
    """The library server class serve runs: threads or processes, TCP or Unix."""
    unix = config.family == socket.AF_UNIX
    if ssl_context is not None:
        config = config.replace(ssl_context=ssl_context, handshake_timeout=handshake_timeout)
    attrs: Dict[str, Any] = {"listen_config": config}
    if processes is not None:
        bases: tuple = (_server.ForkingMixIn,
                        _server.UnixStreamServer if unix else _server.TCPServer)
        attrs["max_children"] = processes
    else:
        bases = (_server.ThreadingMixIn,
                 _server.UnixStreamServer if unix else _server.TCPServer)
        # A thread cannot be killed: after --grace, the process leaves
        # without waiting for a handler that does not return.
        attrs.update(fl_max_threads=threads or DEFAULT_THREADS, daemon_threads=True,
                     block_on_close=False)
    if config.family is not None and not unix:
        attrs["address_family"] = config.family
    return type("ServeServer", bases, attrs)


class _Signals:
    """The signals serve handles, as flags plus a wake-up of the main thread
    (signal.set_wakeup_fd on a pipe): a signal arriving at any instant wakes
    it, whichever thread the kernel delivered it to."""

    HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.stops = 0
        self.stats = False
        self.waker = Waker(pipe=True)
        self._previous: Dict[int, Any] = {}
        self._old_fd: Optional[int] = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGUSR1:
            self.stats = True
        else:
            self.stops += 1

    def __enter__(self) -> "_Signals":
        for sig in self.HANDLED:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        self._old_fd = signal.set_wakeup_fd(self.waker.write_fileno(),
                                            warn_on_full_buffer=False)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._old_fd is not None:
            signal.set_wakeup_fd(self._old_fd)
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self.waker.close()

    def sleep(self, timeout: Optional[float]) -> None:
        """Wait until a signal or wake() arrives, or ``timeout`` passes; the
        Python handlers run as the wait returns."""
        select.select([self.waker.fileno()], [], [], timeout)
        self.waker.drain()


def _child_after_fork() -> None:
    # A handler's process: the parent decides when it stops (SIGTERM at the
    # end of --grace), so Ctrl-C and SIGUSR1 are not its business.
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


_fork_hook_registered = False


def _in_thread(target: Callable[[], Any], name: str, wake: Waker) -> List[Any]:
    """Run target in a thread; the returned list gets its result or the
    exception it raised, and ``wake`` is woken when it ends."""
    outcome: List[Any] = []

    def body() -> None:
        try:
            outcome.append(target())
        except BaseException as exc:   # noqa: BLE001 - reported by the main thread
            outcome.append(exc)
        finally:
            wake.wakeup()

    threading.Thread(target=body, name=name, daemon=True).start()
    return outcome


def run(args: argparse.Namespace) -> int:
    """Run the server until SIGINT/SIGTERM; 0 on a clean shutdown."""
    global _fork_hook_registered
    try:
        handler = load_handler(args.handler)
        cfg = options.from_args(args)
        for name in ("threads", "processes", "workers"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be a positive integer, not {value!r}")
        if args.stats_interval is not None and not args.stats_interval > 0:
            raise ValueError(f"--stats-interval must be positive, not {args.stats_interval!r}")
        if not args.grace >= 0:
            raise ValueError(f"--grace must be >= 0, not {args.grace!r}")
        if not args.handshake_timeout > 0:
            raise ValueError(f"--handshake-timeout must be positive, not "
                             f"{args.handshake_timeout!r}")
        context = tls_context(args.tls_cert, args.tls_key)
    except (ValueError, TypeError, OverflowError, OSError) as exc:
        print(f"fastlisten serve: error: {exc}", file=sys.stderr)
        return 2
    cls = server_class(cfg, args.threads, args.processes, context, args.handshake_timeout)
    if args.workers is not None:
        return _run_workers(args, cls, handler)
    try:
        server = cls(cfg.address, handler)
    except OSError as exc:
        print(f"fastlisten serve: {exc}", file=sys.stderr)
        return 1
    if args.processes is not None and not _fork_hook_registered:
        os.register_at_fork(after_in_child=_child_after_fork)
        _fork_hook_registered = True
    mode = (f"{args.processes} processes" if args.processes is not None
            else f"{cls.fl_max_threads} threads")
    try:
        with _Signals() as signals:
            served = _in_thread(server.serve_forever, "fastlisten-serve", signals.waker)
            # Only now, with the handlers in place, tell the world we are up.
            address = server.socket.getsockname()
            print(f"listening on {format_address(address)}", flush=True)
            _log.info("serving %s on %s (%s, %s core); SIGUSR1 logs counters, "
                      "SIGINT/SIGTERM stop", args.handler, format_address(address), mode,
                      "compiled" if compiled else "pure-Python")
            _supervise(server, signals, served, args.stats_interval)
            stops = signals.stops       # any later stop signal is a second one
            drops = counters(server).get("queue_drops")     # while the socket is open
            server.shutdown()
            # what the kernel queued would be reset by server_close()
            server.serve_queued()
            running = server.counters()["handlers_running"]
            if running:
                _log.info("stopped accepting; %d handler(s) running get up to %.3g s "
                          "(a second signal ends them now)", running, args.grace)
            _drain(server, signals, args.grace, stops)
            _log.info("stopped; counters: %s", format_counters(counters(server, drops)))
    finally:
        server.server_close()
    if served and isinstance(served[0], BaseException):
        raise served[0]
    return 0


def _run_workers(args: argparse.Namespace, cls: type, handler: Any) -> int:
    """``--workers N``: the same server class in N processes under fastlisten.Workers."""
    from fastlisten.workers import Workers

    try:
        if args.stats_interval is not None:
            raise ValueError("--stats-interval is for one process: with --workers, "
                             "SIGUSR1 logs the counters of every worker")
        workers = Workers(cls, cls.listen_config.address, handler, workers=args.workers,
                          timeout=args.timeout, graceful_timeout=args.grace,
                          max_requests=args.max_requests,
                          max_requests_jitter=args.max_requests_jitter,
                          pid_file=args.pid_file)
    except (ValueError, TypeError) as exc:
        print(f"fastlisten serve: error: {exc}", file=sys.stderr)
        return 2
    try:
        workers.bind()
    except OSError as exc:
        print(f"fastlisten serve: {exc}", file=sys.stderr)
        return 1
    print(f"listening on {format_address(workers.address)}", flush=True)
    return workers.run()


def _supervise(server: Any, signals: _Signals, served: List[Any],
               stats_interval: Optional[float]) -> None:
    """The main thread while serving: log counters on SIGUSR1 and every
    stats_interval; return on a stop signal or when serve_forever ended."""
    next_stats = None if stats_interval is None else monotonic() + stats_interval
    while not signals.stops and not served:
        signals.sleep(None if next_stats is None else max(next_stats - monotonic(), 0.0))
        if next_stats is not None and monotonic() >= next_stats:
            signals.stats = True
            next_stats = monotonic() + stats_interval  # type: ignore[operator]
        if signals.stats:
            signals.stats = False
            _log.info("counters: %s", format_counters(counters(server)))


def _drain(server: Any, signals: _Signals, grace: float, first: int) -> int:
    """server.drain(grace) in a thread, while the main thread keeps taking
    signals: a stop signal beyond the ``first`` ones ends the handlers at once."""
    drained = _in_thread(lambda: server.drain(grace), "fastlisten-drain", signals.waker)
    ended, hurried = 0, False
    while not drained:
        signals.sleep(None)
        if signals.stops > first and not hurried:
            hurried = True
            ended = server.end_handlers()
    result = drained[0]
    if isinstance(result, BaseException):
        raise result
    if ended or result:
        _log.info("ended %d handler(s) still running %s", max(ended, result),
                  "on a second signal" if hurried else f"after {grace:.3g} s")
    return max(ended, result)
