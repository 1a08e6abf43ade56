"""``fastlisten info`` and ``fastlisten serve``, end to end in subprocesses
(``python -m fastlisten``, as a fresh install runs it)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import kernel_somaxconn

import fastlisten
from fastlisten import sysinfo
from fastlisten.services import daytime

FL = [sys.executable, "-m", "fastlisten"]
DAYTIME = re.compile(rb"^[A-Z][a-z]+day, [A-Z][a-z]+ \d{1,2}, \d{4} \d\d:\d\d:\d\d-UTC\r\n$")


def run(*args, **kwargs):
    return subprocess.run(FL + list(args), capture_output=True, text=True, timeout=30,
                          **kwargs)


class Served:
    """A ``fastlisten serve`` child: its address from the first stdout line;
    stop() sends a signal and returns (returncode, stderr)."""

    def __init__(self, *args, cwd=None):
        self.proc = subprocess.Popen(FL + ["serve"] + list(args), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=cwd)
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"serve did not start: {line!r} {err}")
        where = line[len("listening on "):].strip()
        if where.startswith("/"):
            self.address = where
        else:
            host, _, port = where.rpartition(":")
            self.address = (host.strip("[]"), int(port))

    def stop(self, sig=signal.SIGINT):
        try:
            self.proc.send_signal(sig)
            _, err = self.proc.communicate(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.communicate()
        return self.proc.returncode, err


# -- the command itself ----------------------------------------------------------

def test_version_names_the_release_and_the_core():
    out = run("--version")
    assert out.returncode == 0, out.stderr
    core = "compiled" if fastlisten.compiled else "pure-Python"
    assert out.stdout.startswith(f"fastlisten {fastlisten.VERSION} ({core} core, ")


def test_help_texts_are_plain_text():
    from fastlisten import cli

    parser = cli.build_parser()
    texts = [parser.format_help()]
    for action in parser._subparsers._group_actions:
        texts += [p.format_help() for p in action.choices.values()]
    assert len(texts) == 1 + len(cli.COMMANDS)
    for text in texts:
        assert "``" not in text, text


def test_a_library_warning_is_one_log_line_naming_its_class():
    limit = sysinfo.somaxconn()
    if limit is None or limit >= 2**20:
        pytest.skip("needs a readable somaxconn below 2**20")
    server = Served("daytime", "--backlog", str(2**20))
    rc, err = server.stop()
    assert rc == 0, err
    assert f"WARNING fastlisten: BacklogTruncatedWarning: backlog {2**20} is above" in err
    assert ".py:" not in err        # no file:line of the library's source
    assert "stopped; counters: accepted=0 " in err and "None" not in err


def test_the_counters_line_leaves_out_what_the_system_cannot_tell():
    from fastlisten.commands.serve import format_counters

    line = format_counters({"accepted": 3, "queued": None, "backlog": None, "errors": {},
                            "listen_overflows_since_open": None})
    assert line == "accepted=3 accept_errors={}"


# -- info ---------------------------------------------------------------------

def test_info_prints_the_limits_and_features():
    out = run("info")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for word in ("somaxconn", "tcp_max_syn_backlog", "tcp_syncookies", "tcp_abort_on_overflow",
                 "ip_local_port_range", "ip_unprivileged_port_start", "SO_REUSEPORT",
                 "TCP_DEFER_ACCEPT", "TCP_FASTOPEN", "compiled core", "ListenOverflows",
                 "ListenDrops"):
        assert word in text
    assert re.search(rf"somaxconn \(largest backlog\)\s+{kernel_somaxconn()}\n", text)
    eph = sysinfo.ephemeral_port_range()
    assert f"{eph[0]}-{eph[1]}" in text
    expected = "yes" if fastlisten.compiled else "no"
    assert re.search(rf"compiled core\s+{expected}\n", text)


def test_info_json_is_machine_readable():
    out = run("info", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["limits"]["somaxconn"] == sysinfo.somaxconn()
    assert data["limits"]["ip_local_port_range"] == list(sysinfo.ephemeral_port_range())
    assert data["features"]["compiled_core"] is fastlisten.compiled
    assert set(data["features"]) >= {"SO_REUSEPORT", "TCP_DEFER_ACCEPT", "TCP_FASTOPEN"}
    assert set(data["counters"]) == {"ListenOverflows", "ListenDrops"}


# -- serve --------------------------------------------------------------------

def test_serve_daytime_answers_and_stops_cleanly_on_sigint():
    server = Served("daytime", "--bind", "127.0.0.1:0")
    try:
        for _ in range(3):
            with socket.create_connection(server.address, timeout=10) as c:
                reply = c.makefile("rb").read()      # daytime closes after one line
            assert DAYTIME.match(reply), reply
            assert reply.split(b",")[2].split()[0] == str(time.gmtime().tm_year).encode() or \
                reply.split(b",")[2].split()[0] == str(time.gmtime().tm_year - 1).encode()
    finally:
        rc, err = server.stop(signal.SIGINT)
    assert rc == 0, err
    assert "stopped; counters: accepted=3 " in err


def test_daytime_format_is_rfc_867_style():
    assert daytime(0) == "Thursday, January 1, 1970 00:00:00-UTC"


def test_serve_echo_in_processes_stops_on_sigterm():
    server = Served("echo", "--bind", "127.0.0.1:0", "--processes", "2")
    try:
        conns = [socket.create_connection(server.address, timeout=10) for _ in range(3)]
        try:
            for i, c in enumerate(conns):
                c.sendall(b"ping %d" % i)
            for i, c in enumerate(conns):      # the third waits for a free process
                assert c.recv(64) == b"ping %d" % i
                c.close()
        finally:
            for c in conns:
                c.close()
    finally:
        rc, err = server.stop(signal.SIGTERM)
    assert rc == 0, err
    assert "accepted=3 " in err and "handlers_running=0 " in err


def test_sigusr1_logs_the_counters_and_grace_ends_idle_handlers():
    server = Served("echo", "--bind", "127.0.0.1:0", "--threads", "2", "--grace", "0")
    idle = socket.create_connection(server.address, timeout=10)
    try:
        idle.sendall(b"x")
        assert idle.recv(1) == b"x"          # its handler runs now
        server.proc.send_signal(signal.SIGUSR1)
        while True:      # bounded by the test timeout; stderr ends when the child does
            line = server.proc.stderr.readline()
            assert line, "no counters line before serve ended"
            if "counters:" in line:
                break
        assert "accepted=1 " in line and "handlers_running=1 " in line
        assert "deepest_queue=" in line and "queue_drops=0" in line
    finally:
        rc, err = server.stop(signal.SIGINT)    # the idle client is cut off
        idle.close()
    assert rc == 0, err


def test_serve_a_module_class_handler(tmp_path):
    (tmp_path / "shout.py").write_text(textwrap.dedent("""
        import socketserver
        class Upper(socketserver.StreamRequestHandler):
            def handle(self):
                self.wfile.write(self.rfile.readline().upper())
    """))
    server = Served("shout:Upper", "--bind", "127.0.0.1:0", cwd=tmp_path)
    try:
        with socket.create_connection(server.address, timeout=10) as c:
            c.sendall(b"hello\n")
            assert c.makefile("rb").readline() == b"HELLO\n"
    finally:
        rc, err = server.stop()
    assert rc == 0, err


def test_serve_on_a_unix_socket(tmp_path):
    path = str(tmp_path / "echo.sock")
    server = Served("echo", "--bind", f"unix:{path}", "--unix-mode", "600")
    try:
        assert server.address == path
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)
        with socket.socket(socket.AF_UNIX) as c:
            c.settimeout(10)
            c.connect(path)
            c.sendall(b"over unix")
            assert c.recv(64) == b"over unix"
    finally:
        rc, err = server.stop()
    assert rc == 0, err
    assert not os.path.exists(path)


@pytest.mark.parametrize("args, rc, text", [
    (["nosuch"], 2, "unknown handler 'nosuch'"),
    (["nosuchmodule:X"], 2, "cannot import"),
    (["daytime", "--bind", "127.0.0.1:70000"], 2, "0-65535"),
    (["daytime", "--bind", "::1:80"], 2, "[address]:port"),
    (["daytime", "--bind", "127.0.0.1"], 2, "no port given"),
    (["daytime", "--backlog", "99999999999"], 2, "too large"),
    (["daytime", "--threads", "0"], 2, "--threads"),
    (["daytime", "--bind", "1.2.3.4:4481"], 1, "0.0.0.0"),
])
def test_serve_explains_bad_options(args, rc, text):
    out = run("serve", *args)
    assert out.returncode == rc, out.stderr
    assert text in out.stderr and "Traceback" not in out.stderr


def test_serve_explains_a_port_in_use():
    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        out = run("serve", "daytime", "--bind", f"127.0.0.1:{port}")
    assert out.returncode == 1
    assert f"pid {os.getpid()}" in out.stderr and "EphemeralPortWarning" in out.stderr


def test_stats_interval_logs_the_counters_periodically():
    server = Served("discard", "--bind", "127.0.0.1:0", "--stats-interval", "0.05")
    try:
        seen = 0
        while seen < 2:     # bounded by the test timeout; stderr ends if serve dies
            line = server.proc.stderr.readline()
            assert line, "serve ended before logging its counters"
            seen += "counters: accepted=0 " in line
    finally:
        rc, err = server.stop(signal.SIGTERM)
    assert rc == 0, err


# -- serve runs the library's own servers ----------------------------------------

STUCK = """
import socketserver, time
class Stuck(socketserver.StreamRequestHandler):
    def handle(self):
        self.rfile.readline()
        self.wfile.write(b"started\\n")
        time.sleep(60)
        self.wfile.write(b"late\\n")
class Who(socketserver.StreamRequestHandler):
    def handle(self):
        s = self.server
        fields = [type(s).__mro__[1].__module__, str(s.fileno() >= 0),
                  str(s.socket.getsockname() == s.server_address), str(s.timeout),
                  str(callable(s.shutdown) and callable(s.server_close))]
        self.wfile.write((" ".join(fields) + "\\n").encode())
class NotAHandler:
    def __init__(self):
        pass
"""


def _stuck_client(server):
    c = socket.create_connection(server.address, timeout=30)
    c.sendall(b"go\n")
    assert c.makefile("rb").readline() == b"started\n"     # its handler runs now
    return c


@pytest.mark.parametrize("mode", [[], ["--processes", "2"]])
def test_a_stuck_handler_is_ended_after_grace_and_serve_exits(tmp_path, mode):
    (tmp_path / "stuck.py").write_text(STUCK)
    server = Served("stuck:Stuck", "--bind", "127.0.0.1:0", "--grace", "0.5", *mode,
                    cwd=tmp_path)
    client = _stuck_client(server)
    try:
        start = time.monotonic()
        rc, err = server.stop(signal.SIGTERM)     # the handler would sleep 60 s
        took = time.monotonic() - start
        assert client.recv(64) == b""             # its connection was shut down
    finally:
        client.close()
    assert rc == 0, err
    assert took < 20, f"serve took {took:.1f} s to exit"   # not the handler's 60 s
    assert "ended 1 handler(s)" in err
    assert "ERROR" not in err and "Traceback" not in err, err


def test_a_second_signal_ends_handlers_at_once(tmp_path):
    (tmp_path / "stuck.py").write_text(STUCK)
    server = Served("stuck:Stuck", "--bind", "127.0.0.1:0", "--grace", "120", cwd=tmp_path)
    client = _stuck_client(server)
    try:
        server.proc.send_signal(signal.SIGTERM)
        while True:          # bounded by the test timeout
            line = server.proc.stderr.readline()
            assert line, "serve ended before it stopped accepting"
            if "stopped accepting" in line:
                break
        rc, err = server.stop(signal.SIGTERM)     # well inside the 120 s of grace
    finally:
        client.close()
    assert rc == 0, err
    assert "ended 1 handler(s)" in err


def test_a_module_handler_sees_a_real_socketserver_server(tmp_path):
    (tmp_path / "who.py").write_text(STUCK)
    # (Who speaks first: serve's default rule, 'data', would wait for the client)
    server = Served("who:Who", "--bind", "127.0.0.1:0", "--ready-rule", "none", cwd=tmp_path)
    try:
        with socket.create_connection(server.address, timeout=10) as c:
            assert c.makefile("rb").readline() == b"fastlisten.server True True None True\n"
    finally:
        rc, err = server.stop()
    assert rc == 0, err


def test_a_class_that_is_not_a_handler_is_refused_at_start_up(tmp_path):
    (tmp_path / "nothandler.py").write_text(STUCK)
    out = run("serve", "nothandler:NotAHandler", cwd=tmp_path)
    assert out.returncode == 2
    assert "cannot be called as Class(request, client_address, server)" in out.stderr
