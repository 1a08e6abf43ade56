"""Differential tests: each behaviour is written once and checked against
the standard library's ``socketserver`` and against ``fastlisten``.  A
difference that the README does not list is a bug."""

import contextlib
import os
import socket
import socketserver
import struct
import threading
import time

import pytest
from helpers import read_all, serve_in_thread, shutdown_within

import fastlisten

MODULES = [pytest.param(socketserver, id="stdlib"), pytest.param(fastlisten, id="fastlisten")]
LIMIT = 10.0   # seconds any single wait may take before the test fails


@pytest.fixture(params=MODULES)
def ss(request):
    return request.param


def wait_for(condition, limit=LIMIT):
    """Bounded polling of a condition another thread makes true."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.002)


@contextlib.contextmanager
def serving(server, poll_interval=0.5, close=True):
    """serve_forever in a daemon thread; shutdown (bounded: a loop that does
    not stop fails the test instead of hanging it), join and (with
    ``close``) server_close on the way out."""
    t = serve_in_thread(server, poll_interval)
    try:
        yield server
    finally:
        try:
            shutdown_within(server, t, LIMIT)
        finally:
            if close:
                server.server_close()


class EchoLine(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(self.rfile.readline())


def ask(addr, data=b"ping\n", family=socket.AF_INET):
    with socket.socket(family, socket.SOCK_STREAM) as c:
        c.settimeout(LIMIT)
        c.connect(addr)
        c.sendall(data)
        return read_all(c)


def recorder(base):
    """A server class recording every hook call, in order."""
    class Recording(base):
        def __init__(self, *a, **kw):
            self.calls = []
            self.lock = threading.Lock()
            super().__init__(*a, **kw)

        def _note(self, name):
            with self.lock:
                self.calls.append(name)

        def verify_request(self, request, client_address):
            self._note("verify_request")
            return super().verify_request(request, client_address)

        def process_request(self, request, client_address):
            self._note("process_request")
            super().process_request(request, client_address)

        def finish_request(self, request, client_address):
            self._note("finish_request")
            super().finish_request(request, client_address)

        def shutdown_request(self, request):
            self._note("shutdown_request")
            super().shutdown_request(request)

        def close_request(self, request):
            self._note("close_request")
            super().close_request(request)

        def handle_error(self, request, client_address):
            import sys
            self._note(f"handle_error:{sys.exc_info()[0].__name__}")

    return Recording


@pytest.mark.parametrize("name", ["TCPServer", "ThreadingTCPServer"])
def test_hooks_called_in_stdlib_order(ss, name):
    S = recorder(getattr(ss, name))
    with serving(S(("127.0.0.1", 0), EchoLine)) as server:
        for i in (1, 2):
            assert ask(server.server_address) == b"ping\n"
            # the client sees EOF at shutdown_request's SHUT_WR, before close_request
            wait_for(lambda: server.calls.count("close_request") == i)
    one = ["verify_request", "process_request", "finish_request",
           "shutdown_request", "close_request"]
    assert server.calls == one + one


def test_handler_exception_calls_handle_error_and_serving_goes_on(ss):
    class Boom(socketserver.BaseRequestHandler):
        def handle(self):
            if self.request.recv(10) == b"boom":
                raise ValueError("handler failed")
            self.request.sendall(b"ok")

    for base in (ss.TCPServer, ss.ThreadingTCPServer):
        S = recorder(base)
        with serving(S(("127.0.0.1", 0), Boom)) as server:
            assert ask(server.server_address, b"boom") == b""
            assert ask(server.server_address, b"fine") == b"ok"
        errors = [c for c in server.calls if c.startswith("handle_error")]
        assert errors == ["handle_error:ValueError"], base


def test_verify_request_refusal(ss):
    handled = []

    class Refusing(recorder(ss.TCPServer)):
        def verify_request(self, request, client_address):
            super().verify_request(request, client_address)
            return len(self.calls) > 2    # refuse the first connection only

    class Handler(EchoLine):
        def handle(self):
            handled.append(1)
            super().handle()

    with serving(Refusing(("127.0.0.1", 0), Handler)) as server:
        assert ask(server.server_address) == b""
        assert ask(server.server_address) == b"ping\n"
    assert handled == [1]
    assert server.calls[:3] == ["verify_request", "shutdown_request", "close_request"]


def test_client_sends_nothing(ss):
    S = recorder(ss.ThreadingTCPServer)
    with serving(S(("127.0.0.1", 0), EchoLine)) as server:
        socket.create_connection(server.server_address, timeout=LIMIT).close()
        assert ask(server.server_address) == b"ping\n"
        wait_for(lambda: server.calls.count("close_request") == 2)
    assert not [c for c in server.calls if c.startswith("handle_error")]


def test_client_resets_mid_request(ss):
    started = threading.Event()

    class Reading(socketserver.StreamRequestHandler):
        def handle(self):
            started.set()
            self.rfile.readline()        # the reset arrives while it waits
            self.wfile.write(b"never\n")

    S = recorder(ss.ThreadingTCPServer)
    with serving(S(("127.0.0.1", 0), Reading)) as server:
        c = socket.create_connection(server.server_address, timeout=LIMIT)
        c.sendall(b"half a line")
        assert started.wait(LIMIT)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()                        # RST
        wait_for(lambda: "close_request" in server.calls)
        started.clear()
        with socket.create_connection(server.server_address, timeout=LIMIT) as c2:
            c2.sendall(b"whole\n")
            assert c2.recv(100) == b"never\n"
    assert [c for c in server.calls if c.startswith("handle_error")] == \
        ["handle_error:ConnectionResetError"]


def test_shutdown_before_serve_forever_returns_at_once(ss):
    server = ss.TCPServer(("127.0.0.1", 0), EchoLine)
    t = threading.Thread(target=server.shutdown, daemon=True)
    t.start()
    wait_for(lambda: server._BaseServer__shutdown_request)
    server.serve_forever(poll_interval=None if ss is fastlisten else 0.5)
    t.join(LIMIT)
    server.server_close()
    assert not t.is_alive()


def test_no_connection_accepted_after_shutdown(ss):
    S = recorder(ss.TCPServer)
    server = S(("127.0.0.1", 0), EchoLine)
    with serving(server):
        assert ask(server.server_address) == b"ping\n"
        shutdown_within(server)
        late = socket.create_connection(server.server_address, timeout=LIMIT)
        late.sendall(b"late\n")
    # server_close() ran: the late connection, never accepted, is reset.
    with late:
        with pytest.raises(ConnectionResetError):
            late.recv(10)
    assert server.calls.count("process_request") == 1


def test_service_actions_run_while_idle(ss):
    ticks = threading.Semaphore(0)

    class Ticking(ss.TCPServer):
        def service_actions(self):
            ticks.release()

    with serving(Ticking(("127.0.0.1", 0), EchoLine), poll_interval=0.001):
        for _ in range(3):
            assert ticks.acquire(timeout=LIMIT)


def test_handle_request_timeout(ss):
    timeouts = []

    class Timing(ss.TCPServer):
        timeout = 0.001

        def handle_timeout(self):
            timeouts.append(1)

    with Timing(("127.0.0.1", 0), EchoLine) as server:
        server.handle_request()
        assert timeouts == [1]
        c = socket.create_connection(server.server_address, timeout=LIMIT)
        c.sendall(b"x\n")
        server.handle_request()
        assert c.recv(10) == b"x\n"
        c.close()
    assert timeouts == [1]


def test_socket_made_before_server_bind_and_blocking_after_serving(ss):
    seen = []

    class Binding(ss.TCPServer):
        def server_bind(self):
            seen.append(type(self.socket))
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            super().server_bind()

    with serving(Binding(("127.0.0.1", 0), EchoLine)) as server:
        assert ask(server.server_address) == b"ping\n"
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        shutdown_within(server)
        assert os.get_blocking(server.socket.fileno())
        assert server.socket.gettimeout() is None
    assert seen == [socket.socket]


def test_init_called_through_stdlib_class(ss):
    class Direct(ss.TCPServer):
        def __init__(self, addr, handler):
            socketserver.TCPServer.__init__(self, addr, handler)

    with serving(Direct(("127.0.0.1", 0), EchoLine)) as server:
        assert ask(server.server_address) == b"ping\n"


def test_overridden_get_request(ss):
    class Wrapping(recorder(ss.ThreadingTCPServer)):
        def get_request(self):
            self._note("get_request")
            return super().get_request()

    with serving(Wrapping(("127.0.0.1", 0), EchoLine)) as server:
        assert ask(server.server_address) == b"ping\n"
        assert ask(server.server_address) == b"ping\n"
    assert server.calls.count("get_request") == 2


def test_unix_stream_client_address(ss, tmp_path):
    addrs = []

    class Handler(EchoLine):
        def handle(self):
            addrs.append(self.client_address)
            super().handle()

    path = str(tmp_path / "s")
    with serving(ss.ThreadingUnixStreamServer(path, Handler)):
        assert ask(path, family=socket.AF_UNIX) == b"ping\n"
    assert addrs == [""]
    os.unlink(path)


def test_udp_echo(ss):
    class Echo(socketserver.DatagramRequestHandler):
        def handle(self):
            self.wfile.write(self.rfile.read())

    with serving(ss.ThreadingUDPServer(("127.0.0.1", 0), Echo)) as server:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.settimeout(LIMIT)
            c.sendto(b"datagram", server.server_address)
            assert c.recvfrom(100)[0] == b"datagram"


def test_threaded_handler_waiting_on_another_connection(ss):
    second = threading.Event()

    class Waiting(socketserver.StreamRequestHandler):
        def handle(self):
            if self.rfile.readline() == b"first\n":
                self.wfile.write(b"ok\n" if second.wait(LIMIT) else b"deadlock\n")
            else:
                second.set()

    with serving(ss.ThreadingTCPServer(("127.0.0.1", 0), Waiting)) as server:
        with socket.create_connection(server.server_address, timeout=LIMIT) as c1:
            c1.sendall(b"first\n")
            assert ask(server.server_address, b"second\n") == b""
            assert c1.recv(10) == b"ok\n"


def test_block_on_close_joins_handlers(ss):
    release, started, finished = threading.Event(), threading.Event(), []

    class Slow(socketserver.BaseRequestHandler):
        def handle(self):
            started.set()
            release.wait(LIMIT)
            finished.append(1)

    server = ss.ThreadingTCPServer(("127.0.0.1", 0), Slow)
    with serving(server):
        c = socket.create_connection(server.server_address, timeout=LIMIT)
        assert started.wait(LIMIT)
        shutdown_within(server)
        threading.Thread(target=release.set).start()
    # serving() called server_close(), which waited for the handler
    assert finished == [1]
    c.close()


def test_no_block_on_close(ss):
    release, started, finished = threading.Event(), threading.Event(), []

    class Slow(socketserver.BaseRequestHandler):
        def handle(self):
            started.set()
            release.wait(LIMIT)
            finished.append(1)

    class S(ss.ThreadingTCPServer):
        block_on_close = False

    server = S(("127.0.0.1", 0), Slow)
    with serving(server):
        c = socket.create_connection(server.server_address, timeout=LIMIT)
        assert started.wait(LIMIT)
    assert finished == []          # server_close() did not wait
    release.set()
    wait_for(lambda: finished == [1])
    c.close()


def test_system_exit_reaches_threading_excepthook(ss, monkeypatch):
    seen = []
    hooked = threading.Event()

    def hook(args):
        seen.append(args.exc_type)
        hooked.set()

    monkeypatch.setattr(threading, "excepthook", hook)

    class Exiting(socketserver.BaseRequestHandler):
        def handle(self):
            if self.request.recv(10) == b"exit":
                raise SystemExit(3)
            self.request.sendall(b"ok")

    S = recorder(ss.ThreadingTCPServer)
    with serving(S(("127.0.0.1", 0), Exiting)) as server:
        assert ask(server.server_address, b"exit") == b""
        assert hooked.wait(LIMIT)
        assert ask(server.server_address, b"fine") == b"ok"
    assert seen == [SystemExit]
    assert not [c for c in server.calls if c.startswith("handle_error")]


def test_bookkeeping_stays_bounded(ss):
    server = ss.ThreadingTCPServer(("127.0.0.1", 0), EchoLine)
    with serving(server):
        for _ in range(10):
            assert ask(server.server_address) == b"ping\n"
        assert len(server._threads) < 10


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.forks_beside_test_threads
def test_forking_server_reaps_children(ss):
    server = ss.ForkingTCPServer(("127.0.0.1", 0), EchoLine)
    with serving(server):
        for _ in range(3):
            assert ask(server.server_address) == b"ping\n"
    assert not server.active_children


def test_signal_handler_exception_ends_serve_forever(ss):
    import signal

    class Stop(Exception):
        pass

    def on_alarm(signum, frame):
        raise Stop

    server = ss.TCPServer(("127.0.0.1", 0), EchoLine)
    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(Stop):
            server.serve_forever(poll_interval=None)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert os.get_blocking(server.socket.fileno())
    # the server still works afterwards
    c = socket.create_connection(server.server_address, timeout=LIMIT)
    c.sendall(b"after\n")
    server.handle_request()
    assert c.recv(10) == b"after\n"
    c.close()
    server.server_close()



@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.forks_beside_test_threads
def test_forking_handler_raising(ss):
    class Boom(socketserver.BaseRequestHandler):
        def handle(self):
            if self.request.recv(10) == b"boom":
                raise ValueError("in the child")
            self.request.sendall(b"ok")

    class Quiet(ss.ForkingTCPServer):
        def handle_error(self, request, client_address):
            pass   # in the child: keep the test output clean

    server = Quiet(("127.0.0.1", 0), Boom)
    with serving(server):
        assert ask(server.server_address, b"boom") == b""
        assert ask(server.server_address, b"fine") == b"ok"
    assert not server.active_children
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)     # no zombie left behind


def test_serve_forever_again_after_shutdown(ss):
    server = ss.ThreadingTCPServer(("127.0.0.1", 0), EchoLine)
    for _ in range(2):
        t = serve_in_thread(server, 0.01)
        assert ask(server.server_address) == b"ping\n"
        shutdown_within(server, t, LIMIT)
    server.server_close()


class RecordingSocket(socket.socket):
    """A socket.socket subclass whose accept() must be the one called."""

    accepts = 0

    def accept(self):
        type(self).accepts += 1
        return super().accept()


def test_socket_subclass_accept_is_used(ss):
    class Wrapped(ss.TCPServer):
        def __init__(self, address, handler):
            super().__init__(address, handler, bind_and_activate=False)
            plain = self.socket
            self.socket = RecordingSocket(plain.family, plain.type, fileno=plain.detach())
            self.server_bind()
            self.server_activate()

    RecordingSocket.accepts = 0
    with serving(Wrapped(("127.0.0.1", 0), EchoLine)) as server:
        assert ask(server.server_address) == b"ping\n"
        assert ask(server.server_address) == b"ping\n"
    assert RecordingSocket.accepts == 2


@pytest.mark.parametrize("poll_interval", [0, -1])
def test_poll_interval_zero_or_negative(ss, poll_interval):
    ticks = threading.Semaphore(0)

    class Ticking(ss.TCPServer):
        def service_actions(self):
            ticks.release()

    with serving(Ticking(("127.0.0.1", 0), EchoLine), poll_interval=poll_interval) as server:
        assert ticks.acquire(timeout=LIMIT)
        assert ask(server.server_address) == b"ping\n"
