"""``fastlisten serve``'s accept filter: the rule it picks for each kind of
handler when --ready-rule is not given, the flags (--ready-rule,
--ready-timeout, --ready-max-bytes, --max-waiting) reaching the server,
and the startup log line that says the rule in effect.  End to end, in
subprocesses, with a pool of one thread: a client that has not said enough
must not hold it."""

import http.server
import signal
import socket
import socketserver
import struct
import textwrap
import time

import pytest
from test_cli_info_serve import DAYTIME, Served, run
from test_socketserver_diff import LIMIT
from tlsutil import client_context, make_cert

from fastlisten.services import DaytimeHandler, DiscardHandler, EchoHandler, default_ready_rule

HANDLERS = textwrap.dedent("""
    import http.server
    import socketserver

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"hello"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    class Greeter(socketserver.StreamRequestHandler):
        # The server speaks first, as SMTP does.
        def handle(self):
            self.wfile.write(b"220 hello\\r\\n")
            self.rfile.readline()
""")


class Mine(socketserver.BaseRequestHandler):
    pass


class MyHTTP(http.server.SimpleHTTPRequestHandler):
    pass


@pytest.mark.parametrize("handler, tls, rule", [
    (DaytimeHandler, False, "none"),
    (type("Daytimes", (DaytimeHandler,), {}), False, "none"),
    (EchoHandler, False, "data"),
    (DiscardHandler, False, "data"),
    (Mine, False, "data"),
    (http.server.BaseHTTPRequestHandler, False, "http"),
    (MyHTTP, False, "http"),
    (lambda *a: None, False, "data"),       # any callable
    (EchoHandler, True, "tls"),
    (DaytimeHandler, True, "tls"),
    (MyHTTP, True, "tls"),
])
def test_the_default_rule_follows_the_handler(handler, tls, rule):
    assert default_ready_rule(handler, tls)[0] == rule


def test_help_says_the_defaults():
    out = run("serve", "--help")
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for words in ("--ready-rule {none,data,line,http,tls}", "Default: 'tls' with --tls-cert",
                  "'none' for daytime", "'http' for an http.server.BaseHTTPRequestHandler",
                  "'data' for echo, discard and any other handler", "--ready-timeout SECONDS",
                  "(default 10", "--ready-max-bytes BYTES", "--max-waiting N"):
        assert words in text, words


def connect(address):
    c = socket.create_connection(address, timeout=LIMIT)
    return c


def read_all(c):
    """Everything until the server closes (bounded by LIMIT per read)."""
    out = b""
    while True:
        try:
            chunk = c.recv(4096)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def stop(server):
    rc, err = server.stop()
    assert rc == 0, err
    assert "Traceback" not in err, err
    return err


def test_echo_waits_for_data_so_a_silent_client_holds_no_thread():
    server = Served("echo", "--threads", "1")
    try:
        with connect(server.address) as silent, connect(server.address) as c:
            c.sendall(b"ping")
            assert c.recv(4) == b"ping"     # the only thread was free for it
            c.shutdown(socket.SHUT_WR)
            assert read_all(c) == b""
            silent.sendall(b"late")         # a silent client is served once it speaks
            assert silent.recv(4) == b"late"
    finally:
        err = stop(server)
    assert "ready rule 'data' (--ready-rule none if the server speaks first)" in err


def test_an_http_handler_waits_for_the_whole_request_head(tmp_path):
    (tmp_path / "handlers.py").write_text(HANDLERS)
    server = Served("handlers:Hello", "--threads", "1", cwd=tmp_path)
    try:
        with connect(server.address) as slow, connect(server.address) as c:
            slow.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n")     # not the end of the head yet
            c.sendall(b"GET / HTTP/1.0\r\n\r\n")
            reply = read_all(c)
            assert reply.startswith(b"HTTP/1.0 200 ") and reply.endswith(b"hello")
            slow.sendall(b"\r\n")
            assert read_all(slow).endswith(b"hello")
    finally:
        err = stop(server)
    assert "ready rule 'http' (an HTTP handler)" in err


def test_daytime_answers_a_silent_client_at_once():
    server = Served("daytime", "--threads", "1")
    try:
        with connect(server.address) as c:
            assert DAYTIME.match(read_all(c))
    finally:
        err = stop(server)
    assert "ready rule 'none' (the server speaks first)" in err


def test_a_server_first_handler_needs_ready_rule_none(tmp_path):
    (tmp_path / "handlers.py").write_text(HANDLERS)
    # the default ('data'): the client waits for a greeting that never
    # comes, and is closed unread after --ready-timeout
    server = Served("handlers:Greeter", "--ready-timeout", "0.2", cwd=tmp_path)
    try:
        with connect(server.address) as c:
            assert read_all(c) == b""
    finally:
        err = stop(server)
    assert "at most 0.2 s from accept" in err
    server = Served("handlers:Greeter", "--ready-rule", "none", cwd=tmp_path)
    try:
        with connect(server.address) as c:
            assert c.recv(100) == b"220 hello\r\n"
    finally:
        err = stop(server)
    assert "ready rule 'none' (--ready-rule)" in err


def test_max_waiting_closes_the_oldest_waiting_connection():
    server = Served("echo", "--max-waiting", "1")
    try:
        with connect(server.address) as first:
            # (wait until the server holds the first one: it says so when it
            # echoes a byte of a third connection, accepted after it)
            with connect(server.address) as probe:
                probe.sendall(b"x")
                assert probe.recv(1) == b"x"
            with connect(server.address) as second:
                assert read_all(first) == b""       # evicted: closed unread
                second.sendall(b"y")
                assert second.recv(1) == b"y"
    finally:
        stop(server)


def test_ready_max_bytes_closes_a_line_that_is_too_long():
    server = Served("echo", "--ready-rule", "line", "--ready-max-bytes", "8")
    try:
        with connect(server.address) as c:
            c.sendall(b"a" * 20)
            assert read_all(c) == b""
        with connect(server.address) as c:
            c.sendall(b"short\n")
            assert c.recv(6) == b"short\n"
    finally:
        err = stop(server)
    assert "for a whole line, at most 10 s from accept" in err


def test_ready_min_rate_closes_a_client_that_dribbles_below_it():
    server = Served("echo", "--ready-rule", "line", "--ready-min-rate", "100",
                    "--ready-timeout", "5")
    try:
        with connect(server.address) as c:
            c.sendall(b"a")
            time.sleep(1.1)     # (the rate is judged once a connection has waited 1 s)
            c.sendall(b"b")     # 2 bytes in over a second: below 100 a second
            assert read_all(c) == b""
        with connect(server.address) as c:
            c.sendall(b"quick\n")
            assert c.recv(6) == b"quick\n"
    finally:
        err = stop(server)
    assert "(slow: sent its head more slowly" in err and "(expired:" not in err, err


@pytest.mark.parametrize("args, text", [
    (["--ready-rule", "lines"], "invalid choice: 'lines'"),
    (["--ready-min-rate", "-1"], "ready_min_rate"),
    (["--ready-timeout", "0"], "ready_timeout"),
    (["--ready-max-bytes", "0"], "ready_max_bytes"),
    (["--max-waiting", "0"], "max_waiting"),
])
def test_bad_ready_flags_are_explained(args, text):
    out = run("serve", "echo", *args)
    assert out.returncode == 2
    assert text in out.stderr
    assert "Traceback" not in out.stderr


def test_each_worker_applies_the_default_rule():
    server = Served("echo", "--workers", "1", "--threads", "1")
    try:
        with connect(server.address) as silent, connect(server.address) as c:
            c.sendall(b"ping")
            assert c.recv(4) == b"ping"     # the worker's only thread was free for it
            c.shutdown(socket.SHUT_WR)
            assert read_all(c) == b""
            silent.sendall(b"late")
            assert silent.recv(4) == b"late"
    finally:
        rc, err = server.stop(signal.SIGTERM)
    assert rc == 0, err
    assert "ready rule 'data' (--ready-rule none if the server speaks first)" in err


@pytest.mark.parametrize("handler", ["echo", "discard"])
def test_a_client_that_resets_is_no_handler_failure(handler):
    server = Served(handler, "--threads", "1")
    try:
        c = connect(server.address)
        try:
            c.sendall(b"x" * 100000)        # more than echo's replies the client reads
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            c.close()                       # a reset
        with connect(server.address) as c:  # the thread is free again
            c.sendall(b"ping")
            c.shutdown(socket.SHUT_WR)
            assert read_all(c) == (b"ping" if handler == "echo" else b"")
    finally:
        err = stop(server)                  # (no traceback)
    assert "ConnectionResetError" not in err


@pytest.mark.parametrize("rule", ["line", "http"])
def test_a_rule_that_cannot_see_through_tls_is_explained(tmp_path, rule):
    cert, key = make_cert(tmp_path)
    out = run("serve", "echo", "--ready-rule", rule, "--tls-cert", cert, "--tls-key", key)
    assert out.returncode == 2
    assert f"ready rule '{rule}' cannot be seen through TLS" in out.stderr
    assert "Traceback" not in out.stderr


def test_tls_defaults_to_the_whole_client_hello(tmp_path):
    cert, key = make_cert(tmp_path)
    server = Served("echo", "--threads", "1", "--tls-cert", cert, "--tls-key", key)
    try:
        with connect(server.address) as silent:
            raw = connect(server.address)
            with client_context(cert).wrap_socket(raw, server_hostname="localhost") as c:
                c.sendall(b"ping")          # the only thread was free for its handshake
                assert c.recv(4) == b"ping"
            assert silent.fileno() >= 0
    finally:
        err = stop(server)
    assert "ready rule 'tls' (TLS clients speak first)" in err
    assert "a whole TLS ClientHello" in err
