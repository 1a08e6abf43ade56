"""The handler deadline (``ListenConfig(handler_timeout=...)``, issue 19): a
connection whose handler has run that long is shut down, so a handler
blocked on a client that dribbles its request reads end of file and
returns; counted in ``counters()['handler_timeouts']``.

Real loopback sockets, every path that runs a handler (the synchronous
loop, leader/follower inline and through process_request_thread, the pool,
the stdlib's selector loop, forked children, TLS, fastlisten.Workers),
bounded waits on events, no timing asserts: a deadline of 0.2 s only
decides how soon the tests end.
"""

import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from helpers import serve_in_thread, shutdown_within, wait_for

import fastlisten
from fastlisten import _deadline
from fastlisten._deadline import THREAD_NAME, Watchdog

SHORT = 0.2         # seconds: the deadline of a handler that never finishes
#: The deadline where a handler must finish in time: long beside the few
#: milliseconds it takes, short enough for a test that waits past it.
IN_TIME = 1.0
LIMIT = 20.0        # seconds any wait of these tests may take at most


class Reader(fastlisten.StreamRequestHandler):
    """``quick\\n``: answers ``done`` at once.  Anything else: reads until
    end of file, which a dribbling client never sends (only the deadline
    ends the read), then records what it read (or the error that ended the
    read: a byte the client sent after the shutdown makes the kernel reset
    the connection, ECONNRESET)."""

    def handle(self):
        try:
            line = self.rfile.readline()
            if line == b"quick\n":
                self.wfile.write(b"done\n")
                return
            got = line + self.rfile.read()
        except OSError as exc:
            # ECONNRESET, or whatever else ended the read: over TLS, CPython
            # 3.15's ssl raises where 3.11's returned what it had (readline)
            got = exc
        returned = getattr(self.server, "returned", None)
        if returned is not None:
            returned.append(got)


def _dribble(address, family=socket.AF_INET):
    """Connect and send a byte every few hundredths of a second (never a
    newline) until the server shuts the connection down; returns what the
    client read at the end (b'' for an orderly end of file).  Fails after
    LIMIT seconds."""
    c = socket.socket(family, socket.SOCK_STREAM)
    try:
        c.settimeout(LIMIT)
        c.connect(address)
        c.settimeout(0.05)
        deadline = time.monotonic() + LIMIT
        sending = True
        while time.monotonic() < deadline:
            if sending:
                try:
                    c.send(b"x")
                except OSError:     # the server shut it down: only read now
                    sending = False
            try:
                data = c.recv(100)
            except socket.timeout:
                continue
            except ConnectionResetError:
                return b""
            return data
        raise AssertionError(f"the server did not end the connection within {LIMIT} s")
    finally:
        c.close()


def _quick(address, family=socket.AF_INET):
    """A client that gets its answer at once: all the server said, to its end of file."""
    with socket.socket(family, socket.SOCK_STREAM) as c:
        c.settimeout(LIMIT)
        c.connect(address)
        c.sendall(b"quick\n")
        out = b""
        while True:
            chunk = c.recv(100)
            if not chunk:
                return out
            out += chunk


def _tls_context(tmp_path_factory):
    from tlsutil import make_cert, server_context

    cert, key = make_cert(tmp_path_factory.mktemp("tls"))
    return server_context(cert, key), cert


# -- the paths a handler runs on --------------------------------------------------

def _sync(**attrs):
    return type("Sync", (fastlisten.TCPServer,), attrs)


def _threading(**attrs):
    return type("Threaded", (fastlisten.ThreadingTCPServer,), attrs)


def _verify(self, request, client_address):
    return True


def _shutdown_request(self, request):
    fastlisten.ThreadingTCPServer.shutdown_request(self, request)


def _get_request(self):
    return self.socket.accept()


#: name -> (server class factory, what its loop runs per connection)
VARIANTS = {
    "TCPServer inline": (lambda: _sync(), "_fl_handle_inline"),
    "TCPServer hooks": (lambda: _sync(verify_request=_verify), "_fl_handle_accepted"),
    "TCPServer selector": (lambda: _sync(get_request=_get_request), None),
    "leader inline": (lambda: _threading(), "_fl_handle_inline"),
    "leader thread": (lambda: _threading(shutdown_request=_shutdown_request),
                      "process_request_thread"),
    "pool": (lambda: _threading(verify_request=_verify), "_fl_handle_accepted"),
}
if hasattr(os, "fork"):
    VARIANTS["forking"] = (lambda: type("Forking", (fastlisten.ForkingTCPServer,), {}),
                           "_fl_handle_accepted")


def _server(name, timeout, tls=None):
    make, per_connection = VARIANTS[name]
    cls = make()
    options = {"handler_timeout": timeout}
    if tls is not None:
        options["ssl_context"] = tls
    cls.listen_config = fastlisten.ListenConfig(**options)
    server = cls(("127.0.0.1", 0), Reader)
    server.returned = []
    choice = server._fl_choose_loop()
    run = choice.per_connection
    assert (run.__name__ if run is not None else None) == per_connection, choice
    return server


def _os_threads():
    with open("/proc/self/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[17])   # field 20: num_threads


def _settle_threads(request):
    """Before a test forks: wait until the threads of earlier tests, which
    Python has seen end, have left the kernel's count too (the fork check of
    forks_beside_test_threads counts the process's threads there)."""
    watchdog = 1 if float(request.config.getini("faulthandler_timeout") or 0) > 0 else 0
    wait_for(lambda: _os_threads() <= len(threading.enumerate()) + watchdog, LIMIT)


def _warnings(caplog):
    return [r for r in caplog.records if "handler deadline" in r.getMessage()]


def _forking(name):
    return name == "forking"


# (auto: only the forking variant forks, beside the test's serving thread)
@pytest.mark.forks_beside_test_threads(auto=True)
@pytest.mark.parametrize("name", VARIANTS)
def test_a_handler_blocked_on_a_dribbling_client_reads_eof_and_returns(name, caplog, request):
    if _forking(name):
        _settle_threads(request)
    server = _server(name, SHORT)
    t = serve_in_thread(server, 0.05)
    try:
        with caplog.at_level(logging.WARNING, logger="fastlisten"):
            assert _dribble(server.server_address) == b""
            if not _forking(name):
                wait_for(lambda: len(server.returned) == 1, LIMIT)
                got = server.returned[0]
                assert isinstance(got, OSError) or got.startswith(b"x"), got
            wait_for(lambda: server.counters()["handler_timeouts"] == 1, LIMIT)
            # (said by the watchdog's thread just after it counted)
            wait_for(lambda: _warnings(caplog), LIMIT)
        assert len(_warnings(caplog)) == 1, caplog.text
    finally:
        shutdown_within(server, t)
        server.server_close()
    assert server.counters()["handler_timeouts"] == 1


@pytest.mark.forks_beside_test_threads(auto=True)
@pytest.mark.parametrize("name", VARIANTS)
def test_a_handler_that_finishes_in_time_is_left_alone(name, caplog, request):
    # A quick handler, then a dribbling one with the same deadline: when
    # the second has been shut down, the first's deadline is past too, so
    # a first handler that the watchdog had not let go would be counted
    # (its connection closed by then: the shutdown must never reach it).
    if _forking(name):
        _settle_threads(request)
    server = _server(name, IN_TIME)
    t = serve_in_thread(server, 0.05)
    try:
        with caplog.at_level(logging.WARNING, logger="fastlisten"):
            for _ in range(3):
                assert _quick(server.server_address) == b"done\n"
            assert _dribble(server.server_address) == b""
            wait_for(lambda: server.counters()["handler_timeouts"] >= 1, LIMIT)
            if not _forking(name):
                wait_for(lambda: len(server.returned) == 1, LIMIT)
            assert _quick(server.server_address) == b"done\n"
            wait_for(lambda: _warnings(caplog), LIMIT)
        assert server.counters()["handler_timeouts"] == 1
        assert len(_warnings(caplog)) == 1, caplog.text
    finally:
        shutdown_within(server, t)
        server.server_close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.forks_beside_test_threads
def test_a_forking_server_without_serve_forever_counts_its_children_too(request):
    # handle_request(), no loop: the report pipe is made before the first
    # fork all the same, so the child's expiry reaches the server process.
    _settle_threads(request)
    cls = type("Forking", (fastlisten.ForkingTCPServer,),
               {"listen_config": fastlisten.ListenConfig(handler_timeout=SHORT)})
    server = cls(("127.0.0.1", 0), Reader)
    try:
        with socket.create_connection(server.server_address, timeout=LIMIT) as c:
            c.sendall(b"x")
            server.handle_request()         # forks the child that handles c
            c.settimeout(LIMIT)
            try:
                assert c.recv(100) == b""
            except ConnectionResetError:
                pass
        wait_for(lambda: server.counters()["handler_timeouts"] == 1, LIMIT)
    finally:
        server.server_close()


def test_without_the_option_nothing_is_armed_and_no_thread_starts():
    server = _sync()(("127.0.0.1", 0), Reader)
    t = serve_in_thread(server, 0.05)
    try:
        assert _quick(server.server_address) == b"done\n"
        assert server._fl_dog is None
        assert "handler_timeouts" not in server.counters()
        assert not [th for th in threading.enumerate() if th.name == THREAD_NAME]
    finally:
        shutdown_within(server, t)
        server.server_close()


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return _tls_context(tmp_path_factory)


@pytest.mark.parametrize("name", ["leader thread", "TCPServer hooks"])
def test_with_tls_the_deadline_starts_after_the_handshake(name, tls):
    import ssl

    from tlsutil import client_context

    context, cert = tls
    server = _server(name, SHORT, tls=context)
    t = serve_in_thread(server, 0.05)
    try:
        raw = socket.create_connection(server.server_address, timeout=LIMIT)
        c = client_context(cert).wrap_socket(raw, server_hostname="localhost")
        try:
            c.settimeout(0.05)
            got = None
            deadline = time.monotonic() + LIMIT
            while got is None and time.monotonic() < deadline:
                try:
                    c.send(b"x")
                except OSError:
                    pass
                try:
                    got = c.recv(100)
                except socket.timeout:
                    continue
                except (OSError, ssl.SSLError):
                    got = b""
            assert got == b"", got
        finally:
            c.close()
        wait_for(lambda: len(server.returned) == 1, LIMIT)
        # (counted by the watchdog's thread just after the shutdown the handler saw)
        wait_for(lambda: server.counters()["handler_timeouts"] == 1, LIMIT)
        assert server.counters()["tls_handshakes"] == 1
    finally:
        shutdown_within(server, t)
        server.server_close()


class Talker(fastlisten.BaseRequestHandler):
    """Reads until end of file, then answers: the answer fails (the
    connection is shut down), and handle_error() hears of it."""

    def handle(self):
        while self.request.recv(100):
            pass
        for _ in range(50):
            self.request.sendall(b"late\n" * 1000)


def test_what_the_deadline_breaks_is_not_reported_as_a_handler_failure(caplog, capfd):
    cls = _threading(listen_config=fastlisten.ListenConfig(handler_timeout=SHORT))
    server = cls(("127.0.0.1", 0), Talker)
    errors = []
    stock = server.handle_error

    def handle_error(request, client_address):
        stock(request, client_address)
        errors.append(request)          # (once it has said what it says)
    server.handle_error = handle_error
    t = serve_in_thread(server, 0.05)
    try:
        with caplog.at_level(logging.DEBUG, logger="fastlisten"):
            _dribble(server.server_address)
            wait_for(lambda: errors, LIMIT)
        assert "ended by the server" in caplog.text
        assert "Traceback" not in capfd.readouterr().err
    finally:
        shutdown_within(server, t)
        server.server_close()


def test_server_close_stops_the_watchdog_thread():
    server = _threading(listen_config=fastlisten.ListenConfig(handler_timeout=SHORT))(
        ("127.0.0.1", 0), Reader)
    t = serve_in_thread(server, 0.05)
    try:
        assert _dribble(server.server_address) == b""
        assert [th for th in threading.enumerate() if th.name == THREAD_NAME]
    finally:
        shutdown_within(server, t)
        server.server_close()
    wait_for(lambda: not [th for th in threading.enumerate() if th.name == THREAD_NAME],
             LIMIT)


def test_unix_stream_servers_have_it_too(tmp_path):
    path = str(tmp_path / "s")
    cls = type("U", (fastlisten.ThreadingUnixStreamServer,),
               {"listen_config": fastlisten.ListenConfig(handler_timeout=SHORT)})
    server = cls(path, Reader)
    server.returned = []
    t = serve_in_thread(server, 0.05)
    try:
        assert _dribble(path, socket.AF_UNIX) == b""
        wait_for(lambda: len(server.returned) == 1, LIMIT)
        wait_for(lambda: server.counters()["handler_timeouts"] == 1, LIMIT)
    finally:
        shutdown_within(server, t)
        server.server_close()


# -- the watchdog itself ------------------------------------------------------------

class _Expiries:
    def __init__(self):
        self.socks = []
        self.event = threading.Event()

    def __call__(self, sock):
        self.socks.append(sock)
        self.event.set()

    def wait(self, n):
        wait_for(lambda: len(self.socks) >= n, LIMIT)


def _closes(*pairs):
    for a, b in pairs:
        a.close()
        b.close()


def test_a_disarmed_connection_is_never_shut_down():
    seen = _Expiries()
    dog = Watchdog(0.05, seen)
    first, sentinel = socket.socketpair(), socket.socketpair()
    try:
        dog.disarm(dog.arm(first[0]))
        dog.arm(sentinel[0])        # its deadline comes after the first's
        seen.wait(1)
        assert seen.socks == [sentinel[0]]
        assert sentinel[1].recv(10) == b""      # shut down: the peer reads end of file
        first[0].sendall(b"ok")                 # still whole
        assert first[1].recv(10) == b"ok"
        assert dog.expired == 1
    finally:
        dog.close()
        _closes(first, sentinel)


def test_an_idle_watchdog_is_woken_by_the_next_arm():
    seen = _Expiries()
    dog = Watchdog(0.05, seen)
    a, b = socket.socketpair(), socket.socketpair()
    try:
        dog.arm(a[0])
        seen.wait(1)
        # idle for a whole period: the thread waits until an arm tells it
        wait_for(lambda: dog._wake_at == float("inf"), LIMIT)
        dog.arm(b[0])
        seen.wait(2)
        assert b[1].recv(10) == b""
    finally:
        dog.close()
        _closes(a, b)


def test_disarmed_entries_do_not_pile_up():
    dog = Watchdog(3600.0)
    pairs = [socket.socketpair() for _ in range(8)]
    try:
        held = [dog.arm(p[0]) for p in pairs[:4]]    # armed all along: never at the top again
        for _ in range(5000):
            dog.disarm(dog.arm(pairs[4][0]))
        for i in range(5000):
            entries = [dog.arm(p[0]) for p in pairs[5:]]
            for e in entries[::-1] if i % 2 else entries:
                dog.disarm(e)
        assert dog._live == 4
        assert len(dog._heap) <= 2 * dog._live + _deadline._SLACK + 1
        for e in held:
            dog.disarm(e)
        assert dog._live == 0 and len(dog._heap) <= _deadline._SLACK + 1
    finally:
        dog.close()
        _closes(*pairs)


def test_close_waits_for_the_armed_then_the_thread_leaves():
    seen = _Expiries()
    dog = Watchdog(SHORT, seen)
    pair = socket.socketpair()
    try:
        entry = dog.arm(pair[0])
        dog.close()      # one is armed: the thread stays for it
        seen.wait(1)
        assert pair[1].recv(10) == b""
        dog.disarm(entry)       # expired already: nothing to do
        wait_for(lambda: not [t for t in threading.enumerate() if t.name == THREAD_NAME], LIMIT)
    finally:
        _closes(pair)


def test_only_sockets_are_armed():
    dog = Watchdog(0.05)
    try:
        assert dog.arm(object()) is None
        dog.disarm(None)
        assert dog._live == 0
    finally:
        dog.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_has_a_watchdog_of_its_own(tmp_path):
    # In a process of its own (the parent's watchdog thread runs beside the
    # fork, which the test session's fork check forbids): a child forked
    # while the parent's thread waits and its lock may be held arms and
    # expires its own connection; the parent's armed connection is the
    # parent's (the child's disarm of it does nothing).
    script = textwrap.dedent("""
        import os, socket, sys, threading
        from fastlisten._deadline import Watchdog

        done = threading.Event()
        dog = Watchdog(0.05, lambda sock: done.set())
        parent_pair = socket.socketpair()
        parent_entry = dog.arm(parent_pair[0])
        done.wait(30)                       # the thread runs, and expired it
        mine = Watchdog(3600.0)
        mine_pair = socket.socketpair()
        held = mine.arm(mine_pair[0])       # a long deadline, armed before the fork
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                mine.disarm(held)            # the parent's: nothing to do here
                pair = socket.socketpair()
                mine.seconds = 0.05
                mine.arm(pair[0])
                pair[1].settimeout(30)
                code = 0 if pair[1].recv(10) == b"" else 4
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        mine.disarm(held)
        mine.close()
        dog.close()
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout == "ok\n", out.stderr


# -- the option ------------------------------------------------------------------

@pytest.mark.parametrize("value, error", [
    (0, ValueError), (-1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
    ("3", TypeError), (True, TypeError), (None, None), (0.5, None), (30, None)])
def test_the_option_is_checked(value, error):
    if error is None:
        config = fastlisten.ListenConfig(handler_timeout=value)
        assert config.handler_timeout == (None if value is None else float(value))
        assert config.socket_only().handler_timeout is None
        return
    with pytest.raises(error, match="handler_timeout"):
        fastlisten.ListenConfig(handler_timeout=value)


def test_a_listener_refuses_it():
    with pytest.raises(ValueError, match="handler_timeout: a Listener runs no handlers"):
        fastlisten.Listener.from_config(fastlisten.ListenConfig(handler_timeout=1))


def test_a_datagram_server_refuses_it():
    cls = type("U", (fastlisten.UDPServer,),
               {"listen_config": fastlisten.ListenConfig(handler_timeout=1)})
    with pytest.raises(ValueError, match="stream"):
        cls(("127.0.0.1", 0), fastlisten.BaseRequestHandler)


def test_the_flag_parses():
    import argparse

    from fastlisten.commands import options

    parser = argparse.ArgumentParser()
    options.add_arguments(parser)
    args = parser.parse_args(["--handler-timeout", "1.5"])
    assert options.from_args(args).handler_timeout == 1.5
    assert options.from_args(parser.parse_args([])).handler_timeout is None
    assert "--handler-timeout SECONDS" in parser.format_help()
    with pytest.raises(ValueError, match="handler_timeout"):
        options.from_args(parser.parse_args(["--handler-timeout", "0"]))


def _echo_client_sees_eof(address):
    """The echo handler sends back what it got and waits for more: a
    client that holds the connection open reads its bytes, then end of
    file once the deadline shut the connection down."""
    with socket.create_connection(address, timeout=LIMIT) as c:
        c.sendall(b"ab")
        got = b""
        while True:
            chunk = c.recv(100)
            if not chunk:
                return got
            got += chunk


@pytest.mark.parametrize("mode", [[], ["--processes", "2"], ["--workers", "1"]])
def test_fastlisten_serve_applies_the_flag(mode):
    from test_cli_info_serve import Served

    server = Served("echo", "--bind", "127.0.0.1:0", "--handler-timeout", "0.2", *mode)
    try:
        assert _echo_client_sees_eof(server.address) == b"ab"
    finally:
        rc, err = server.stop()
    assert rc == 0, err
    assert "handler deadline" in err
    if mode[:1] != ["--workers"]:
        # the counters line at the end (a forked child's report included:
        # the child wrote it before it exited, and the stop reaps it first)
        assert "handler_timeouts=1" in err.rpartition("stopped; counters:")[2], err
