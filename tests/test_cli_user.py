"""The command line as a new user meets it: real ``fastlisten`` processes
(``python -m fastlisten``), real signals, bounded waits."""

import os
import re
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

import fastlisten
from fastlisten import sysinfo

FL = [sys.executable, "-m", "fastlisten"]


def run(*args, **kwargs):
    return subprocess.run(FL + list(args), capture_output=True, text=True, timeout=30,
                          **kwargs)


# -- a handler module that fails at import ------------------------------------------

@pytest.mark.parametrize("verbose", [[], ["-v"]])
def test_a_handler_module_that_raises_at_import_shows_its_own_traceback(tmp_path, verbose):
    (tmp_path / "app.py").write_text("import settings\nclass Handler: pass\n")
    (tmp_path / "settings.py").write_text(textwrap.dedent("""\
        def load():
            raise ValueError("config missing")
        load()
    """))
    out = run(*verbose, "serve", "app:Handler", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    err = out.stderr
    assert err.startswith("fastlisten serve: error: handler 'app:Handler': importing 'app' "
                          "raised ValueError:\nTraceback (most recent call last):\n"), err
    app, settings = tmp_path / "app.py", tmp_path / "settings.py"
    for frame in (f'File "{app}", line 1, in <module>', f'File "{settings}", line 3, in <module>',
                  f'File "{settings}", line 2, in load'):
        assert frame in err, err
    assert err.rstrip().endswith("ValueError: config missing"), err
    # the user's frames only: nothing of importlib's or fastlisten's
    assert "importlib" not in err and "frozen" not in err, err
    assert os.path.dirname(__import__("fastlisten").__file__) not in err, err
    assert err.count('File "') == 3, err


@pytest.mark.parametrize("verbose", [[], ["-v"]])
def test_a_syntax_error_in_the_handler_module_is_its_file_line_and_caret(tmp_path, verbose):
    (tmp_path / "app.py").write_text("import socketserver\n"
                                     "class Handler(socketserver.BaseRequestHandler)\n"
                                     "    pass\n")
    out = run(*verbose, "serve", "app:Handler", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    assert lines[0] == ("fastlisten serve: error: handler 'app:Handler': importing 'app' "
                        "raised SyntaxError:"), out.stderr
    assert lines[1] == f'  File "{tmp_path / "app.py"}", line 2', out.stderr
    assert lines[2].strip() == "class Handler(socketserver.BaseRequestHandler)"
    assert lines[-1].startswith("SyntaxError: ")
    assert len(lines) <= 6, out.stderr       # not twenty lines of importlib


def test_a_handler_module_that_does_not_exist_is_one_line(tmp_path):
    out = run("serve", "nosuchmodule:Handler", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr == ("fastlisten serve: error: handler 'nosuchmodule:Handler': cannot "
                          "import 'nosuchmodule': No module named 'nosuchmodule'\n")


def test_a_missing_dependency_of_the_handler_module_points_at_its_import(tmp_path):
    (tmp_path / "app.py").write_text("import os\nimport nosuchdependency\n")
    out = run("serve", "app:Handler", cwd=tmp_path)
    assert out.returncode == 2
    assert f'File "{tmp_path / "app.py"}", line 2, in <module>' in out.stderr, out.stderr
    assert out.stderr.rstrip().endswith("No module named 'nosuchdependency'"), out.stderr


# -- --bind: one rule with the library, and no URL ------------------------------------

class Served:
    """A ``fastlisten serve`` child: its address from the first stdout line;
    stop() sends a signal and returns (returncode, stderr)."""

    def __init__(self, *args, cwd=None):
        self.proc = subprocess.Popen(FL + ["serve"] + list(args), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=cwd)
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"serve did not start: {line!r} {err}")
        self.where = line[len("listening on "):].strip()
        if self.where.startswith("/"):
            self.address = self.where
        else:
            host, _, port = self.where.rpartition(":")
            self.address = (host.strip("[]"), int(port))

    def stop(self, sig=signal.SIGTERM):
        try:
            self.proc.send_signal(sig)
            _, err = self.proc.communicate(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.communicate()
        return self.proc.returncode, err


def test_bind_port_alone_is_loopback_as_in_the_library():
    server = Served("daytime", "--bind", "0")
    try:
        assert server.address[0] == "127.0.0.1", server.where
        with socket.create_connection(server.address, timeout=10) as c:
            assert c.makefile("rb").readline().endswith(b"-UTC\r\n")
    finally:
        rc, err = server.stop()
    assert rc == 0, err
    with fastlisten.listen("0") as lst:             # the same text, the same rule
        assert lst.address[0] == "127.0.0.1"
    with fastlisten.listen(port=0) as lst:
        assert lst.address[0] == "127.0.0.1"


def test_bind_colon_port_is_every_interface():
    server = Served("daytime", "--bind", ":0")
    rc, err = server.stop()
    assert rc == 0, err
    assert server.address[0] == "0.0.0.0", server.where


def test_bind_help_states_the_rule():
    out = run("serve", "--help")
    text = " ".join(out.stdout.split())
    assert "PORT alone (no host: loopback only, 127.0.0.1, as in the library)" in text
    assert ":PORT or 0.0.0.0:PORT (every interface)" in text and "not a URL" in text


@pytest.mark.parametrize("url, write", [
    ("http://127.0.0.1:8080", "write 127.0.0.1:8080 (HOST:PORT"),
    ("https://[::1]:8443/", "write [::1]:8443 (HOST:PORT"),
    ("http://localhost", "write localhost:PORT (HOST:PORT"),
    ("file:///run/app.sock", "write unix:/run/app.sock for that Unix socket"),
])
def test_bind_refuses_a_url_and_says_what_to_write(tmp_path, url, write):
    out = run("serve", "daytime", "--bind", url, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"fastlisten serve: error: address {url!r} is a URL"), \
        out.stderr
    assert write in out.stderr and "Traceback" not in out.stderr
    assert "directory" not in out.stderr and os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="is a URL"):
        fastlisten.listen(url)


# -- the counters line: this listener's drops, not the machine's ----------------------

def _overflow_a_listener_elsewhere(opened):
    """Make the machine's ListenOverflows rise with a listener of this test
    process (backlog 0, clients that are never accepted); what it opens goes
    into ``opened``, for the caller to close."""
    before = sysinfo.listen_counters()["ListenOverflows"]
    if before is None:
        pytest.skip("/proc/net/netstat has no ListenOverflows here")
    other = socket.create_server(("127.0.0.1", 0), backlog=0)
    opened.append(other)
    deadline = time.monotonic() + 20
    while sysinfo.listen_counters()["ListenOverflows"] == before:
        assert time.monotonic() < deadline, "no listen overflow within 20 s"
        c = socket.socket()
        opened.append(c)
        c.setblocking(False)
        c.connect_ex(other.getsockname())
        if len(opened) > 5:         # the queue is full: wait for a SYN's drop
            select.select([], [], [], 0.05)


def _last_counters(err):
    return [line for line in err.splitlines() if "stopped; counters:" in line][-1]


def test_the_counters_line_reports_this_listeners_drops_not_the_machines():
    server = Served("daytime", "--bind", "127.0.0.1:0")
    elsewhere = []
    try:
        _overflow_a_listener_elsewhere(elsewhere)
    finally:
        rc, err = server.stop(signal.SIGTERM)
        for s in elsewhere:
            s.close()
    assert rc == 0, err
    line = _last_counters(err)
    assert _queue_drops(line) == 0, line    # an idle server dropped nothing
    assert "ListenOverflows" not in line and "ListenDrops" not in line, line


STUCK = """
import socketserver, time
class Stuck(socketserver.StreamRequestHandler):
    def handle(self):
        self.rfile.readline()
        self.wfile.write(b"started\\n")
        time.sleep(60)
"""


def test_the_counters_line_counts_the_connections_this_listener_dropped(tmp_path):
    (tmp_path / "stuck.py").write_text(STUCK)
    server = Served("stuck:Stuck", "--bind", "127.0.0.1:0", "--threads", "1", "--backlog", "1",
                    "--grace", "0", cwd=tmp_path)
    busy = socket.create_connection(server.address, timeout=30)
    clients, line = [], ""
    try:
        busy.sendall(b"go\n")
        assert busy.recv(64) == b"started\n"          # the one thread is busy
        deadline = time.monotonic() + 20
        while not line or _queue_drops(line) == 0:
            assert time.monotonic() < deadline, "no drop counted within 20 s"
            for _ in range(4):          # more clients than the queue holds
                c = socket.socket()
                c.setblocking(False)
                c.connect_ex(server.address)
                clients.append(c)
            server.proc.send_signal(signal.SIGUSR1)
            line = ""
            while "counters:" not in line:   # bounded by the test's timeout
                line = server.proc.stderr.readline()
                assert line, "serve ended"
            line = line.rstrip()
    finally:
        rc, err = server.stop(signal.SIGTERM)
        busy.close()
        for c in clients:
            c.close()
    assert rc == 0, err
    assert _queue_drops(line) >= 1, line
    assert _queue_drops(_last_counters(err)) >= _queue_drops(line)


def _queue_drops(line):
    """queue_drops from a counters line (the accept filter's counts may follow it)."""
    found = re.search(r" queue_drops=(\d+)( |$)", line)
    assert found, line
    return int(found.group(1))


def test_a_unix_socket_counters_line_has_no_tcp_figures(tmp_path):
    server = Served("daytime", "--bind", f"unix:{tmp_path / 'd.sock'}")
    rc, err = server.stop(signal.SIGTERM)
    assert rc == 0, err
    line = _last_counters(err)
    assert "queue_drops" not in line and "Listen" not in line, line


# -- explanations in the caller's vocabulary -------------------------------------------

AS_NOBODY = """
import os, sys
from fastlisten.cli import build_parser, main
build_parser()              # every import done while this process may still read them
import fastlisten
if os.geteuid() == 0:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
if sys.argv[1:] == ["library"]:
    try:
        fastlisten.listen(("127.0.0.1", 80))
    except PermissionError as exc:
        print(exc)
    sys.exit(0)
sys.exit(main(sys.argv[1:]))
"""


def test_a_privileged_port_names_the_flag_on_the_command_line():
    start = sysinfo.unprivileged_port_start()
    if start is None or start <= 80:
        pytest.skip("port 80 is not privileged here")
    # the command's own main(), in a process that is not root (as a user runs it)
    out = subprocess.run([sys.executable, "-c", AS_NOBODY, "serve", "daytime",
                          "--bind", "127.0.0.1:80"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1, out.stderr
    assert "ip_unprivileged_port_start" in out.stderr and "(--fd systemd)" in out.stderr
    assert "fd='systemd'" not in out.stderr, out.stderr
    # the library's callers still read the keyword they write
    out = subprocess.run([sys.executable, "-c", AS_NOBODY, "library"], capture_output=True,
                         text=True, timeout=30)
    assert "(fd='systemd')" in out.stdout and "--fd" not in out.stdout, out.stdout + out.stderr


def test_fd_systemd_without_a_socket_names_the_flag():
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    out = run("serve", "daytime", "--fd", "systemd", env=env)
    assert out.returncode == 1, out.stderr
    assert "--fd systemd but no socket was passed to this process" in out.stderr, out.stderr
    assert "fd='systemd'" not in out.stderr
    with pytest.raises(OSError, match="fd='systemd' but no socket was passed"):
        fastlisten.listen(fd="systemd")


def test_a_stale_socket_kept_by_keep_stale_names_the_flag(tmp_path):
    path = str(tmp_path / "stale.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)            # a socket file nobody listens on
    stale.close()
    out = run("serve", "daytime", "--bind", f"unix:{path}", "--keep-stale")
    assert out.returncode == 1, out.stderr
    assert "--keep-stale leaves it in place: remove it, or leave out --keep-stale" in out.stderr
    assert "unlink_stale" not in out.stderr, out.stderr


def test_a_missing_directory_says_the_shell_command(tmp_path):
    where = tmp_path / "run" / "app.sock"
    out = run("serve", "daytime", "--bind", f"unix:{where}")
    assert out.returncode == 1, out.stderr
    assert f"create it first (mkdir -p {where.parent})" in out.stderr, out.stderr
    assert "os.makedirs" not in out.stderr
