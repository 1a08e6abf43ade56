"""The accept filter in the server classes: a connection reaches
verify_request and a handler only once it is ready (listen_config's
ready_rule; by default the complete PROXY header, the TLS ClientHello), so
clients that have not spoken hold no thread, no child process and never
block the synchronous loop.  Real sockets on loopback; bounded waits."""

import contextlib
import json
import re
import socket
import socketserver
import subprocess
import sys
import textwrap
import threading

import pytest
from test_proxy_parser import inet4, v2
from test_proxy_server import tls_client_hello
from test_socketserver_diff import LIMIT, serving, wait_for
from tlsutil import client_context, make_cert, server_context

import fastlisten
from fastlisten import ListenConfig


class Echo(fastlisten.StreamRequestHandler):
    """Answers the first line it reads, with the client's address."""

    def handle(self):
        line = self.rfile.readline()
        address = self.client_address
        self.wfile.write(json.dumps({
            "line": line.decode("latin-1"),
            "client": address if isinstance(address, str) else list(address)}).encode()
            + b"\n")


def make(base, tmp_path, handler=Echo, attrs=None, **config):
    """An instance of base with listen_config=ListenConfig(**config)."""
    unix = issubclass(base, fastlisten.UnixStreamServer)
    if unix:
        config.setdefault("family", "unix")
    namespace = {"listen_config": ListenConfig(**config)}
    if "Forking" in base.__name__:
        namespace["max_children"] = 64
    namespace.update(attrs or {})
    cls = type("Filtered" + base.__name__, (base,), namespace)
    return cls(str(tmp_path / "s.sock") if unix else ("127.0.0.1", 0), handler)


def connect(server):
    c = socket.socket(server.address_family, socket.SOCK_STREAM)
    c.settimeout(LIMIT)
    c.connect(server.server_address)
    return c


@contextlib.contextmanager
def silent(server, n):
    """n clients that connect and say nothing, waiting in the filter."""
    clients = []
    try:
        for _ in range(n):
            clients.append(connect(server))
        yield clients
    finally:
        for c in clients:
            c.close()


def ask(server, *chunks, ctx=None):
    """Send chunks (each its own write) and read the reply to EOF."""
    c = connect(server)
    try:
        if ctx is not None:
            c = ctx.wrap_socket(c, server_hostname="localhost")
        for chunk in chunks:
            c.sendall(chunk)
        out = []
        while True:
            data = c.recv(4096)
            if not data:
                break
            out.append(data)
        data = b"".join(out)
        return json.loads(data) if data else None
    finally:
        c.close()


def waiting(server, n):
    wait_for(lambda: server.counters().get("waiting", 0) >= n)


def dropped(server, reason, n):
    wait_for(lambda: server.counters().get("dropped", {}).get(reason, 0) >= n)
    return server.counters()["dropped"][reason]


def closed_by_server(c):
    """True once the server closed c (EOF or a reset), within LIMIT."""
    try:
        return c.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return make_cert(tmp_path_factory.mktemp("tls"))


SYNC = [fastlisten.TCPServer, fastlisten.UnixStreamServer]


# -- the synchronous servers ---------------------------------------------------

@pytest.mark.parametrize("base", SYNC)
@pytest.mark.parametrize("rule, data", [
    ("data", b"x\n"), ("line", b"a line\n"), ("http", b"GET / HTTP/1.0\r\nHost: h\r\n\r\n")])
def test_a_silent_client_no_longer_blocks_the_synchronous_loop(base, rule, data, tmp_path):
    server = make(base, tmp_path, ready_rule=rule)
    with serving(server, 0.05):
        with silent(server, 5):
            waiting(server, 5)
            # the head split over writes: handed over whole
            got = ask(server, data[:1], data[1:])
            assert got["line"] == data.split(b"\n")[0].decode() + "\n"
            assert server._fl_loop == "batches"
            assert server.counters()["waiting"] == 5
        assert dropped(server, "closed", 5) == 5
        assert server.counters()["made_ready"] >= 1


# -- ThreadingMixIn: leader/follower and the pool ---------------------------------

class Counting(fastlisten.ThreadingTCPServer):
    """verify_request overridden: the pool path (Loop.BATCHES), and it
    records whom it saw."""

    fl_max_threads = 2

    def verify_request(self, request, client_address):
        self.seen.append(client_address)
        return True


@pytest.mark.parametrize("path", ["leader", "pool"])
def test_a_bounded_threaded_server_serves_beside_many_silent_clients(path, tmp_path):
    if path == "leader":
        server = make(fastlisten.ThreadingTCPServer, tmp_path, attrs={"fl_max_threads": 2},
                      ready_rule="line")
    else:
        server = make(Counting, tmp_path, ready_rule="line")
        server.seen = []
    with serving(server, 0.05):
        with silent(server, 20):
            waiting(server, 20)
            for i in range(3):
                assert ask(server, b"normal %d\n" % i)["line"] == "normal %d\n" % i
            assert server._fl_loop == ("leader" if path == "leader" else "batches")
            assert server.counters()["handlers_peak"] <= 2
        dropped(server, "closed", 20)
    if path == "pool":
        assert len(server.seen) == 3        # only ready connections were verified


@pytest.mark.forks_beside_test_threads
def test_forking_server_forks_only_for_ready_connections(tmp_path):
    forks = []

    class Counted(fastlisten.ForkingTCPServer):
        def process_request(self, request, client_address):
            forks.append(client_address)
            super().process_request(request, client_address)

    server = make(Counted, tmp_path, ready_rule="line")
    with serving(server, 0.05):
        with silent(server, 10):
            waiting(server, 10)
            assert ask(server, b"forked\n")["line"] == "forked\n"
        dropped(server, "closed", 10)
    assert len(forks) == 1      # one child, for the ready connection


# -- defaults: the PROXY header and the TLS ClientHello --------------------------

@pytest.mark.parametrize("path", ["leader", "pool"])
def test_with_proxy_protocol_a_silent_client_holds_no_thread(path, tmp_path):
    base = fastlisten.ThreadingTCPServer if path == "leader" else Counting
    server = make(base, tmp_path, attrs={"fl_max_threads": 1}, proxy_protocol="v1",
                  proxy_timeout=60)
    server.seen = []
    with serving(server, 0.05):
        with silent(server, 3):
            waiting(server, 3)
            got = ask(server, b"PROXY TCP4 192.0.2.7 127.0.0.1 4444 80\r\n", b"hi\n")
            assert got == {"line": "hi\n", "client": ["192.0.2.7", 4444]}
            assert server.counters()["proxy_accepted"] == 1
    if path == "pool":
        # verify_request ran once the header was read: it saw the real client
        assert server.seen == [("192.0.2.7", 4444)]


def test_the_synchronous_server_reads_the_header_before_verify_request(tmp_path):
    seen = []

    class Verifying(fastlisten.TCPServer):
        def verify_request(self, request, client_address):
            seen.append(client_address)
            return client_address[0] != "192.0.2.66"       # refuses this client

    server = make(Verifying, tmp_path, proxy_protocol="v1+v2")
    with serving(server, 0.05):
        assert ask(server, v2(body=inet4()) + b"ok\n")["client"] == ["192.0.2.1", 56324]
        assert ask(server, b"PROXY TCP4 192.0.2.66 127.0.0.1 1 2\r\nno\n") is None
    assert seen == [("192.0.2.1", 56324), ("192.0.2.66", 1)]


def test_an_untrusted_peer_is_still_dropped_with_the_header_complete(tmp_path):
    server = make(fastlisten.ThreadingTCPServer, tmp_path, proxy_protocol="v1",
                  trusted_proxies="10.0.0.0/8")
    with serving(server, 0.05):
        assert ask(server, b"PROXY TCP4 192.0.2.7 127.0.0.1 4444 80\r\nhi\n") is None
        wait_for(lambda: server.counters()["proxy_untrusted"] == 1)
        assert server.counters()["proxy_accepted"] == 0


def test_with_tls_a_silent_client_waits_in_the_filter(tmp_path, cert):
    server = make(fastlisten.ThreadingTCPServer, tmp_path, attrs={"fl_max_threads": 1},
                  ssl_context=server_context(*cert), handshake_timeout=60)
    with serving(server, 0.05):
        with silent(server, 3):
            waiting(server, 3)
            got = ask(server, b"secret\n", ctx=client_context(cert[0]))
            assert got["line"] == "secret\n"
            assert server.counters()["tls_handshakes"] == 1
            # half a ClientHello: still waiting, no thread holds it
            hello = tls_client_hello(client_context(cert[0]))
            with contextlib.closing(connect(server)) as half:
                half.sendall(hello[:len(hello) // 2])
                waiting(server, 4)
                assert ask(server, b"again\n", ctx=client_context(cert[0]))["line"] == "again\n"


@pytest.mark.parametrize("rule", ["line", "http"])
def test_a_rule_that_cannot_see_through_tls_is_refused(rule, cert):
    with pytest.raises(ValueError, match=f"ready_rule='{rule}' with ssl_context"):
        ListenConfig(ready_rule=rule, ssl_context=server_context(*cert))


def test_default_deadlines_follow_proxy_timeout_and_handshake_timeout(cert):
    from fastlisten import proxy as pp
    only_proxy = ListenConfig(proxy_protocol="v1", proxy_timeout=2).server_ready()
    assert (only_proxy.rule, only_proxy.timeout, only_proxy.proxy) == ("none", 2, pp.V1)
    only_tls = ListenConfig(ssl_context=server_context(*cert),
                            handshake_timeout=7).server_ready()
    assert (only_tls.rule, only_tls.timeout, only_tls.proxy) == ("tls", 7, 0)
    both = ListenConfig(proxy_protocol="v2", proxy_timeout=2, ssl_context=server_context(*cert),
                        handshake_timeout=7).server_ready()
    assert (both.rule, both.timeout, both.proxy) == ("tls", 7, pp.V2)
    explicit = ListenConfig(proxy_protocol="v2", ready_rule="data", ready_timeout=4)
    assert explicit.server_ready() == explicit.ready()
    assert explicit.server_ready().timeout == 4
    assert ListenConfig().server_ready() is None


# -- shutdown, serve_queued -----------------------------------------------------

@pytest.mark.parametrize("base", [fastlisten.TCPServer, fastlisten.ThreadingTCPServer])
def test_shutdown_closes_the_connections_still_waiting(base, tmp_path):
    server = make(base, tmp_path, ready_rule="line", ready_timeout=60)
    try:
        with serving(server, 0.05, close=False):
            with silent(server, 3) as clients:
                waiting(server, 3)
                t = threading.Thread(target=server.shutdown)
                t.start()
                t.join(LIMIT)
                assert not t.is_alive()
                # closed at once, not at their 60 s deadline
                assert all(closed_by_server(c) for c in clients)
                assert server.counters()["dropped"] == {"shutdown": 3}
                assert server.counters()["waiting"] == 0
    finally:
        server.server_close()


def test_serve_queued_serves_the_ready_and_closes_the_waiting(tmp_path):
    server = make(fastlisten.ThreadingTCPServer, tmp_path, ready_rule="line", ready_timeout=60)
    clients = []
    try:
        with serving(server, 0.05, close=False):
            assert ask(server, b"first\n")["line"] == "first\n"
        # the loop stopped: these wait in the kernel's queue
        clients = [connect(server) for _ in range(3)]
        *quiet, ready = clients
        ready.sendall(b"queued\n")
        assert server.serve_queued() == 1
        assert closed_by_server(quiet[0]) and closed_by_server(quiet[1])
        assert json.loads(ready.recv(4096))["line"] == "queued\n"
        assert server.drain(LIMIT) == 0
        assert server.counters()["dropped"] == {"shutdown": 2}
    finally:
        for c in clients:
            c.close()
        server.server_close()


def _stop_gracefully(server, grace, client):
    """A client connects to ``server`` (serving in a thread) and waits in
    its accept filter; then running.stop_serving (the graceful stop of
    ``fastlisten serve``) runs in this (the main) thread, while
    ``client(c, loop)`` runs in another (``c``: the client's socket;
    ``loop``: the serving thread, ended once the stop has begun).  Returns
    (handlers ended, the client's result, the server's counters once
    stopped)."""
    from helpers import serve_in_thread

    from fastlisten.running import Signals, stop_serving

    loop = serve_in_thread(server, 0.05)
    result = []
    c = None
    try:
        c = connect(server)
        waiting(server, 1)
        helper = threading.Thread(target=lambda: result.append(client(c, loop)), daemon=True)
        with Signals() as signals:
            helper.start()
            ended = stop_serving(server, signals, grace)
        helper.join(LIMIT)
        assert not helper.is_alive()
        loop.join(LIMIT)
        assert not loop.is_alive()
        counters = server.counters()
    finally:
        if c is not None:
            c.close()
        server.server_close()
    assert result, "the client raised"
    return ended, result[0], counters


@pytest.mark.parametrize("base", [fastlisten.TCPServer, fastlisten.ThreadingTCPServer])
def test_a_graceful_stop_serves_a_client_that_speaks_after_it_began(base, tmp_path):
    # the client connects before the stop and sends its request only once
    # the serving loop has returned: the filter keeps it for serve_queued(),
    # which serves it within the grace (shutdown() alone would close it)
    server = make(base, tmp_path, ready_rule="line", ready_timeout=60)

    def client(c, loop):
        loop.join(LIMIT)
        assert not loop.is_alive()
        c.sendall(b"late\n")
        return json.loads(c.recv(4096))

    ended, reply, counters = _stop_gracefully(server, LIMIT, client)
    assert reply["line"] == "late\n"
    assert ended == 0
    assert counters["dropped"] == {}
    assert counters["made_ready"] == 1 and counters["waiting"] == 0


@pytest.mark.parametrize("base", [fastlisten.TCPServer, fastlisten.ThreadingTCPServer])
def test_a_graceful_stop_closes_a_silent_client_at_its_grace(base, tmp_path):
    server = make(base, tmp_path, ready_rule="line", ready_timeout=60)

    def client(c, loop):
        return closed_by_server(c)      # at the grace, not at its 60 s deadline

    ended, closed, counters = _stop_gracefully(server, 0.2, client)
    assert closed and ended == 0
    assert counters["dropped"] == {"shutdown": 1} and counters["waiting"] == 0


def test_a_stop_that_leaves_the_socket_to_a_successor_waits_only_for_its_own(caplog, tmp_path):
    # A worker retiring from a socket its successor shares (a reload):
    # serve_queued(door=False, timeout) serves the client waiting in its
    # filter once its request comes, and takes no new connection
    # meanwhile: that one is the successor's, left in the kernel's queue.
    from helpers import serve_in_thread

    from fastlisten._queued import serve_queued

    server = make(fastlisten.ThreadingTCPServer, tmp_path, ready_rule="line", ready_timeout=60)
    loop = serve_in_thread(server, 0.05)
    clients = []
    try:
        clients.append(connect(server))
        waiting(server, 1)
        server._fl_stop_gracefully()
        server.shutdown()
        loop.join(LIMIT)
        taken = []
        with caplog.at_level("INFO", logger="fastlisten"):
            stop = threading.Thread(target=lambda: taken.append(
                serve_queued(server, door=False, timeout=LIMIT)))
            stop.start()
            wait_for(lambda: "waiting in the accept filter" in caplog.text)
            clients.append(connect(server))
            clients[1].sendall(b"new\n")               # ready, but new
            wait_for(lambda: server._fl_listener.queue()[0] == 1)
            clients[0].sendall(b"late\n")
            stop.join(LIMIT)
        assert not stop.is_alive() and taken == [1]
        assert json.loads(clients[0].recv(4096))["line"] == "late\n"
        assert server._fl_listener.queue()[0] == 1     # left to the successor
        server.drain(LIMIT)
    finally:
        for c in clients:
            c.close()
        server.server_close()


# -- loops that cannot filter ------------------------------------------------------

def test_an_explicit_rule_on_a_loop_that_cannot_filter_is_an_error(tmp_path):
    class OwnAccept(fastlisten.ThreadingTCPServer):
        def get_request(self):
            return super().get_request()

    server = make(OwnAccept, tmp_path, ready_rule="line")
    raised = []

    def serve():
        try:
            server.serve_forever(0.05)
        except ValueError as exc:
            raised.append(exc)
    t = threading.Thread(target=serve)
    t.start()
    try:
        t.join(LIMIT)
    finally:
        if t.is_alive():        # it serves, unfiltered: stop it, then fail
            server.shutdown()
            t.join(LIMIT)
        server.server_close()
    assert len(raised) == 1
    assert re.search("ready_rule='line' cannot be applied: .*get_request", str(raised[0]))
    # without a ready_rule, the PROXY header is read in the handler's thread, as before
    server = make(OwnAccept, tmp_path, proxy_protocol="v1")
    with serving(server, 0.05):
        assert ask(server, b"PROXY TCP4 192.0.2.7 127.0.0.1 4444 80\r\nhi\n")["client"] == [
            "192.0.2.7", 4444]
        assert server._fl_loop == "selector"

    class OwnLoopBase(socketserver.TCPServer):
        def serve_forever(self, poll_interval=0.5):
            pass

    class OwnLoop(fastlisten.ThreadingMixIn, OwnLoopBase):
        """Loop.BASE: the base class's serve_forever() and shutdown()."""

    with pytest.raises(ValueError, match="its own serve_forever"):
        make(OwnLoop, tmp_path, ready_rule="data")


# -- fastlisten.Workers ---------------------------------------------------------

WORKERS = """
import sys
import fastlisten
from fastlisten import ListenConfig

class Echo(fastlisten.StreamRequestHandler):
    def handle(self):
        self.wfile.write(self.rfile.readline())

w = fastlisten.Workers(fastlisten.TCPServer, ("127.0.0.1", 0), Echo, workers=1,
                       listen_config=ListenConfig(ready_rule="line"))
w.bind()
print(w.address[1], flush=True)
sys.exit(w.run())
"""


def test_workers_apply_the_ready_rule_in_each_worker(tmp_path):
    """One synchronous worker: a silent client connected first would block
    it for good without the filter."""
    script = tmp_path / "w.py"
    script.write_text(textwrap.dedent(WORKERS))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        with contextlib.ExitStack() as stack:
            for _ in range(3):
                stack.enter_context(socket.create_connection(("127.0.0.1", port), LIMIT))
            with socket.create_connection(("127.0.0.1", port), LIMIT) as c:
                c.sendall(b"through\n")
                assert c.recv(100) == b"through\n"
    finally:
        proc.terminate()
        try:
            proc.wait(LIMIT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
    assert proc.returncode == 0
