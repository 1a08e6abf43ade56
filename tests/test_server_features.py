"""Library features of fastlisten's socketserver classes that the stdlib
lacks: listener options from a ListenConfig (``listen_config``), a drain
with a deadline (``drain``/``end_handlers``) and ``counters()``."""

import errno
import os
import socket
import socketserver
import ssl
import sys
import threading
import time
import warnings

import pytest
from helpers import kernel_somaxconn, serve_in_thread, shutdown_within
from test_socketserver_diff import LIMIT, EchoLine, ask, serving, wait_for

import fastlisten
from fastlisten import ListenConfig


def _backlog_of(sock):
    with fastlisten.Listener(sock.family, fileno=sock.fileno(), owned=False) as lst:
        return lst.queue()[1]


# -- listen_config ------------------------------------------------------------------

def test_listen_config_options_reach_the_server_socket():
    class Server(fastlisten.TCPServer):
        listen_config = ListenConfig(nodelay=True, backlog=7, rcvbuf=65536)

    with Server(("127.0.0.1", 0), EchoLine) as server:
        sock = server.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)   # the config's default
        assert _backlog_of(sock) == 7
        with serving(server):
            with socket.create_connection(server.server_address, timeout=LIMIT) as c:
                # accepted connections inherit TCP_NODELAY from the listener
                assert c.recv(0) == b""
            assert ask(server.server_address) == b"ping\n"


def test_without_listen_config_the_stdlib_attributes_rule():
    with fastlisten.TCPServer(("127.0.0.1", 0), EchoLine) as server:
        assert not server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        assert _backlog_of(server.socket) == kernel_somaxconn()


def test_listen_config_is_validated_with_the_address_like_listen(tmp_path):
    class Unix(fastlisten.UnixStreamServer):
        listen_config = ListenConfig(nodelay=True)

    path = str(tmp_path / "never-created.sock")
    with pytest.raises(ValueError, match="nodelay=True is a TCP option"):
        Unix(path, EchoLine)
    assert not os.path.exists(path)


def test_listen_config_warns_like_listen():
    class Deep(fastlisten.TCPServer):
        listen_config = ListenConfig(backlog=10**6)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Deep(("127.0.0.1", 0), EchoLine):
            pass
    assert [w.category for w in caught] == [fastlisten.BacklogTruncatedWarning]


def test_a_unix_server_with_listen_config_replaces_a_stale_file_and_removes_it(tmp_path):
    path = str(tmp_path / "app.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()            # a leftover file, as a crashed server leaves it
    with pytest.raises(OSError, match="leaves it in place"):
        fastlisten.UnixStreamServer(path, EchoLine)   # the stdlib's way: refused

    class Unix(fastlisten.UnixStreamServer):
        listen_config = ListenConfig(family="unix", unix_mode=0o600)

    with Unix(path, EchoLine) as server:
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)
        with serving(server):
            assert ask(path, family=socket.AF_UNIX) == b"ping\n"
    assert not os.path.exists(path)


def test_listen_config_fd_takes_over_an_open_listening_socket():
    with socket.create_server(("127.0.0.1", 0)) as outer:
        fd = os.dup(outer.fileno())

        class Adopting(fastlisten.ThreadingTCPServer):
            listen_config = ListenConfig(fd=fd)

        with Adopting(None, EchoLine) as server:
            assert server.server_address == outer.getsockname()
            assert server.socket.fileno() == fd
            with serving(server):
                assert ask(server.server_address) == b"ping\n"


def test_bind_errors_are_explained_with_and_without_listen_config():
    class Configured(fastlisten.TCPServer):
        listen_config = ListenConfig()

    with socket.create_server(("127.0.0.1", 0)) as holder, warnings.catch_warnings():
        # the holder's port is an ephemeral one, which a ListenConfig warns about
        warnings.simplefilter("ignore", fastlisten.EphemeralPortWarning)
        for cls in (fastlisten.TCPServer, Configured):
            with pytest.raises(OSError, match=f"pid {os.getpid()} "):
                cls(holder.getsockname(), EchoLine)


# -- drain, end_handlers, counters --------------------------------------------------

class Parked(socketserver.StreamRequestHandler):
    """Says it started, then waits for a line from its client (or the end
    of its connection), for LIMIT seconds at most: a forked one holds a copy
    of the test's client socket, so no end of file reaches it if the test
    fails before ending it."""

    timeout = LIMIT

    def handle(self):
        self.wfile.write(b"started\n")
        self.wfile.flush()
        if self.rfile.readline() == b"":      # EOF: the server ended us
            return
        self.wfile.write(b"finished\n")


def served(server):
    """serving(), but the server stays open afterwards, for drain()."""
    return serving(server, close=False)


def _started(address):
    c = socket.create_connection(address, timeout=LIMIT)
    assert c.makefile("rb").readline() == b"started\n"
    return c


def test_drain_waits_for_a_handler_that_finishes():
    with fastlisten.ThreadingTCPServer(("127.0.0.1", 0), Parked) as server:
        with served(server):
            c = _started(server.server_address)
            assert server.counters()["handlers_running"] == 1
        # serve_forever has returned; the handler still runs
        result = []
        drainer = threading.Thread(target=lambda: result.append(server.drain(LIMIT)))
        drainer.start()
        c.sendall(b"go\n")
        assert c.makefile("rb").readline() == b"finished\n"
        drainer.join(LIMIT)
        c.close()
    assert result == [0]


def test_drain_ends_handlers_left_at_the_deadline_without_reporting_an_error(capsys):
    clients = []
    with fastlisten.ThreadingTCPServer(("127.0.0.1", 0), Parked) as server:
        try:
            with served(server):
                clients += [_started(server.server_address) for _ in range(2)]
                wait_for(lambda: server.counters()["handlers_running"] == 2)
                counters = server.counters()
                assert counters["accepted"] == 2 and counters["handlers_peak"] == 2
            start = time.monotonic()
            assert server.drain(0.1) == 2
            assert time.monotonic() - start >= 0.1
            for c in clients:
                assert c.recv(64) == b""          # shut down by the server
            wait_for(lambda: server.counters()["handlers_running"] == 0)
        finally:
            # (on failure too: server_close() waits for the handlers, which wait for us)
            for c in clients:
                c.close()
    assert "Traceback" not in capsys.readouterr().err


class WritesAfterEnd(socketserver.StreamRequestHandler):
    """Reads until its connection ends, then writes: that write fails
    (EPIPE) when the server shut the connection down; a client that sends
    "boom" gets a failure of the handler's own."""

    def handle(self):
        self.wfile.write(b"started\n")
        if self.rfile.readline() == b"boom\n":
            raise ValueError("the handler's own failure")
        self.wfile.write(b"late\n")


def test_a_failure_caused_by_end_handlers_is_not_reported_as_the_handlers(capsys):
    with fastlisten.ThreadingTCPServer(("127.0.0.1", 0), WritesAfterEnd) as server:
        with served(server):
            own = _started(server.server_address)
            own.sendall(b"boom\n")
            assert own.recv(64) == b""
            wait_for(lambda: server.counters()["handlers_running"] == 0)
            assert "the handler's own failure" in capsys.readouterr().err   # still reported
            ended = _started(server.server_address)
        assert server.drain(0) == 1
        assert ended.recv(64) == b""
        wait_for(lambda: server.counters()["handlers_running"] == 0)   # its write failed
        own.close()
        ended.close()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


class Stubborn(socketserver.StreamRequestHandler):
    """Says it started, then waits for the test's say-so, deaf to its
    connection (a handler that shutting the connection down does not end)."""

    release = threading.Event()

    def handle(self):
        self.wfile.write(b"started\n")
        self.wfile.flush()
        self.release.wait(LIMIT)


def test_end_handlers_cuts_a_drain_short_whenever_it_comes():
    """end_handlers() from another thread (a second Ctrl-C) ends a drain
    that waits, or is about to wait, for a handler that does not finish."""
    Stubborn.release.clear()
    with fastlisten.ThreadingTCPServer(("127.0.0.1", 0), Stubborn) as server:
        with served(server):
            c = _started(server.server_address)
        try:
            result = []
            drainer = threading.Thread(target=lambda: result.append(server.drain(60)),
                                       daemon=True)
            drainer.start()
            assert server.end_handlers() == 1     # before or during drain's wait
            drainer.join(LIMIT)
            assert not drainer.is_alive(), "drain() waited on after end_handlers()"
            assert result == [1]                  # the stubborn handler still runs
        finally:
            Stubborn.release.set()
            c.close()


def test_the_synchronous_server_has_nothing_to_drain():
    with fastlisten.TCPServer(("127.0.0.1", 0), EchoLine) as server:
        with served(server):
            assert ask(server.server_address) == b"ping\n"
            wait_for(lambda: server.counters()["accepted"] == 1)
        assert server.drain(0) == 0
        assert server.counters()["handlers_peak"] == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.forks_beside_test_threads
def test_drain_ends_forked_handlers_with_sigterm():
    class Forking(fastlisten.ForkingTCPServer):
        fl_kill_timeout = LIMIT

    with Forking(("127.0.0.1", 0), Parked) as server:
        with served(server):
            c = _started(server.server_address)
            assert server.counters()["handlers_running"] == 1
        assert server.drain(0.05) == 1
        assert not server.active_children          # killed and reaped
        assert c.recv(64) == b""
        c.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.forks_beside_test_threads
def test_shutdown_is_not_held_up_by_a_full_forking_server():
    class One(fastlisten.ForkingTCPServer):
        max_children = 1
        fl_kill_timeout = LIMIT

    with One(("127.0.0.1", 0), Parked) as server:
        t = serve_in_thread(server)
        first = _started(server.server_address)
        second = socket.create_connection(server.server_address, timeout=LIMIT)
        try:
            wait_for(lambda: server.counters()["accepted"] == 2)   # waits for room
            shutdown_within(server, t, LIMIT)   # the stdlib would block in waitpid here
            assert server.end_handlers() == 1
            server.server_close()
            assert second.recv(64) == b""      # kept for serve_queued(), closed unhandled
        finally:
            # On failure too: server_close() would wait for the child, which
            # waits for an end of file that its own inherited copy of our
            # client socket holds back.
            server.end_handlers()
            first.close()
            second.close()


def test_a_servers_counters_show_its_accept_queue():
    with fastlisten.TCPServer(("127.0.0.1", 0), EchoLine) as server:
        with served(server):
            assert ask(server.server_address) == b"ping\n"
            wait_for(lambda: server.counters()["accepted"] == 1)
            counters = server.counters()
    assert counters["queued"] == 0
    assert counters["backlog"] == kernel_somaxconn()


def test_connection_options_on_a_datagram_server_are_refused():
    """listen_config (its TLS too) acts on connections: a UDP server with
    one fails at start-up, with a message naming it; one set later fails
    each request with that message (not a TLS error)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)

    class WithConfig(fastlisten.UDPServer):
        listen_config = ListenConfig(backlog=8)

    class WithTLS(fastlisten.UDPServer):
        listen_config = ListenConfig(ssl_context=context)

    with pytest.raises(ValueError, match="WithConfig: listen_config is for stream"):
        WithConfig(("127.0.0.1", 0), socketserver.DatagramRequestHandler)
    with pytest.raises(ValueError, match="WithTLS: listen_config is for stream"):
        WithTLS(("127.0.0.1", 0), socketserver.DatagramRequestHandler)

    errors = []

    class Late(fastlisten.UDPServer):
        timeout = LIMIT

        def handle_error(self, request, client_address):
            errors.append(sys.exc_info()[1])

    with Late(("127.0.0.1", 0), socketserver.DatagramRequestHandler) as server:
        server.listen_config = ListenConfig(ssl_context=context)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(b"hello\n", server.server_address)
            server.handle_request()
    assert len(errors) == 1 and isinstance(errors[0], ValueError)
    assert "Late: listen_config is for stream" in str(errors[0])


def _leave_time_wait(server_class):
    """A port that a server of server_class served one connection on and
    closed: the server's side of it is in TIME_WAIT now (it closed first)."""
    with server_class(("127.0.0.1", 0), EchoLine) as server:
        with serving(server):
            assert ask(server.server_address, b"one\n") == b"one\n"
        return server.server_address[1]


def test_a_port_in_time_wait_tells_a_server_class_about_allow_reuse_address():
    """The stdlib's TCPServer sets no SO_REUSEADDR: after a restart, the
    port is held by the last run's connections in TIME_WAIT, and the error
    names the class attribute (not listen()'s reuse_address); with it set,
    the next restart rebinds over them, as the message says."""
    port = _leave_time_wait(fastlisten.TCPServer)
    with pytest.raises(OSError) as info:
        fastlisten.TCPServer(("127.0.0.1", port), EchoLine)
    text = str(info.value)
    assert info.value.errno == errno.EADDRINUSE and "TIME_WAIT" in text
    assert "set allow_reuse_address = True" in text
    assert "(reuse_address=True, the default)" not in text

    class Reusing(fastlisten.TCPServer):
        allow_reuse_address = True

    port = _leave_time_wait(Reusing)
    with Reusing(("127.0.0.1", port), EchoLine) as again:
        assert again.server_address[1] == port
