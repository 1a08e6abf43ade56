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

A connection reaches a thread (or process) only once it is ready by
--ready-rule (see its help for the default each handler gets; give 'none'
to a handler of your own whose server speaks first); until then it waits
in the core, holding no thread, for at most --ready-timeout seconds.  The
startup log line says the rule in effect.

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
import socket
import ssl
import sys
from typing import Any, Dict, Optional, Type

from fastlisten import server as _server
from fastlisten._backend import compiled
from fastlisten.address import format_address
from fastlisten.commands import options
from fastlisten.config import ListenConfig, check_int, check_seconds
from fastlisten.listener import describe_ready
from fastlisten.running import format_counters, serve_until_signalled  # noqa: F401 (its home was here)
from fastlisten.services import load_handler, ready_rule_for

_log = logging.getLogger("fastlisten.serve")

#: Threads in the pool unless --threads says otherwise.
DEFAULT_THREADS = 16

#: --ready-rule's help: serve's defaults differ from the library's (none).
READY_RULE_HELP = (
    "hand a connection to a thread only once it is ready: 'none' (at once), 'data' (a "
    "first byte), 'line' (a whole line), 'http' (a whole request head) or 'tls' (a whole "
    "ClientHello); meanwhile it waits in the core, holding no thread.  Default: 'tls' "
    "with --tls-cert; else 'none' for daytime, 'http' for an "
    "http.server.BaseHTTPRequestHandler subclass, 'data' for echo, discard and any "
    "other handler (give 'none' where the server speaks first, as in SMTP)")


def add_parser(subparsers: Any) -> None:
    """Register ``serve``."""
    doc = __doc__ or ""
    p = subparsers.add_parser(
        "serve", help="run a server: daytime, echo, discard or module:Class",
        description=doc.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("handler", metavar="HANDLER",
                   help="daytime, echo, discard, or module:Class (a request handler)")
    options.add_arguments(p, helps={
        "ready_rule": READY_RULE_HELP,
        "ready_timeout": "seconds from accept until a connection is ready, its PROXY "
                         "header included (default 10; with rule 'none' or 'tls' by "
                         "default, --proxy-timeout or --handshake-timeout); later, it is "
                         "closed unread",
    })
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
                 handshake_timeout: float = 10.0) -> Type[Any]:
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


def run(args: argparse.Namespace) -> int:
    """Run the server until SIGINT/SIGTERM; 0 on a clean shutdown."""
    try:
        handler = load_handler(args.handler)
        args.ready_rule, why = ready_rule_for(
            handler, args.ready_rule, args.tls_cert is not None,
            any(getattr(args, name) is not None
                for name in ("ready_timeout", "ready_max_bytes", "max_waiting", "ready_min_rate")))
        cfg = options.from_args(args)
        for name in ("threads", "processes", "workers"):
            if getattr(args, name) is not None:
                check_int(f"--{name}", getattr(args, name), 1)
        if args.stats_interval is not None:
            check_seconds("--stats-interval", args.stats_interval)
        check_seconds("--grace", args.grace, zero=True)
        check_seconds("--handshake-timeout", args.handshake_timeout)
        context = tls_context(args.tls_cert, args.tls_key)
        cls = server_class(cfg, args.threads, args.processes, context, args.handshake_timeout)
    except (ValueError, TypeError, OverflowError, OSError) as exc:
        print(f"fastlisten serve: error: {exc}", file=sys.stderr)
        return 2
    if args.workers is not None:
        return _run_workers(args, cls, handler, describe_ready(cls.listen_config.server_ready(), why))
    try:
        server = cls(cfg.address, handler)
    except OSError as exc:
        print(f"fastlisten serve: {exc}", file=sys.stderr)
        return 1
    mode = (f"{args.processes} processes" if args.processes is not None
            else f"{cls.fl_max_threads} threads")

    def ready() -> None:
        # Only now, with the signals handled, tell the world we are up.
        address = format_address(server.socket.getsockname())
        print(f"listening on {address}", flush=True)
        _log.info("serving %s on %s (%s, %s core); %s; SIGUSR1 logs counters, "
                  "SIGINT/SIGTERM stop", args.handler, address, mode,
                  "compiled" if compiled else "pure-Python", describe_ready(cls.listen_config.server_ready(), why))

    try:
        serve_until_signalled(server, grace=args.grace, on_ready=ready, log_stats=True,
                              stats_interval=args.stats_interval)
    finally:
        server.server_close()
    return 0


def _run_workers(args: argparse.Namespace, cls: Type[Any], handler: Any, ready: str) -> int:
    """``--workers N``: the same server class in N processes under
    fastlisten.Workers; ``ready`` describes the accept filter for the log."""
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
    except (ValueError, TypeError, OverflowError) as exc:
        print(f"fastlisten serve: error: {exc}", file=sys.stderr)
        return 2
    try:
        workers.bind()
    except OSError as exc:
        print(f"fastlisten serve: {exc}", file=sys.stderr)
        return 1
    print(f"listening on {format_address(workers.address)}", flush=True)
    _log.info("%s (in each worker)", ready)
    return workers.run()
