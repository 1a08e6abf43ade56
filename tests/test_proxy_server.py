"""Server classes behind a load balancer and with TLS: the accept filter
waits for the complete PROXY header (and the TLS ClientHello) in the core,
the header is read before verify_request and the TLS handshake runs in the
handler's thread or process; bad or late headers and failed handshakes are
dropped and counted, the server keeps serving, and silent clients never
stop it."""

import contextlib
import errno
import http.server
import io
import json
import logging
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_proxy_parser import SIG, inet4, inet6, mutated, v1_lines, v2
from test_socketserver_diff import LIMIT, serving, wait_for
from tlsutil import client_context, make_cert, server_context

import fastlisten
from fastlisten import ListenConfig
from fastlisten import proxy as pp
from fastlisten._backend import core


class Who(fastlisten.StreamRequestHandler):
    """Reads a line, answers with what the server told it about the client."""

    def handle(self):
        line = self.rfile.readline()
        header = self.server.proxy_header
        self.wfile.write(json.dumps({
            "client": self.client_address if isinstance(self.client_address, str)
            else list(self.client_address),
            "version": header.version if header else None,
            "command": header.command if header else None,
            "authority": header.authority if header else None,
            "tls": getattr(self.request, "version", lambda: None)(),
            "line": line.decode("latin-1"),
        }).encode() + b"\n")


class WhoAfterEOF(Who):
    """Who, but reads everything the client sends first: closing with
    unread data would reset the connection and lose the reply."""

    def handle(self):
        self.rfile = io.BytesIO(self.rfile.read())
        super().handle()


STREAM_CLASSES = [getattr(fastlisten, name) for name in (
    "TCPServer", "ThreadingTCPServer", "ForkingTCPServer", "UnixStreamServer",
    "ThreadingUnixStreamServer", "ForkingUnixStreamServer") if hasattr(fastlisten, name)]
CONCURRENT = [c for c in STREAM_CLASSES if c.__name__.startswith(("Threading", "Forking"))]


def make_server(base, tmp_path, handler=Who, **config):
    """An instance of base with listen_config=ListenConfig(**config), on
    loopback or a Unix socket in tmp_path."""
    attrs = {"listen_config": ListenConfig(**config) if config else None}
    if "Forking" in base.__name__:
        attrs["max_children"] = 256
    cls = type("Proxied" + base.__name__, (base,), attrs)
    if issubclass(base, fastlisten.UnixStreamServer):
        return cls(str(tmp_path / "s.sock"), handler)
    return cls(("127.0.0.1", 0), handler)


def talk(server, *chunks, ctx=None, close_write=False, source=None):
    """Send chunks (each its own write) then read to EOF; the reply as bytes."""
    family = server.address_family
    c = socket.socket(family, socket.SOCK_STREAM)
    try:
        c.settimeout(LIMIT)
        if source is not None:
            c.bind((source, 0))
        c.connect(server.server_address)
        first, rest = (chunks[0], chunks[1:]) if chunks else (b"", ())
        if ctx is not None:
            c.sendall(first)
            c = ctx.wrap_socket(c, server_hostname="localhost")
            first = b""
        try:
            for chunk in (first,) + tuple(rest):
                if chunk:
                    c.sendall(chunk)
            if close_write:
                c.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError, OSError) as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                raise
            return b""          # dropped before we were done talking
        out = []
        while True:
            try:
                data = c.recv(4096)
            except ConnectionResetError:
                data = b""      # dropped with our bytes unread: a reset
            except OSError:
                if ctx is None:
                    raise
                data = b""      # TLS: the handshake was cut short
            if not data:
                return b"".join(out)
            out.append(data)
    finally:
        c.close()


def reply(server, *chunks, **kw):
    data = talk(server, *chunks, **kw)
    return json.loads(data) if data else None


def counted(server, name, n):
    """Wait until counters()[name] reaches n (forked children report late)."""
    wait_for(lambda: server.counters()[name] >= n)
    return server.counters()[name]


def dropped(server, reason, n):
    """Wait until the accept filter has dropped n connections for reason."""
    wait_for(lambda: server.counters().get("dropped", {}).get(reason, 0) >= n)
    return server.counters()["dropped"][reason]


# -- the real client in client_address ------------------------------------

@pytest.mark.parametrize("base", STREAM_CLASSES)
def test_handler_sees_the_real_client(base, tmp_path):
    server = make_server(base, tmp_path, proxy_protocol="v1+v2")
    with serving(server, 0.05):
        got = reply(server, b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\nhello\n")
        assert got["client"] == ["192.0.2.1", 56324]
        assert (got["version"], got["line"]) == (1, "hello\n")
        got = reply(server, v2(fam=0x21, body=inet6(), tlvs=[(2, b"svc.example")], crc=True)
                    + b"hi\n")
        assert got["client"] == ["2001:db8::1", 1, 0, 0]
        assert (got["version"], got["authority"], got["line"]) == (2, "svc.example", "hi\n")
        # LOCAL (a health check) and UNKNOWN: the real peer stands
        got = reply(server, v2(command=0) + b"x\n")
        assert got["command"] == "LOCAL"
        if base.address_family == socket.AF_UNIX:
            assert got["client"] == ""
        else:
            assert got["client"][0] == "127.0.0.1"
        got = reply(server, b"PROXY UNKNOWN\r\n", b"y\n")
        assert got["version"] == 1 and got["line"] == "y\n"
        assert counted(server, "proxy_accepted", 2) == 2
        assert counted(server, "proxy_local", 2) == 2
        assert server.counters()["proxy_rejected"] == 0


@pytest.mark.parametrize("base", STREAM_CLASSES)
def test_bad_missing_late_headers_never_reach_the_handler(base, tmp_path):
    server = make_server(base, tmp_path, proxy_protocol="v2", proxy_timeout=0.3)
    with serving(server, 0.05):
        assert talk(server, b"GET / HTTP/1.0\r\n\r\n") == b""           # no header
        assert talk(server, b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nx\n") == b""  # v1: not configured
        assert talk(server, v2(body=inet4(), tlvs=[(3, b"\0\0\0\1")]) + b"x\n") == b""
        assert talk(server, SIG + b"\x21\x11", close_write=True) == b""       # truncated
        assert talk(server, SIG[:5]) == b""                                  # late
        assert reply(server, v2(body=inet4()) + b"ok\n")["client"] == ["192.0.2.1", 56324]
        # the accept filter judged them all: none reached the server's own reading
        assert dropped(server, "expired", 1) == 1
        assert server.counters()["dropped"] == {"malformed": 3, "closed": 1, "expired": 1}
        assert server.counters()["proxy_rejected"] == 0


@pytest.mark.parametrize("base", [fastlisten.ThreadingTCPServer, fastlisten.ForkingTCPServer])
def test_untrusted_peer_is_never_believed(base, tmp_path):
    server = make_server(base, tmp_path, proxy_protocol="v1+v2",
                         trusted_proxies="10.0.0.0/8,::1/128")
    with serving(server, 0.05):
        # a valid header from 127.0.0.1, which is not trusted: dropped unread
        assert talk(server, b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\nx\n") == b""
        assert talk(server, v2(body=inet4()) + b"x\n") == b""
        assert counted(server, "proxy_untrusted", 2) == 2
        assert server.counters()["proxy_accepted"] == 0


def test_trusted_source_addresses(tmp_path):
    server = make_server(fastlisten.ThreadingTCPServer, tmp_path, proxy_protocol="v1",
                         trusted_proxies=["127.0.0.2/32"])
    server.server_address = ("127.0.0.1", server.server_address[1])
    with serving(server, 0.05):
        line = b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 80\r\nz\n"
        assert reply(server, line, source="127.0.0.2")["client"] == ["203.0.113.9", 40000]
        assert talk(server, line, source="127.0.0.3") == b""
        assert counted(server, "proxy_untrusted", 1) == 1


@pytest.mark.parametrize("base", [fastlisten.ThreadingTCPServer, fastlisten.TCPServer])
def test_drops_are_logged_once_per_episode(base, tmp_path, caplog):
    """The accept filter's drops (bad headers never leave the core) are
    logged as the server's own were: the first of a run, then its size."""
    server = make_server(base, tmp_path, proxy_protocol="v1")

    def messages():
        return [r.getMessage() for r in caplog.records if r.name == "fastlisten"]
    with caplog.at_level(logging.WARNING, logger="fastlisten"):
        with serving(server, 0.05):
            for _ in range(5):
                assert talk(server, b"nonsense\r\n") == b""
            dropped(server, "malformed", 5)
            wait_for(lambda: len(messages()) >= 1)
            assert reply(server, b"PROXY UNKNOWN\r\nq\n")["line"] == "q\n"
    # (the Listener logs the run's size too when it saw the run open: the
    # core judges all five without returning to Python, so it may not have)
    got = messages()
    assert 1 <= len(got) <= 2, got
    assert "malformed" in got[0] and "further drops are counted" in got[0]
    assert all("dropped in a row" in m for m in got[1:]), got


def test_http_server_logs_the_real_client(tmp_path):
    logged = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(204)
            self.end_headers()

        def log_message(self, fmt, *args):
            logged.append(self.address_string())

    class Server(fastlisten.ThreadingMixIn, http.server.HTTPServer):
        listen_config = ListenConfig(proxy_protocol="v1+v2")

    server = Server(("127.0.0.1", 0), Handler)
    with serving(server, 0.05):
        data = talk(server, b"PROXY TCP4 198.51.100.20 127.0.0.1 5555 80\r\n"
                    b"GET / HTTP/1.0\r\n\r\n")
        assert data.startswith(b"HTTP/1.0 204")
    assert logged == ["198.51.100.20"]


def test_wsgiref_sees_the_real_client():
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ["REMOTE_ADDR"].encode()]

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    class Server(fastlisten.ThreadingMixIn, WSGIServer):
        listen_config = ListenConfig(proxy_protocol="v2")

    server = Server(("127.0.0.1", 0), Quiet)
    server.set_app(app)
    with serving(server, 0.05):
        data = talk(server, v2(fam=0x21, body=inet6()) + b"GET / HTTP/1.0\r\n\r\n")
    assert data.endswith(b"\r\n\r\n2001:db8::1")


# -- the malformed corpus through a real socket ----------------------------

@pytest.fixture(scope="module")
def corpus_server(tmp_path_factory):
    server = make_server(fastlisten.ThreadingTCPServer, tmp_path_factory.mktemp("c"),
                         handler=WhoAfterEOF, proxy_protocol="v1+v2", proxy_timeout=5)
    t = threading.Thread(target=server.serve_forever, args=(0.05,))
    t.start()
    yield server
    server.shutdown()
    t.join(LIMIT)
    server.server_close()


@pytest.mark.allow_leaks      # the module's server outlives each example
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.one_of(mutated(), v1_lines(), st.binary(min_size=1, max_size=64)),
       pieces=st.integers(1, 6))
def test_malformed_headers_through_a_socket(corpus_server, data, pieces):
    server = corpus_server
    try:
        expect = core.proxy_parse(data)
    except pp.ProxyProtocolError:
        expect = "bad"
    before = server.counters()
    # split over several writes; the client closes its side so that an
    # incomplete header ends in EOF rather than the deadline
    step = max(1, len(data) // pieces)
    chunks = [data[i:i + step] for i in range(0, len(data), step)]
    got = talk(server, *chunks, b"\n" if expect not in ("bad", None) else b"",
               close_write=True)
    if isinstance(expect, pp.ProxyHeader):
        assert json.loads(got)["version"] == expect.version
        wait_for(lambda: server.counters()["proxy_accepted"] + server.counters()["proxy_local"]
                 == before["proxy_accepted"] + before["proxy_local"] + 1)
    else:
        assert got == b""       # never reached the handler: the accept filter dropped it
        wait_for(lambda: sum(server.counters().get("dropped", {}).values())
                 == sum(before.get("dropped", {}).values()) + 1)
        assert server.counters()["proxy_rejected"] == before["proxy_rejected"]
    # and it keeps serving
    assert reply(server, b"PROXY UNKNOWN\r\nalive\n", close_write=True)["line"] == "alive\n"


# -- TLS ------------------------------------------------------------------

@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return make_cert(tmp_path_factory.mktemp("tls"))


def tls_client_hello(ctx):
    """The first TLS record a client sends (its ClientHello), from a
    memory BIO: no server needed."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("base", STREAM_CLASSES)
def test_tls_handshake_in_the_worker_then_proxy_first(base, tmp_path, cert, caplog):
    # (the filter's deadline is the longer of the two timeouts: the silent
    # client below expires after 0.5 s, not proxy_timeout's default 3 s)
    server = make_server(base, tmp_path, proxy_protocol="v1+v2", proxy_timeout=0.5,
                         ssl_context=server_context(*cert), handshake_timeout=0.5)
    client = client_context(cert[0])
    with serving(server, 0.05):
        got = reply(server, v2(body=inet4()), b"secret\n", ctx=client)
        assert got["client"] == ["192.0.2.1", 56324]
        assert got["tls"].startswith("TLS") and got["line"] == "secret\n"
        # a plain-text client after the header: not a ClientHello, the
        # accept filter drops it; a silent one after the header: its deadline
        assert talk(server, v2(body=inet4()) + b"GET / HTTP/1.0\r\n\r\n") == b""
        assert talk(server, v2(body=inet4())) == b""
        assert dropped(server, "expired", 1) == 1
        assert server.counters()["dropped"] == {"malformed": 1, "expired": 1}
        # a ClientHello, then nothing: the handshake fails in the handler's thread
        hello = tls_client_hello(client)
        got = talk(server, v2(body=inet4()), hello)
        assert got[:1] in (b"", b"\x16") and b"client" not in got     # TLS records only
        assert counted(server, "tls_failures", 1) == 1
        assert reply(server, b"PROXY UNKNOWN\r\n", b"again\n", ctx=client)["line"] == "again\n"
        assert counted(server, "tls_handshakes", 2) == 2


def test_tls_without_proxy(tmp_path, cert):
    class Server(fastlisten.ThreadingTCPServer):
        listen_config = ListenConfig(ssl_context=server_context(*cert))

    server = Server(("127.0.0.1", 0), Who)
    with serving(server, 0.05):
        got = reply(server, b"", b"plain tls\n", ctx=client_context(cert[0]))
        assert got["client"][0] == "127.0.0.1" and got["line"] == "plain tls\n"
        assert server.counters()["tls_handshakes"] == 1
        assert "proxy_accepted" not in server.counters()


def test_end_handlers_reaches_a_tls_connection(tmp_path, cert):
    """end_handlers() shuts down the SSLSocket that took over the accepted
    socket: a handler waiting for its client ends."""
    started = threading.Event()

    class Waiting(fastlisten.StreamRequestHandler):
        def handle(self):
            started.set()
            self.rfile.readline()       # the client never sends a line

    class Server(fastlisten.ThreadingTCPServer):
        listen_config = ListenConfig(ssl_context=server_context(*cert))

    server = Server(("127.0.0.1", 0), Waiting)
    t = threading.Thread(target=server.serve_forever, args=(0.05,))
    t.start()
    c = client_context(cert[0]).wrap_socket(
        socket.create_connection(server.server_address, timeout=LIMIT),
        server_hostname="localhost")
    try:
        assert started.wait(LIMIT)
        server.shutdown()
        assert server.drain(0) == 1     # ended, not waited for
        assert c.recv(10) == b""        # the server's side is shut down
        wait_for(lambda: server.counters()["handlers_running"] == 0)
    finally:
        c.close()
        server.shutdown()
        t.join(LIMIT)
        server.server_close()


# -- silent clients do not stop service ------------------------------------

SILENT = 200

#: Connects N sockets, says "ready", holds them until it is terminated.  In
#: another process, so that forked handlers do not inherit (and keep open)
#: the clients' ends (nor the end of a pipe to it: SIGTERM ends it).
_SILENT_CLIENTS = """
import signal, socket, sys
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
family, n, where = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
address = where if family == socket.AF_UNIX else (where.rsplit(":", 1)[0], int(where.rsplit(":", 1)[1]))
socks = []
for _ in range(n):
    s = socket.socket(family)
    s.settimeout(10)
    s.connect(address)
    socks.append(s)
print("ready", flush=True)
signal.sigwait([signal.SIGTERM])
"""


@contextlib.contextmanager
def silent_clients(server, n):
    where = server.server_address
    if server.address_family != socket.AF_UNIX:
        where = f"{where[0]}:{where[1]}"
    proc = subprocess.Popen([sys.executable, "-c", _SILENT_CLIENTS,
                             str(int(server.address_family)), str(n), where],
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"ready\n"
        yield
    finally:
        proc.terminate()
        proc.wait(LIMIT)
        proc.stdout.close()


@pytest.mark.parametrize("mode", ["proxy", "tls"])
@pytest.mark.parametrize("base", CONCURRENT)
def test_silent_clients_do_not_delay_a_normal_one(base, mode, tmp_path, cert):
    """200 clients connect and say nothing; a normal client is served while
    they all still wait for their (long) deadline, in the accept filter."""
    server = make_server(base, tmp_path, **(
        dict(proxy_protocol="v1+v2", proxy_timeout=60) if mode == "proxy"
        else dict(ssl_context=server_context(*cert), handshake_timeout=60)))
    client = client_context(cert[0]) if mode == "tls" else None
    header = b"PROXY UNKNOWN\r\n" if mode == "proxy" else b""
    with serving(server, 0.05):
        with silent_clients(server, SILENT):
            wait_for(lambda: server.counters().get("waiting", 0) >= SILENT)
            started = time.monotonic()
            got = reply(server, header, b"normal\n", ctx=client)
            took = time.monotonic() - started
            assert got["line"] == "normal\n"
            assert took < 30     # far inside the silent clients' 60 s deadline
            assert server.counters()["handlers_peak"] <= 2      # none held a handler
        assert dropped(server, "closed", SILENT) == SILENT
        assert server.counters()["waiting"] == 0
        assert server.counters().get("proxy_rejected", 0) == 0
        assert server.counters().get("tls_failures", 0) == 0


@pytest.mark.parametrize("base", [fastlisten.TCPServer, fastlisten.UnixStreamServer])
def test_synchronous_server_is_not_held_by_a_silent_client(base, tmp_path):
    """The synchronous servers read the header inline, once the accept
    filter has it complete: a silent client waits in the filter, holds the
    next one back not at all, and is dropped at proxy_timeout."""
    server = make_server(base, tmp_path, proxy_protocol="v1", proxy_timeout=60)
    with serving(server, 0.05):
        s = socket.socket(server.address_family)
        try:
            s.settimeout(LIMIT)
            s.connect(server.server_address)
            wait_for(lambda: server.counters().get("waiting", 0) >= 1)
            got = reply(server, b"PROXY UNKNOWN\r\nnext\n")
            assert got["line"] == "next\n"
            assert server.counters()["waiting"] == 1        # still waiting, 60 s to go
            assert server.counters()["proxy_errors"] == {}
        finally:
            s.close()
    # (the first server is closed: its Unix socket file is gone)
    server_expiry = make_server(base, tmp_path, proxy_protocol="v1", proxy_timeout=0.3)
    with serving(server_expiry, 0.05):
        s = socket.socket(server_expiry.address_family)
        try:
            s.settimeout(LIMIT)
            s.connect(server_expiry.server_address)
            assert dropped(server_expiry, "expired", 1) == 1
            assert s.recv(1) == b""         # closed by the server at its deadline
        finally:
            s.close()
