"""The benchmark's load generator (C loop and pure-Python twin) and the C
reference server, against real loopback servers.  Counts only: timing is
never asserted."""

import errno
import os
import socket
import socketserver
import threading

import pytest

from fastlisten.benchmark import loadgen
from fastlisten.benchmark.loadgen import native_available, run_load
from fastlisten.benchmark.protocol import SCENARIOS, reply_for
from fastlisten.benchmark.serve import handler_for

NATIVE = [pytest.param(False, id="python"),
          pytest.param(True, id="native", marks=pytest.mark.skipif(
              not native_available(), reason="needs the compiled extensions"))]


class _Server(socketserver.TCPServer):
    request_queue_size = 4096   # a burst must not hit socketserver's 5


@pytest.fixture
def serve():
    """serve(scenario) -> address of a stdlib server for it, in a thread."""
    started = []

    def start(scenario):
        srv = _Server(("127.0.0.1", 0),
                      handler_for(socketserver, "daytime" if scenario == "burst" else scenario))
        t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
        t.start()
        started.append((srv, t))
        return srv.server_address

    yield start
    for srv, t in started:
        srv.shutdown()
        t.join()
        srv.server_close()


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_scenario_completes(serve, scenario, native):
    n = 40
    res = run_load(serve(scenario), scenario, concurrency=8, total=n, duration=30,
                   timeout=20, native=native)
    assert (res.started, res.completed, res.errors, res.timeouts, res.aborted) == (n, n, 0, 0, 0)
    assert res.bytes_in == n * len(reply_for(scenario))
    assert len(res.latencies_us) == n
    assert res.native is native
    lat = res.latency()
    assert 0 <= lat["p50_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    assert res.summary()["completed"] == n


@pytest.mark.parametrize("native", NATIVE)
def test_source_addresses_spread_over_loopback(native):
    seen = set()

    class Record(socketserver.BaseRequestHandler):
        def handle(self):
            seen.add(self.client_address[0])
            self.request.sendall(reply_for("daytime"))

    srv = _Server(("127.0.0.1", 0), Record)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    t.start()
    try:
        res = run_load(srv.server_address, "daytime", concurrency=2, total=8,
                       src_spread=4, native=native)
    finally:
        srv.shutdown()
        t.join()
        srv.server_close()
    assert res.completed == 8
    assert seen == {"127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"}


@pytest.mark.parametrize("native", NATIVE)
def test_refused_connections_are_errors(native):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = s.getsockname()   # nothing listens here once closed
    res = run_load(address, "daytime", concurrency=3, total=5, native=native)
    assert (res.completed, res.errors) == (0, 5)
    assert res.first_errno == errno.ECONNREFUSED


@pytest.mark.parametrize("native", NATIVE)
def test_silent_server_times_out(native):
    with socket.socket() as lst:           # handshakes complete; nobody answers
        lst.bind(("127.0.0.1", 0))
        lst.listen(16)
        res = run_load(lst.getsockname(), "daytime", concurrency=3, total=3,
                       timeout=0.2, native=native)
    assert (res.completed, res.timeouts, res.errors) == (0, 3, 0)
    assert res.first_errno == errno.ETIMEDOUT


@pytest.mark.parametrize("native", NATIVE)
def test_short_reply_is_an_error(native):
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(16)
        done = threading.Event()

        def answer_short():
            conn, _ = lst.accept()
            conn.sendall(b"short\n")
            conn.close()
            done.set()

        t = threading.Thread(target=answer_short)
        t.start()
        try:
            res = run_load(lst.getsockname(), "daytime", concurrency=1, total=1, native=native)
        finally:
            t.join()
    assert done.is_set()
    assert (res.completed, res.errors, res.first_errno) == (0, 1, errno.EPROTO)


@pytest.mark.parametrize("host", ["10.1.2.3", "192.0.2.1", "8.8.8.8", "::2", "localhost"])
def test_refuses_non_loopback(host):
    with pytest.raises(ValueError):
        run_load((host, 80), "daytime", total=1)


@pytest.mark.skipif(not native_available(), reason="needs the compiled extensions")
def test_c_loop_refuses_non_loopback_by_itself():
    core = loadgen.native_module()
    with pytest.raises(OSError) as info:
        core.loadgen_run(("192.0.2.1", 9), "daytime", 1, 1, 1.0, 1.0)
    assert info.value.errno == errno.EADDRNOTAVAIL


def test_bad_arguments():
    with pytest.raises(ValueError):
        run_load(("127.0.0.1", 9), "nosuch", total=1)
    with pytest.raises(ValueError):
        run_load(("127.0.0.1", 9), "daytime", concurrency=0, total=1)
    with pytest.raises(ValueError):
        loadgen.check_loopback("not an address")


@pytest.mark.skipif(not native_available(), reason="needs the compiled extensions")
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_reference_server(scenario):
    core = loadgen.native_module()
    from fastlisten.benchmark.protocol import HTTP_RESPONSE, REPLY
    stop_r, stop_w = os.pipe()
    out = []
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1024)
        reply = HTTP_RESPONSE if scenario == "http-close" else REPLY
        t = threading.Thread(target=lambda: out.append(
            core.refserver_serve(lst.fileno(), stop_r, scenario, reply)))
        t.start()
        try:
            res = run_load(lst.getsockname(), scenario, concurrency=8, total=100,
                           timeout=20, native=True)
        finally:
            os.write(stop_w, b"x")
            t.join()
            os.close(stop_r)
            os.close(stop_w)
    assert (res.completed, res.errors) == (100, 0)
    assert out == [{"accepted": 100, "errors": 0}]


def test_listener_drops_counts_this_listener_only():
    from helpers import wait_for

    from fastlisten.benchmark.serve import listener_drops
    with socket.socket() as full, socket.socket() as other:
        for s, backlog in ((full, 1), (other, 64)):
            s.bind(("127.0.0.1", 0))
            s.listen(backlog)
        assert listener_drops(full) == 0 and listener_drops(other) == 0
        clients = []
        try:
            for _ in range(8):          # nobody accepts: the queue of 1 overflows
                c = socket.socket()
                c.setblocking(False)
                c.connect_ex(full.getsockname())
                clients.append(c)
            wait_for(lambda: listener_drops(full) > 0)
            assert listener_drops(other) == 0
        finally:
            for c in clients:
                c.close()


@pytest.mark.skipif(not native_available(), reason="needs the compiled extensions")
@pytest.mark.parametrize("field, value", [
    ("duration", 1e300), ("duration", float("nan")), ("duration", -1.0),
    ("timeout", 3e6), ("timeout", float("inf")),
])
def test_c_loop_refuses_times_its_milliseconds_cannot_hold(field, value):
    times = {"duration": 1.0, "timeout": 1.0, field: value}
    with pytest.raises(ValueError, match=field):
        loadgen.native_module().loadgen_run(("127.0.0.1", 9), "daytime", 1, 1,
                                            times["duration"], times["timeout"])


def test_listener_drops_is_unknown_under_tcp_defer_accept():
    """With TCP_DEFER_ACCEPT, the kernel drops (and counts in sk_drops) the
    bare ACK that ends each handshake: the count says nothing of a full
    queue, so it is not given."""
    from fastlisten.sysinfo import deferring, listener_drops
    with socket.socket() as lst:
        lst.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
        lst.bind(("127.0.0.1", 0))
        lst.listen(16)
        with socket.create_connection(lst.getsockname()) as c:
            c.sendall(b"x")
            conn, _ = lst.accept()
            conn.close()
        assert deferring(lst) and listener_drops(lst) is None
        lst.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 0)
        assert not deferring(lst) and listener_drops(lst) >= 1    # the ACK, counted
