"""Dispatch of one connection to a handler: ``process_request`` on a fresh
connected socket until the handler has run, for fastlisten's and the
stdlib's TCPServer and ThreadingTCPServer.

Run: ``python -m pytest bench/bench_dispatch.py --benchmark-only``
(``bench/`` is not part of the test run; pytest-benchmark measures, tests
never assert timings).
"""

import socket
import socketserver
import threading

import pytest

import fastlisten

KINDS = ["TCPServer", "ThreadingTCPServer"]
MODULES = [pytest.param(socketserver, id="stdlib"),
           pytest.param(fastlisten, id="fastlisten", marks=pytest.mark.skipif(
               not hasattr(fastlisten, "TCPServer"), reason="no fastlisten.TCPServer here"))]


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("kind", KINDS)
def test_dispatch_one_connection(benchmark, module, kind):
    benchmark.group = f"dispatch one connection: {kind}"
    handled = threading.Event()

    class Handler(module.BaseRequestHandler):
        def handle(self):
            handled.set()

    server = getattr(module, kind)(("127.0.0.1", 0), Handler)
    peers = []

    def setup():
        for p in peers:
            p.close()
        peers.clear()
        a, b = socket.socketpair()
        peers.append(b)
        handled.clear()
        return (a,), {}

    def dispatch(conn):
        server.process_request(conn, ("127.0.0.1", 0))
        assert handled.wait(5)

    try:
        benchmark.pedantic(dispatch, setup=setup, rounds=2000, iterations=1, warmup_rounds=20)
    finally:
        server.server_close()   # joins handler threads
        for p in peers:
            p.close()
