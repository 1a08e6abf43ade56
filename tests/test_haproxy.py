"""fastlisten behind a real HAProxy (the Debian package): TCP mode with
send-proxy (v1) and send-proxy-v2 (with CRC32C and UNIQUE_ID TLVs) in front
of two fastlisten instances with health checks on, and terminating TLS
with send-proxy-v2-ssl (the SSL and AUTHORITY TLVs).  Clients connect from
different loopback addresses and each handler sees its own client's
address and port; one instance is drained through HAProxy's runtime API and
stopped gracefully without losing a connection.

Skipped where haproxy is not installed, unless FASTLISTEN_REQUIRE_HAPROXY=1
(.ci/run sets it): then a missing haproxy fails.
"""

import json
import os
import socket
import threading

import pytest
from test_socketserver_diff import LIMIT, wait_for
from tlsutil import client_context, make_cert

import fastlisten
from fastlisten import ListenConfig
from fastlisten.benchmark.balancer import HAProxy, find_haproxy, free_port

HAPROXY = find_haproxy()

if HAPROXY is None:
    if os.environ.get("FASTLISTEN_REQUIRE_HAPROXY") == "1":
        raise RuntimeError("FASTLISTEN_REQUIRE_HAPROXY=1 but haproxy is not installed "
                           "(apt-get install haproxy)")
    pytest.skip("haproxy is not installed (apt-get install haproxy); "
                "FASTLISTEN_REQUIRE_HAPROXY=1 makes this a failure", allow_module_level=True)


class Report(fastlisten.StreamRequestHandler):
    """Waits for a line, then reports who the server says the client is."""

    def handle(self):
        try:
            line = self.rfile.readline()
        except ConnectionResetError:
            line = b""
        if not line:
            return          # a health check: HAProxy closes or resets it
        header = self.server.proxy_header
        self.wfile.write(json.dumps({
            "server": self.server.name,
            "client": list(self.client_address),
            "version": header.version if header else None,
            "unique_id": header.unique_id.decode() if header and header.unique_id else None,
            "line": line.decode(),
        }).encode() + b"\n")


class Instance(fastlisten.ThreadingTCPServer):
    daemon_threads = True
    listen_config = ListenConfig(proxy_protocol="v1+v2")


def ask(port, source, line=b"hello\n"):
    """One conversation through haproxy from the given source address:
    (reply, (source ip, source port))."""
    with socket.socket() as c:
        c.settimeout(LIMIT)
        c.bind((source, 0))
        c.connect(("127.0.0.1", port))
        me = c.getsockname()
        c.sendall(line)
        data = b""
        while not data.endswith(b"\n"):
            chunk = c.recv(4096)
            assert chunk, f"connection from {me} closed without a reply"
            data += chunk
        return json.loads(data), list(me)


def start(name):
    server = Instance(("127.0.0.1", 0), Report)
    server.name = name
    t = threading.Thread(target=server.serve_forever, args=(0.05,))
    t.start()
    return server, t


def stop(server, thread):
    server.shutdown()
    thread.join(LIMIT)
    server.server_close()


@pytest.fixture(params=["send-proxy", "send-proxy-v2 proxy-v2-options crc32c,unique-id"],
                ids=["v1", "v2"])
def balanced(request, tmp_path):
    """Two instances behind haproxy, both UP."""
    servers = {name: start(name) for name in ("s1", "s2")}
    haproxy = HAProxy(HAPROXY, str(tmp_path),
                      {free_port(): [(n, s.server_address[1]) for n, (s, _) in servers.items()]},
                      f"{request.param} check inter 100ms rise 1 fall 2")
    try:
        haproxy.wait_up(LIMIT)
        yield haproxy, servers, request.param
    finally:
        haproxy.close()
        for server, thread in servers.values():
            if thread.is_alive():
                stop(server, thread)


def test_each_handler_sees_its_own_client(balanced):
    haproxy, servers, send = balanced
    seen = set()
    for i in range(2, 22):
        source = f"127.0.0.{i}"
        got, me = ask(haproxy.port, source)
        assert got["client"] == me        # address and port of this very client
        assert got["version"] == (2 if "v2" in send else 1)
        if "unique-id" in send:
            assert got["unique_id"] == f"{me[0]}:{me[1]}"
        seen.add(got["server"])
    assert seen == {"s1", "s2"}           # round robin reached both
    for server, _ in servers.values():
        c = server.counters()
        assert c["proxy_rejected"] == 0
        assert c["proxy_accepted"] >= 10
        if "v2" in send:
            # the health checks: a LOCAL header, then a close (HAProxy
            # resets); dropped by the accept filter, never handed to a handler
            assert c["dropped"].get("closed", 0) + c["dropped"].get("reset", 0) >= 1
            assert c["proxy_local"] == 0


def test_drain_then_graceful_stop_loses_nothing(balanced):
    haproxy, servers, _ = balanced
    # conversations in progress on both instances
    open_ = []
    for i in range(4):
        c = socket.socket()
        c.settimeout(LIMIT)
        c.bind((f"127.0.1.{i + 1}", 0))
        c.connect(("127.0.0.1", haproxy.port))
        open_.append(c)
    wait_for(lambda: sum(s.counters()["handlers_running"] for s, _ in servers.values()) >= 4)
    on_s1 = servers["s1"][0].counters()["handlers_running"]
    assert on_s1 >= 1

    assert haproxy.command("set server be0/s1 state drain").strip() == ""
    wait_for(lambda: haproxy.status()[("be0", "s1")] == "DRAIN")

    # new clients keep coming while s1 drains and stops: all go to s2
    results, errors = [], []
    stop_clients = threading.Event()

    def clients():
        i = 0
        while not stop_clients.is_set():
            i += 1
            try:
                results.append(ask(haproxy.port, f"127.0.2.{i % 250 + 1}")[0]["server"])
            except Exception as exc:  # noqa: BLE001 - every failure is a lost client
                errors.append(exc)

    t = threading.Thread(target=clients)
    t.start()
    try:
        wait_for(lambda: len(results) >= 20)
        s1, s1_thread = servers["s1"]
        s1.shutdown()                   # stop accepting; its handlers go on
        # the conversations already on s1 finish normally
        for c in open_:
            c.sendall(b"finish\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = c.recv(4096)
                assert chunk, "an open conversation was lost"
                data += chunk
            assert json.loads(data)["line"] == "finish\n"
        assert s1.drain(LIMIT) == 0     # nothing had to be cut short
        s1_thread.join(LIMIT)
        s1.server_close()
        count = len(results)
        wait_for(lambda: len(results) >= count + 20)
    finally:
        stop_clients.set()
        t.join(LIMIT)
        for c in open_:
            c.close()
    assert errors == []
    assert results and set(results) == {"s2"}


def test_haproxy_terminating_tls_sends_the_ssl_and_authority_tlvs(tmp_path):
    """HAProxy terminates TLS and says so in the v2 header (send-proxy-v2-ssl,
    proxy-v2-options authority): the handler reads the TLS version and the
    name the client asked for."""
    cert, key = make_cert(tmp_path)
    pem = tmp_path / "site.pem"
    with open(cert, "rb") as c, open(key, "rb") as k:
        pem.write_bytes(c.read() + k.read())

    seen = []

    class Tell(fastlisten.StreamRequestHandler):
        def handle(self):
            try:
                line = self.rfile.readline()
            except ConnectionResetError:
                return
            header = self.server.proxy_header
            if line and header is not None:
                seen.append((list(self.client_address), header.ssl, header.authority))
                self.wfile.write(b"ok\n")

    class Server(Instance):
        pass

    server = Server(("127.0.0.1", 0), Tell)
    t = threading.Thread(target=server.serve_forever, args=(0.05,))
    t.start()
    haproxy = HAProxy(HAPROXY, str(tmp_path), {free_port(): [("s1", server.server_address[1])]},
                      "send-proxy-v2-ssl proxy-v2-options authority,crc32c check inter 100ms",
                      bind_options=f"ssl crt {pem}")
    try:
        haproxy.wait_up(LIMIT)
        raw = socket.socket()
        raw.settimeout(LIMIT)
        raw.bind(("127.0.0.7", 0))
        raw.connect(("127.0.0.1", haproxy.port))
        me = list(raw.getsockname())
        c = client_context(cert).wrap_socket(raw, server_hostname="localhost")
        try:
            c.sendall(b"hello\n")
            assert c.recv(10) == b"ok\n"
            version = c.version()
        finally:
            c.close()
    finally:
        haproxy.close()
        server.shutdown()
        t.join(LIMIT)
        server.server_close()
    (client, ssl_info, authority), = seen
    assert client == me
    assert authority == "localhost"
    assert ssl_info["client"] & 0x01            # PP2_CLIENT_SSL
    assert ssl_info["version"] == version       # e.g. TLSv1.3
