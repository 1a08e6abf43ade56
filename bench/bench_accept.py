"""One accept batch: ``accept_many`` of 64 pending connections against 64
stdlib ``socket.accept()`` calls on the same kind of queue.

Run: ``python -m pytest bench/bench_accept.py --benchmark-only``
(``bench/`` is not part of the test run; pytest-benchmark measures, tests
never assert timings).
"""

import socket

import pytest
from helpers import wait_for

import fastlisten

N = 64


class Queue:
    """A listener with N finished handshakes waiting in its accept queue."""

    def __init__(self, lst, address):
        self.lst = lst
        self.address = address
        self.clients = []
        self.accepted = []

    def fill(self):
        self.drop()
        self.clients = [socket.create_connection(self.address) for _ in range(N)]
        probe = self.probe
        wait_for(lambda: probe() == N)

    def drop(self):
        for s in self.accepted:
            s.close()
        for c in self.clients:
            c.close()
        self.accepted, self.clients = [], []


@pytest.fixture
def fl_queue():
    with fastlisten.listen(("127.0.0.1", 0)) as lst:
        q = Queue(lst, lst.address)
        q.probe = lambda: lst.queue()[0]
        yield q
        q.drop()


@pytest.fixture
def std_queue():
    with socket.create_server(("127.0.0.1", 0), backlog=fastlisten.default_backlog()) as srv:
        q = Queue(srv, srv.getsockname())
        q.probe = lambda: _queued(srv)
        yield q
        q.drop()


def _queued(sock):
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int.from_bytes(info[24:28], "little")


@pytest.mark.benchmark(group="accept 64 pending")
def test_fastlisten_accept_many(benchmark, fl_queue):
    def run():
        fl_queue.accepted = [s for s, _ in fl_queue.lst.accept_many(N, timeout=5)]
        assert len(fl_queue.accepted) == N

    benchmark.pedantic(run, setup=fl_queue.fill, rounds=200, iterations=1)


@pytest.mark.benchmark(group="accept 64 pending")
def test_stdlib_accept_64_times(benchmark, std_queue):
    srv = std_queue.lst

    def run():
        std_queue.accepted = [srv.accept()[0] for _ in range(N)]

    benchmark.pedantic(run, setup=std_queue.fill, rounds=200, iterations=1)
