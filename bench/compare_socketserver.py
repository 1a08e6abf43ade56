"""fastlisten.ThreadingTCPServer against socketserver.ThreadingTCPServer, in one run.

For each server, with the same trivial handler (send one byte, close):

- connections per second: client processes, each with a few threads, each
  doing connect / recv / close in a loop for a fixed number of connections
  (loopback only, bounded in count);
- the server's CPU time (user + system) per connection: clients run in other
  processes, so the server process's own times are the server's;
- shutdown() latency with serve_forever(poll_interval=0.5), idle.

A third row runs the stdlib's server with fastlisten's backlog (somaxconn
instead of 5), to separate what the backlog buys from what the loop and
the reused threads buy.

Usage::

    python bench/compare_socketserver.py [--connections 20000] [--clients 2]
                                         [--threads 8] [--rounds 3]

On a small machine the client is the bottleneck long before a fast server
is (see docs): read the CPU-per-connection column beside the rate.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import socketserver
import statistics
import threading
import time
from typing import Any, Dict, List, Tuple

import fastlisten


class StdlibBigBacklog(socketserver.ThreadingTCPServer):
    """The stdlib's server with fastlisten's backlog: isolates the loop and
    the threads from the backlog of 5."""

    request_queue_size = fastlisten.default_backlog()


class OneByte(socketserver.BaseRequestHandler):
    """The trivial handler: one byte, then the server closes."""

    def handle(self) -> None:
        self.request.sendall(b"x")


def _client(addr: Tuple[str, int], count: int, threads: int, start: Any, errors: Any) -> None:
    """A client process: `threads` threads share `count` connections."""
    per = [count // threads + (1 if i < count % threads else 0) for i in range(threads)]

    def work(n: int) -> None:
        for _ in range(n):
            try:
                with socket.create_connection(addr, timeout=10) as c:
                    c.recv(1)
            except OSError:
                with errors.get_lock():
                    errors.value += 1

    start.wait()
    ts = [threading.Thread(target=work, args=(n,)) for n in per]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def measure_rate(cls: type, connections: int, clients: int, threads: int) -> Dict[str, float]:
    """Serve `connections` connections; return conn/s and server CPU µs/conn."""
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    errors = ctx.Value("i", 0)
    server = cls(("127.0.0.1", 0), OneByte)
    server.daemon_threads = False
    t = threading.Thread(target=server.serve_forever, args=(0.5,))
    t.start()
    per = [connections // clients + (1 if i < connections % clients else 0)
           for i in range(clients)]
    procs = [ctx.Process(target=_client, args=(server.server_address, n, threads, start, errors))
             for n in per]
    for p in procs:
        p.start()
    cpu0 = os.times()
    t0 = time.perf_counter()
    start.set()
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - t0
    cpu1 = os.times()
    server.shutdown()
    t.join()
    server.server_close()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    done = connections - errors.value
    return {"rate": done / elapsed, "cpu_us": cpu / max(done, 1) * 1e6,
            "errors": float(errors.value)}


def measure_shutdown(cls: type, repeats: int = 5) -> float:
    """Median seconds shutdown() takes against an idle serve_forever(0.5)."""
    times: List[float] = []
    for _ in range(repeats):
        server = cls(("127.0.0.1", 0), OneByte)
        t = threading.Thread(target=server.serve_forever, args=(0.5,))
        t.start()
        # One served connection proves the loop is running and now idle.
        with socket.create_connection(server.server_address, timeout=10) as c:
            c.recv(1)
        t0 = time.perf_counter()
        server.shutdown()
        times.append(time.perf_counter() - t0)
        t.join()
        server.server_close()
    return statistics.median(times)


def main(argv: Any = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=20000)
    ap.add_argument("--clients", type=int, default=2, help="client processes")
    ap.add_argument("--threads", type=int, default=8, help="threads per client process")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)

    servers = [("socketserver", socketserver.ThreadingTCPServer),
               ("stdlib+backlog", StdlibBigBacklog),
               ("fastlisten", fastlisten.ThreadingTCPServer)]
    results: Dict[str, List[Dict[str, float]]] = {name: [] for name, _ in servers}
    for _ in range(args.rounds):           # interleaved, so drift hits both alike
        for name, cls in servers:
            results[name].append(measure_rate(cls, args.connections, args.clients, args.threads))
    shutdown = {name: measure_shutdown(cls) for name, cls in servers}

    print(f"core: {'compiled' if fastlisten.compiled else 'pure Python'}; medians of "
          f"{args.connections} connections x {args.rounds} rounds, "
          f"{args.clients} client processes x {args.threads} threads; CPUs: {os.cpu_count()}")
    print(f"{'server':<14}{'conn/s':>10}{'(min-max)':>16}{'server CPU us/conn':>20}"
          f"{'errors':>8}{'shutdown ms':>13}")
    summary = {}
    for name, _ in servers:
        rate = statistics.median(r["rate"] for r in results[name])
        cpu = statistics.median(r["cpu_us"] for r in results[name])
        errs = sum(r["errors"] for r in results[name])
        summary[name] = (rate, cpu)
        lo = min(r["rate"] for r in results[name])
        hi = max(r["rate"] for r in results[name])
        print(f"{name:<14}{rate:>10.0f}{f'({lo:.0f}-{hi:.0f})':>16}{cpu:>20.1f}"
              f"{errs:>8.0f}{shutdown[name] * 1e3:>13.3f}")
    r1, c1 = summary["fastlisten"]
    for base in ("socketserver", "stdlib+backlog"):
        r0, c0 = summary[base]
        print(f"fastlisten / {base}: conn/s x{r1 / r0:.2f}, server CPU per conn "
              f"x{c1 / c0:.2f}, shutdown latency x{shutdown['fastlisten'] / shutdown[base]:.5f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
