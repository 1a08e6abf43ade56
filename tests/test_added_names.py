"""The names fastlisten's server classes add to the stdlib's (README,
"Names fastlisten adds"): a subclass that defines one for its own purpose
neither switches a fastlisten feature on nor breaks the server.

The TLS case is the one met in the wild: werkzeug's dev server wraps its
own listening socket and keeps the context in ``self.ssl_context``; other
programs wrap each connection in ``get_request``.  Each is served as the
stdlib serves it, without a second handshake inside the first."""

import collections
import http.server
import socket
import ssl
import threading
import urllib.request
import warnings

import pytest
from test_socketserver_diff import LIMIT, EchoLine, ask, serving, wait_for
from tlsutil import client_context, make_cert, server_context

import fastlisten
from fastlisten import ListenConfig
from fastlisten.errors import FastlistenWarning
from fastlisten.server import _own_method


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return make_cert(tmp_path_factory.mktemp("tls"))


class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, *args):
        pass


def https_get(server, cert):
    url = "https://127.0.0.1:%d/" % server.server_address[1]
    with urllib.request.urlopen(url, context=client_context(cert[0]), timeout=LIMIT) as r:
        return r.status, r.read()


def http_get(server):
    url = "http://127.0.0.1:%d/" % server.server_address[1]
    with urllib.request.urlopen(url, timeout=LIMIT) as r:
        return r.status, r.read()


#: CPython 3.12+'s warning for a fork beside other threads (conftest.py's FORK_WARNING)
FORK_WARNING = r"This process \(pid=\d+\) is multi-threaded, use of fork\(\) "
BASES = [fastlisten.TCPServer, fastlisten.ThreadingTCPServer, fastlisten.ForkingTCPServer]
IDS = ["sync", "threading", "forking"]


# -- ssl_context and handshake_timeout: the subclass's own --------------------

@pytest.mark.parametrize("base", BASES, ids=IDS)
def test_a_server_that_wraps_its_own_listening_socket(base, cert):
    """werkzeug's pattern (the reproduction of issue 21): the listening
    socket is an SSLSocket, ssl_context only remembered.  200, as with the
    stdlib; the connection is never wrapped a second time."""
    class TLSServer(http.server.HTTPServer, base):
        def __init__(self, address, handler, context):
            super().__init__(address, handler)
            self.socket = context.wrap_socket(self.socket, server_side=True)
            self.ssl_context = context
            self.handshake_timeout = "werkzeug's own"

    with serving(TLSServer(("127.0.0.1", 0), Hello, server_context(*cert)), 0.05) as server:
        for _ in range(3):
            assert https_get(server, cert) == (200, b"hello")
        assert "tls_handshakes" not in server.counters()     # fastlisten ran none


@pytest.mark.parametrize("base", BASES, ids=IDS)
def test_a_server_that_wraps_each_connection_in_get_request(base, cert):
    """The other pattern found in public code: a plain listening socket,
    get_request() wraps what accept() returns with self.ssl_context."""
    class TLSServer(http.server.HTTPServer, base):
        def __init__(self, address, handler, context):
            self.ssl_context = context
            super().__init__(address, handler)

        def get_request(self):
            conn, address = super().get_request()
            try:
                return self.ssl_context.wrap_socket(conn, server_side=True), address
            except BaseException:
                conn.close()
                raise

    with serving(TLSServer(("127.0.0.1", 0), Hello, server_context(*cert)), 0.05) as server:
        assert https_get(server, cert) == (200, b"hello")


@pytest.mark.parametrize("base", BASES, ids=IDS)
def test_own_ssl_context_on_a_plain_server_switches_no_tls_on(base, cert):
    """A server keeping a client context for its own outgoing calls (and
    a handshake_timeout of its own) serves plain HTTP, unwarned."""
    class Server(http.server.HTTPServer, base):
        ssl_context = ssl.create_default_context()     # for upstream calls
        handshake_timeout = 3

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # (a fork beside the test's own threads: see forks_beside_test_threads)
        warnings.filterwarnings("ignore", FORK_WARNING, DeprecationWarning)
        with serving(Server(("127.0.0.1", 0), Hello), 0.05) as server:
            assert http_get(server) == (200, b"hello")
            assert "tls_handshakes" not in server.counters()


def test_the_old_ssl_context_attribute_is_warned_and_serves_plain_tcp(cert):
    """Migration: a server written for fastlisten's old ``ssl_context``
    attribute (a server-side context, nothing of its own wrapping) is
    told once that it serves plain TCP and where TLS lives now."""
    class Server(fastlisten.ThreadingTCPServer):
        ssl_context = server_context(*cert)

    server = Server(("127.0.0.1", 0), EchoLine)
    with pytest.warns(FastlistenWarning, match=r"ListenConfig\(ssl_context="):
        with serving(server, 0.05):
            assert ask(server.server_address) == b"ping\n"      # plain TCP


@pytest.mark.parametrize("base", BASES, ids=IDS)
def test_tls_through_listen_config_beside_an_own_handshake_timeout(base, cert):
    """fastlisten's TLS is ListenConfig's; a subclass's handshake_timeout
    (not a number here) is not read."""
    class Server(http.server.HTTPServer, base):
        listen_config = ListenConfig(ssl_context=server_context(*cert))
        handshake_timeout = "the subclass's own"

    with serving(Server(("127.0.0.1", 0), Hello), 0.05) as server:
        assert https_get(server, cert) == (200, b"hello")
        wait_for(lambda: server.counters()["tls_handshakes"] == 1)


def test_an_sslsocket_is_not_wrapped_again_when_both_ask_for_tls(cert):
    """A server that wraps its own socket *and* has fastlisten's TLS in its
    listen_config: the accepted SSLSocket is TLS already, never wrapped
    again."""
    context = server_context(*cert)

    class Server(http.server.HTTPServer, fastlisten.ThreadingTCPServer):
        listen_config = ListenConfig(ssl_context=context)

        def server_activate(self):
            super().server_activate()
            self.socket = context.wrap_socket(self.socket, server_side=True)

    with serving(Server(("127.0.0.1", 0), Hello), 0.05) as server:
        assert https_get(server, cert) == (200, b"hello")
        assert server.counters()["tls_failures"] == 0


# -- settings: the subclass's own value is left alone --------------------------

def test_own_listen_config_is_left_alone():
    class Server(fastlisten.TCPServer):
        listen_config = {"nodelay": True, "who": "the subclass"}

    with serving(Server(("127.0.0.1", 0), EchoLine), 0.05) as server:
        assert ask(server.server_address) == b"ping\n"
        assert not server.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert server.listen_config["who"] == "the subclass"


def test_own_accept_batch_size_does_not_change_the_batches():
    """The batch size is fl_accept_batch_size: a subclass's accept_batch_size
    of 1 leaves fastlisten's batches as they are."""
    class Server(fastlisten.TCPServer):
        accept_batch_size = 1

    server = Server(("127.0.0.1", 0), EchoLine)
    clients = [socket.create_connection(server.server_address, timeout=LIMIT)
               for _ in range(5)]
    try:
        for c in clients:
            c.sendall(b"queued\n")
        with serving(server, 0.05):
            for c in clients:
                assert c.makefile("rb").readline() == b"queued\n"
            assert server.counters()["max_batch"] == 5
    finally:
        for c in clients:
            c.close()


@pytest.mark.parametrize("name, value", [
    ("max_threads", 1), ("max_queued", "the subclass's own"),
    ("thread_idle_timeout", "the subclass's own")])
def test_own_thread_settings_are_left_alone(name, value):
    """ThreadingMixIn's settings are fl_max_threads, fl_max_queued and
    fl_thread_idle_timeout: a subclass's max_threads (here 1, for its own
    purposes), max_queued or thread_idle_timeout caps nothing and breaks
    nothing: three handlers that wait for each other all run at once."""
    together = threading.Barrier(3, timeout=LIMIT)

    class Together(fastlisten.StreamRequestHandler):
        def handle(self):
            together.wait()
            self.wfile.write(self.rfile.readline())

    Server = type("Server", (fastlisten.ThreadingTCPServer,), {name: value})
    with serving(Server(("127.0.0.1", 0), Together), 0.05) as server:
        clients = [socket.create_connection(server.server_address, timeout=LIMIT)
                   for _ in range(3)]
        try:
            for c in clients:
                c.sendall(b"all at once\n")
            for c in clients:
                assert c.makefile("rb").readline() == b"all at once\n"
        finally:
            for c in clients:
                c.close()
        assert getattr(server, name) == value


@pytest.mark.forks_beside_test_threads
def test_own_kill_timeout_of_a_forking_server_is_left_alone():
    """end_handlers() gives children fl_kill_timeout, not a subclass's
    kill_timeout."""
    class Waiting(fastlisten.StreamRequestHandler):
        def handle(self):
            self.wfile.write(b"started\n")
            self.rfile.readline()           # the client never sends a line

    class Server(fastlisten.ForkingTCPServer):
        kill_timeout = "whenever the subclass likes"

    server = Server(("127.0.0.1", 0), Waiting)
    t = threading.Thread(target=server.serve_forever, args=(0.05,), name="serve_forever-own")
    t.start()
    try:
        with socket.create_connection(server.server_address, timeout=LIMIT) as c:
            assert c.makefile("rb").readline() == b"started\n"
            server.shutdown()
            assert server.drain(0) == 1
            assert not server.active_children
    finally:
        server.shutdown()
        t.join(LIMIT)
        server.server_close()


# -- methods and properties: the subclass's own meaning ------------------------

def test_own_counters_attribute():
    """A subclass's counters (a Counter it fills) is its own; fastlisten's
    stay reachable for fastlisten's code."""
    class Server(fastlisten.ThreadingTCPServer):
        def __init__(self, *args):
            super().__init__(*args)
            self.counters = collections.Counter()

        def process_request(self, request, client_address):
            self.counters["requests"] += 1
            super().process_request(request, client_address)

    with serving(Server(("127.0.0.1", 0), EchoLine), 0.05) as server:
        assert ask(server.server_address) == b"ping\n"
        assert server.counters == {"requests": 1}
        wait_for(lambda: _own_method(server, "counters")()["accepted"] == 1)


def test_own_end_handlers_and_drain():
    """drain() ends the handlers with fastlisten's end_handlers(), whatever
    a subclass keeps under that name (a list of its own callbacks here)
    and whatever its own drain() means."""
    started = threading.Event()

    class Waiting(fastlisten.StreamRequestHandler):
        def handle(self):
            started.set()
            self.rfile.readline()           # the client never sends a line

    class Server(fastlisten.ThreadingTCPServer):
        end_handlers = []                   # the subclass's own callbacks

        def drain(self):                    # ... and its own drain, no timeout
            return "the subclass's own"

    server = Server(("127.0.0.1", 0), Waiting)
    t = threading.Thread(target=server.serve_forever, args=(0.05,))
    t.start()
    try:
        with socket.create_connection(server.server_address, timeout=LIMIT) as c:
            assert started.wait(LIMIT)
            server.shutdown()
            assert server.drain() == "the subclass's own"
            assert _own_method(server, "drain")(0) == 1     # what Workers calls
            assert c.recv(10) == b""
    finally:
        server.shutdown()
        t.join(LIMIT)
        server.server_close()


def test_own_proxy_header_attribute():
    """A subclass may set proxy_header on the instance (the name is a
    non-data descriptor): its value wins, the server is not broken."""
    seen = []

    class Reads(fastlisten.StreamRequestHandler):
        def handle(self):
            seen.append(self.server.proxy_header)
            self.wfile.write(self.rfile.readline())

    class Server(fastlisten.ThreadingTCPServer):
        def __init__(self, *args):
            super().__init__(*args)
            self.proxy_header = "X-Forwarded-For"   # the header name it trusts

    with serving(Server(("127.0.0.1", 0), Reads), 0.05) as server:
        assert ask(server.server_address) == b"ping\n"
    assert seen == ["X-Forwarded-For"]


def test_workers_with_own_drain_and_listen_config_and_tls_in_its_config(tmp_path, cert):
    """fastlisten.Workers over a server class with a drain() and a
    listen_config of its own: TLS given to Workers in a ListenConfig is
    served by every worker (the parent's listening socket takes only the
    socket options), and the graceful stop serves the queue and drains with
    fastlisten's serve_queued() and drain(), never the subclass's."""
    import signal
    import sys
    import textwrap

    from test_workers import supervised

    marker = tmp_path / "own-drain-called"
    queued_marker = tmp_path / "own-serve-queued-called"
    (tmp_path / "app.py").write_text(textwrap.dedent(f"""
        import logging, ssl, sys, fastlisten
        logging.basicConfig(level=logging.INFO)

        class Echo(fastlisten.StreamRequestHandler):
            def handle(self):
                self.wfile.write(b"%d " % self.connection.version().startswith("TLS")
                                 + self.rfile.readline())

        class Server(fastlisten.ThreadingTCPServer):
            listen_config = {{"the": "subclass's own"}}

            def drain(self, *args):             # its own meaning
                open({str(marker)!r}, "w").close()

            def serve_queued(self, *args):      # its own meaning too
                open({str(queued_marker)!r}, "w").close()

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain({cert[0]!r}, {cert[1]!r})
        w = fastlisten.Workers(Server, ("127.0.0.1", 0), Echo, workers=2,
                               listen_config=fastlisten.ListenConfig(ssl_context=ctx))
        w.bind()
        print("listening on 127.0.0.1:%d" % w.address[1], flush=True)
        sys.exit(w.run())
    """))
    with supervised(cmd=[sys.executable, "app.py"], cwd=tmp_path) as s:
        for _ in range(4):
            with client_context(cert[0]).wrap_socket(
                    socket.create_connection(s.address, timeout=LIMIT),
                    server_hostname="localhost") as c:
                c.sendall(b"over tls\n")
                assert c.makefile("rb").readline() == b"1 over tls\n"
        rc, log = s.stop(signal.SIGTERM)
    assert rc == 0 and "Traceback" not in log, log
    assert not marker.exists()
    assert not queued_marker.exists()
