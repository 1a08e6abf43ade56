"""``fastlisten demo``: start a server on loopback, serve a few real
connections to it, and show what the core did."""

from __future__ import annotations

import argparse
import socket
import threading
import time
from typing import List

import fastlisten


def add_parser(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("demo", help="serve a few real loopback connections and show what happened",
                       description=__doc__)
    p.add_argument("-n", "--connections", type=int, default=200,
                   help="how many client connections to make (default 200, at most 10000)")
    p.add_argument("-c", "--concurrency", type=int, default=16,
                   help="client threads (default 16, at most 256)")
    p.set_defaults(run=run)


def _serve(lst: fastlisten.Listener, stop: threading.Event) -> None:
    """The server: batches from the core; each connection gets a greeting."""
    while not stop.is_set():
        for conn, _addr in lst.accept_many(64):
            with conn:
                conn.sendall(b"hello from fastlisten\n")


def _client(address: tuple, count: int, replies: List[bytes]) -> None:
    for _ in range(count):
        with socket.create_connection(address, timeout=5) as c:
            chunks = []
            while True:
                data = c.recv(64)
                if not data:
                    break
                chunks.append(data)
            replies.append(b"".join(chunks))


def run(args: argparse.Namespace) -> int:
    n = args.connections
    workers = args.concurrency
    if not 1 <= n <= 10000:
        raise SystemExit(f"--connections must be 1-10000, not {n}")
    if not 1 <= workers <= 256:
        raise SystemExit(f"--concurrency must be 1-256, not {workers}")
    with fastlisten.listen(("127.0.0.1", 0)) as lst:
        print(f"core: {'compiled (Cython)' if fastlisten.compiled else 'pure Python'}")
        print(f"listening on {lst.address[0]}:{lst.address[1]}, backlog {lst.backlog} "
              f"(net.core.somaxconn)")
        stop = threading.Event()
        server = threading.Thread(target=_serve, args=(lst, stop), name="fastlisten-demo")
        server.start()
        replies: List[bytes] = []
        per = [n // workers + (1 if i < n % workers else 0) for i in range(workers)]
        clients = [threading.Thread(target=_client, args=(lst.address, k, replies))
                   for k in per if k]
        started = time.perf_counter()
        try:
            for t in clients:
                t.start()
            for t in clients:
                t.join()
        finally:
            elapsed = time.perf_counter() - started
            stop.set()
            lst.wakeup()
            server.join()
        stats = lst.stats()
    good = sum(1 for r in replies if r == b"hello from fastlisten\n")
    print(f"served {good} of {n} connections in {elapsed * 1000:.0f} ms "
          f"({good / elapsed:,.0f} connections/s, {workers} client threads)")
    print(f"accepted {stats['accepted']} in {stats['batches']} batches "
          f"(largest {stats['max_batch']}); accept errors: {stats['errors'] or 'none'}")
    print("Next: `fastlisten --help`; the README has the first steps, docs/ the library API.")
    return 0 if good == n else 1
