"""``shutdown()`` latency: from the call to ``serve_forever`` returning, for an
idle server (fastlisten's and the stdlib's TCPServer; the stdlib's waits for
its ``poll_interval``, 0.5 s, so it gets few rounds).

Run: ``python -m pytest bench/bench_shutdown.py --benchmark-only``
(``fastlisten bench`` measures the same thing across every server kind with
``fastlisten.benchmark.serve.shutdown_latencies``.)
"""

import socketserver
import threading

import pytest

import fastlisten
from fastlisten.benchmark.serve import _idle_in_kernel, handler_for

MODULES = [pytest.param(socketserver, 5, id="stdlib"),
           pytest.param(fastlisten, 200, id="fastlisten", marks=pytest.mark.skipif(
               not hasattr(fastlisten, "TCPServer"), reason="no fastlisten.TCPServer here"))]


@pytest.mark.benchmark(group="shutdown() to serve_forever returning")
@pytest.mark.parametrize("module, rounds", MODULES)
def test_shutdown_latency(benchmark, module, rounds):
    running = []

    def setup():
        for server, thread in running:   # the previous round's, now stopped
            thread.join()
            server.server_close()
        running.clear()
        server = module.TCPServer(("127.0.0.1", 0), handler_for(module, "daytime"))
        ready, tids = threading.Event(), []

        def serve():
            tids.append(threading.get_native_id())
            ready.set()
            server.serve_forever()

        thread = threading.Thread(target=serve)
        thread.start()
        running.append((server, thread))
        ready.wait(5)
        _idle_in_kernel(tids[0])       # measure an idle server, blocked in its wait
        return (server,), {}

    try:
        benchmark.pedantic(lambda server: server.shutdown(), setup=setup,
                           rounds=rounds, iterations=1)
    finally:
        for server, thread in running:
            server.shutdown()
            thread.join()
            server.server_close()
