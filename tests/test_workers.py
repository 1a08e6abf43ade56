"""fastlisten.Workers and ``fastlisten serve --workers``: real processes, real
signals, real sockets.  Every test ends with the supervisor gone and none of
its workers left (checked through /proc), and waits on log lines or socket
events with a deadline, never on a bare sleep."""

import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import fastlisten
from fastlisten import sysinfo
from fastlisten._heartbeat import Record as _Record
from fastlisten._reuseport import steering_program
from fastlisten._server_hooks import FastServer, PeriodicActions
from fastlisten.systemd import Notifier
from fastlisten.workers import Workers

FL = [sys.executable, "-m", "fastlisten"]


def _state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except OSError:
        return None


class Supervised:
    """``fastlisten serve ... --workers N`` in a child process; its stderr is
    read by a thread into a queue, so a test can wait for a log line."""

    def __init__(self, *args, cwd=None, env=None, cmd=None, before_start=None, address=None):
        if cmd is None and "--ready-rule" not in args and args[:1] != ("echo",):
            # these tests' own handlers speak first, or their clients send
            # nothing: serve's default rule ('data') would keep them
            # waiting; the echo runs (reloads and scaling under load among
            # them) keep the default filter
            args += ("--ready-rule", "none")
        self.proc = subprocess.Popen(cmd or FL + ["serve"] + list(args),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=cwd, env=env)
        self.lines = queue.Queue()
        self.log = []
        self.seen_workers = set()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            if before_start is not None:
                before_start()
            line = self.proc.stdout.readline()
        except BaseException:       # the test's time limit: leave nothing running
            self.close()
            raise
        if not line.startswith("listening on "):
            self.close()
            raise AssertionError(f"serve did not start: {line!r} {''.join(self.log)}")
        if address is not None:
            self.address = address
            return
        where = line[len("listening on "):].strip()
        host, _, port = where.rpartition(":")
        self.address = (host.strip("[]"), int(port))

    def _read(self):
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def expect(self, text, timeout=20.0):
        """The next stderr line containing ``text`` (fail after timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no {text!r} within {timeout} s; log:\n"
                                     + "".join(self.log)) from None
            if line is None:
                raise AssertionError(f"serve ended before {text!r}; log:\n" + "".join(self.log))
            self.log.append(line)
            if text in line:
                return line

    def workers(self):
        pids = sysinfo.children(self.proc.pid)
        self.seen_workers.update(pids)
        return pids

    def wait_workers(self, n, timeout=20.0):
        """Wait until exactly n workers run and none is a zombie."""
        deadline = time.monotonic() + timeout
        while True:
            pids = self.workers()
            if len(pids) == n and all(_state(p) not in (None, "Z") for p in pids):
                return pids
            if time.monotonic() > deadline:
                raise AssertionError(f"workers {[(p, _state(p)) for p in pids]}, wanted {n}")
            time.sleep(0.01)

    def send(self, sig):
        self.workers()
        self.proc.send_signal(sig)

    def stop(self, sig=signal.SIGTERM, timeout=30):
        """Signal, wait for the exit; returns (returncode, the whole log)."""
        self.send(sig)
        try:
            self.proc.wait(timeout=timeout)
        finally:
            self.close()
        return self.proc.returncode, "".join(self.log)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(10)
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.log.append(line)
        self.proc.stdout.close()
        self.proc.stderr.close()
        # no worker outlives its supervisor
        deadline = time.monotonic() + 10
        left = [p for p in self.seen_workers if _state(p) not in (None, "Z")]
        while left and time.monotonic() < deadline:
            time.sleep(0.01)
            left = [p for p in self.seen_workers if _state(p) not in (None, "Z")]
        assert not left, f"workers left running: {left}"


@contextlib.contextmanager
def supervised(*args, **kwargs):
    """A Supervised whose workers all accept; closed (and checked) on exit."""
    s = Supervised(*args, **kwargs)
    try:
        s.expect("worker(s) accepting")
        yield s
    finally:
        s.close()


def echo(address, payload=b"ping", timeout=10):
    with socket.create_connection(address, timeout=timeout) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            chunk = c.recv(4096)
            if not chunk:
                return data
            data += chunk


class Load:
    """Client threads making echo connections until stopped (bounded by
    ``limit`` connections each); counts what failed."""

    def __init__(self, address, threads=2, limit=20000):
        self.address, self.limit = address, limit
        self.stopped = threading.Event()
        self.ok = 0
        self.failures = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self):
        for _ in range(self.limit):
            if self.stopped.is_set():
                return
            try:
                reply = echo(self.address, b"x" * 10)
                good = reply == b"x" * 10
            except OSError as exc:
                good, reply = False, exc
            with self._lock:
                if good:
                    self.ok += 1
                else:
                    self.failures.append(reply)

    def wait_for(self, n, timeout=20):
        deadline = time.monotonic() + timeout
        while self.ok < n and time.monotonic() < deadline and not self.failures:
            if not any(t.is_alive() for t in self._threads):
                raise AssertionError(f"the load ended ({self.limit} connections a thread) "
                                     f"before {n} succeeded")
            time.sleep(0.005)

    def stop(self):
        self.stopped.set()
        for t in self._threads:
            t.join(30)
        return self.ok, self.failures


HANDLER = """
import socketserver
VERSION = {version!r}
class Tag(socketserver.StreamRequestHandler):
    def handle(self):
        self.rfile.read()
        self.wfile.write(VERSION.encode())
"""


@pytest.mark.parametrize("mode", ["shared", "reuse-port"])
def test_reload_under_load_loses_nothing_and_deploys_new_code(tmp_path, mode):
    (tmp_path / "tagged.py").write_text(HANDLER.format(version="v0"))
    extra = ["--reuse-port"] if mode == "reuse-port" else []
    with supervised("echo", "--bind", "127.0.0.1:0", "--workers", "2", *extra,
                    cwd=tmp_path) as s:
        first = set(s.wait_workers(2))
        load = Load(s.address)
        try:
            for generation in (1, 2, 3):
                load.wait_for(load.ok + 50)
                s.send(signal.SIGHUP)
                s.expect(f"reloaded: generation {generation} accepting")
            load.wait_for(load.ok + 50)
        finally:
            ok, failures = load.stop()
        assert failures == [] and ok > 200
        now = set(s.wait_workers(2))
        assert not now & first            # every worker was replaced
        rc, log = s.stop(signal.SIGTERM)
    assert rc == 0, log


def test_reload_imports_the_handler_module_afresh(tmp_path):
    module = tmp_path / "tagged.py"
    module.write_text(HANDLER.format(version="v1"))
    with supervised("tagged:Tag", "--bind", "127.0.0.1:0", "--workers", "2",
                    cwd=tmp_path) as s:
        assert echo(s.address) == b"v1"
        module.write_text(HANDLER.format(version="v2-longer"))   # new size: no stale .pyc
        s.send(signal.SIGHUP)
        s.expect("reloaded: generation 1 accepting")
        s.wait_workers(2)
        assert {echo(s.address) for _ in range(6)} == {b"v2-longer"}
        rc, log = s.stop(signal.SIGINT)
    assert rc == 0, log


def test_a_reload_that_crashes_backs_off_and_keeps_the_old_workers(tmp_path):
    module = tmp_path / "tagged.py"
    module.write_text(HANDLER.format(version="old"))
    with supervised("tagged:Tag", "--bind", "127.0.0.1:0", "--workers", "1",
                    cwd=tmp_path) as s:
        (old,) = s.wait_workers(1)
        module.write_text("raise RuntimeError('broken deploy')\n")
        s.send(signal.SIGHUP)
        delays = []
        for _ in range(4):
            line = s.expect("reload failed: the old generation is still serving; retrying in ")
            delays.append(float(line.split("retrying in ", 1)[1].split()[0]))
            assert "RuntimeError: broken deploy (tagged.py, line 1)" in line, line
        # each failure doubles the wait: no fork loop
        assert delays == sorted(delays) and delays[-1] >= 4 * delays[0], delays
        assert old in s.workers() and echo(s.address) == b"old"
        rc, log = s.stop(signal.SIGTERM)
    assert rc == 0
    assert log.count("RuntimeError: broken deploy\n") == 1, log     # the traceback once


def test_a_reload_with_a_syntax_error_says_so_once_per_attempt_and_recovers(tmp_path):
    """With several workers, each failed start is one line that says the old
    generation still serves and when the next try comes; the traceback (the
    user's file only) is logged once, not per worker per retry; once the
    file is fixed, the next try deploys it without another SIGHUP."""
    module = tmp_path / "tagged.py"
    module.write_text(HANDLER.format(version="old"))
    with supervised("tagged:Tag", "--bind", "127.0.0.1:0", "--workers", "2",
                    cwd=tmp_path) as s:
        s.wait_workers(2)
        module.write_text("import socketserver\nclass Tag(socketserver.BaseRequestHandler)\n"
                          "    pass\n")
        s.send(signal.SIGHUP)
        for _ in range(4):      # two tries of two workers
            line = s.expect("reload failed")
            assert line.startswith("ERROR fastlisten.workers: reload failed: the old generation "
                                   "is still serving; retrying in "), line
            assert line.rstrip().endswith("SyntaxError: expected ':' (tagged.py, line 2))") \
                or "SyntaxError: invalid syntax (tagged.py, line 2))" in line, line
            assert echo(s.address) == b"old"
        module.write_text(HANDLER.format(version="fixed"))
        deadline = time.monotonic() + 30
        while echo(s.address) != b"fixed":       # the next try, at most 3.2 s away
            assert time.monotonic() < deadline, "the fixed code was never deployed"
            time.sleep(0.05)
        s.wait_workers(2)
        assert {echo(s.address) for _ in range(4)} == {b"fixed"}
        rc, log = s.stop(signal.SIGTERM)
    assert rc == 0, log
    assert log.count(f'File "{module}", line 2') == 1, log     # the traceback once
    assert "Traceback" not in log and "importlib" not in log, log
    assert os.path.dirname(fastlisten.__file__) not in log, log
    failed = [line for line in log.splitlines() if "ERROR" in line]
    assert len(failed) == 1 + log.count("reload failed"), failed   # one line per attempt


LOOP_REPORTER = """
import socketserver
class Loop(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(str(self.server._fl_loop).encode())
"""


def test_a_workers_threaded_server_keeps_leader_follower(tmp_path):
    # The worker's heartbeat wraps service_actions, marked as periodic: the
    # threaded server still lets its pool threads accept (no hand-off).
    (tmp_path / "loop.py").write_text(LOOP_REPORTER)
    with supervised("loop:Loop", "--bind", "127.0.0.1:0", "--workers", "1",
                    cwd=tmp_path) as s:
        assert echo(s.address, b"") == b"leader"
        rc, log = s.stop(signal.SIGTERM)
    assert rc == 0, log


SELF_STOPPING = """
import os, signal, socketserver
class Freeze(socketserver.StreamRequestHandler):
    def handle(self):
        if self.rfile.readline().strip() == b"freeze":
            os.kill(os.getpid(), signal.SIGSTOP)   # the whole worker hangs
        self.wfile.write(b"alive")
"""


def test_a_hung_worker_is_killed_and_replaced(tmp_path):
    (tmp_path / "freeze.py").write_text(SELF_STOPPING)
    with supervised("freeze:Freeze", "--bind", "127.0.0.1:0", "--workers", "1",
                    "--timeout", "1", cwd=tmp_path) as s:
        (hung,) = s.wait_workers(1)
        with socket.create_connection(s.address, timeout=10) as c:
            c.sendall(b"freeze\n")
            line = s.expect("timeout): killing it")
            assert str(hung) in line
        s.expect("replacing it")
        assert echo(s.address, b"hello\n") == b"alive"
        assert hung not in s.wait_workers(1)
        rc, log = s.stop()
    assert rc == 0, log


SLOW = """
import socketserver
class Slow(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(b"started\\n")
        data = self.rfile.readline()           # waits for the client
        self.wfile.write(b"done " + data)
"""


def test_graceful_stop_lets_a_running_handler_finish(tmp_path):
    (tmp_path / "slow.py").write_text(SLOW)
    with supervised("slow:Slow", "--bind", "127.0.0.1:0", "--workers", "2",
                    "--graceful-timeout", "20", cwd=tmp_path) as s:
        s.wait_workers(2)
        with socket.create_connection(s.address, timeout=10) as c:
            f = c.makefile("rb")
            assert f.readline() == b"started\n"
            s.send(signal.SIGTERM)
            s.expect("stopping gracefully")
            with pytest.raises(ConnectionRefusedError):     # no longer accepting
                _connect_until_refused(s.address)
            c.sendall(b"finish\n")
            assert f.readline() == b"done finish\n"
            f.close()
        s.proc.wait(20)
        rc, log = s.stop()
    assert rc == 0, log


def _connect_until_refused(address, tries=200):
    """Connect until the listening socket is closed (the supervisor closes
    it once its workers have stopped accepting)."""
    for _ in range(tries):
        try:
            socket.create_connection(address, timeout=10).close()
        except ConnectionResetError:
            continue    # closed in mid-handshake: the next try is refused
        time.sleep(0.01)


def test_graceful_stop_ends_a_handler_after_the_deadline(tmp_path):
    (tmp_path / "slow.py").write_text(SLOW)
    with supervised("slow:Slow", "--bind", "127.0.0.1:0", "--workers", "1",
                    "--graceful-timeout", "0.5", cwd=tmp_path) as s:
        with socket.create_connection(s.address, timeout=20) as c:
            f = c.makefile("rb")
            assert f.readline() == b"started\n"
            s.send(signal.SIGTERM)
            assert f.readline() == b""      # the handler was ended: end of file
            f.close()
        s.expect("ended 1 handler(s)")
        s.proc.wait(20)
        rc, log = s.stop()
    assert rc == 0, log


def test_sigterm_during_a_reload_stops_cleanly(tmp_path):
    with supervised("echo", "--bind", "127.0.0.1:0", "--workers", "2") as s:
        s.wait_workers(2)
        s.send(signal.SIGHUP)
        s.expect("reloading: starting generation 1")
        rc, log = s.stop(signal.SIGTERM)
    assert rc == 0, log


def test_sigquit_stops_at_once(tmp_path):
    (tmp_path / "slow.py").write_text(SLOW)
    with supervised("slow:Slow", "--bind", "127.0.0.1:0", "--workers", "2",
                    "--graceful-timeout", "60", cwd=tmp_path) as s:
        with socket.create_connection(s.address, timeout=20) as c:
            f = c.makefile("rb")
            assert f.readline() == b"started\n"
            rc, log = s.stop(signal.SIGQUIT, timeout=20)     # does not wait 60 s
            f.close()
    assert rc == 0 and "stopping now" in log


@pytest.mark.parametrize("mode", ["shared", "reuse-port"])
def test_ttin_ttou_under_load(mode):
    extra = ["--reuse-port"] if mode == "reuse-port" else []
    # A retiring worker with nothing to finish ends at once: with 60 s of
    # grace, one that missed its SIGTERM would outlast wait_workers' 20 s.
    with supervised("echo", "--bind", "127.0.0.1:0", "--workers", "2", *extra,
                    "--graceful-timeout", "60") as s:
        s.wait_workers(2)
        load = Load(s.address)
        try:
            for sig, n in ((signal.SIGTTIN, 3), (signal.SIGTTOU, 2), (signal.SIGTTOU, 1),
                           (signal.SIGTTOU, 1), (signal.SIGTTIN, 2)):
                load.wait_for(load.ok + 40)
                s.send(sig)
                s.wait_workers(n)
            load.wait_for(load.ok + 40)
        finally:
            ok, failures = load.stop()
        assert failures == [] and ok > 150
        s.send(signal.SIGUSR1)
        line = s.expect("counters: workers=2")
        assert "per-worker accepted {" in line
        rc, log = s.stop()
    assert rc == 0, log
    if mode == "reuse-port":
        assert "SO_ATTACH_REUSEPORT_CBPF" in log or "tcp_migrate_req=1" in log


def test_max_requests_recycles_workers_without_loss():
    with supervised("echo", "--bind", "127.0.0.1:0", "--workers", "2", "--max-requests", "20",
                    "--max-requests-jitter", "5") as s:
        first = set(s.wait_workers(2))
        load = Load(s.address, threads=2)
        recycled = set()
        try:
            for _ in range(3):
                line = s.expect("reached max_requests")
                recycled.add(int(line.split("worker ")[1].split()[0]))
            load.wait_for(load.ok + 20)
        finally:
            ok, failures = load.stop()
        assert failures == []
        s.seen_workers |= recycled          # checked gone in close()
        assert len(recycled) == 3 and recycled & first
        rc, log = s.stop()
    assert rc == 0, log


def test_a_dying_worker_is_replaced_and_the_pid_file_follows_the_supervisor(tmp_path):
    pid_file = tmp_path / "fl.pid"
    with supervised("echo", "--bind", "127.0.0.1:0", "--workers", "2", "--pid-file",
                    str(pid_file)) as s:
        assert pid_file.read_text().strip() == str(s.proc.pid)
        victim = s.wait_workers(2)[0]
        os.kill(victim, signal.SIGKILL)
        s.expect(f"worker {victim} ended (signal SIGKILL)")
        assert victim not in s.wait_workers(2)
        assert echo(s.address) == b"ping"
        rc, log = s.stop()
    assert rc == 0, log
    assert not pid_file.exists()


# -- systemd -------------------------------------------------------------------

def _notify_socket(tmp_path, abstract):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"fastlisten-test-{os.getpid()}-{time.monotonic_ns()}"
        sock.bind("\0" + name)
        return sock, "@" + name
    path = str(tmp_path / "notify")
    sock.bind(path)
    return sock, path


def _messages(sock, until, timeout=20):
    """Datagrams received (as dicts) up to and including one containing ``until``."""
    sock.settimeout(timeout)
    out = []
    while True:
        fields = dict(line.split("=", 1) for line in sock.recv(4096).decode().split("\n"))
        out.append(fields)
        if until.items() <= fields.items():
            return out


@pytest.mark.parametrize("abstract", [True, False])
def test_sd_notify_ready_reloading_stopping(tmp_path, abstract):
    sock, where = _notify_socket(tmp_path, abstract)
    env = dict(os.environ, NOTIFY_SOCKET=where)
    try:
        s = Supervised("echo", "--bind", "127.0.0.1:0", "--workers", "2", env=env)
        try:
            got = _messages(sock, {"READY": "1"})
            assert "STATUS" in got[0]
            before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            s.send(signal.SIGHUP)
            reload_msgs = _messages(sock, {"READY": "1"})
            reloading = reload_msgs[0]
            assert reloading["RELOADING"] == "1"
            assert int(reloading["MONOTONIC_USEC"]) >= before
            after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            assert int(reloading["MONOTONIC_USEC"]) <= after
            s.send(signal.SIGTERM)
            assert _messages(sock, {"STOPPING": "1"})
            # (no second SIGTERM: one that lands after the supervisor put the
            # default handlers back, on its way out, kills it: rc -15)
            s.proc.wait(20)
            rc, log = s.stop()
        finally:
            s.close()
    finally:
        sock.close()
    assert rc == 0, log


def test_watchdog_pings_at_half_the_interval(tmp_path):
    sock, where = _notify_socket(tmp_path, abstract=False)
    env = dict(os.environ, NOTIFY_SOCKET=where, WATCHDOG_USEC="200000")
    try:
        s = Supervised("echo", "--bind", "127.0.0.1:0", "--workers", "1", env=env)
        try:
            pings = 0
            while pings < 3:
                if _messages(sock, {})[-1].get("WATCHDOG") == "1":
                    pings += 1
            rc, log = s.stop()
        finally:
            s.close()
    finally:
        sock.close()
    assert rc == 0, log


def test_keep_alive_pings_when_due_and_says_when_next(tmp_path):
    sock, where = _notify_socket(tmp_path, abstract=False)
    try:
        n = Notifier(where, watchdog_usec=2_000_000)        # every 1.0 s
        n.keep_alive(100.0)                                 # the first: at once
        assert n.next_watchdog == 101.0
        n.keep_alive(100.5)                                 # not due: nothing sent
        n.keep_alive(101.0)
        assert n.next_watchdog == 102.0
        sock.setblocking(False)
        assert [sock.recv(100) for _ in range(2)] == [b"WATCHDOG=1"] * 2
        with pytest.raises(BlockingIOError):
            sock.recv(100)
    finally:
        sock.close()
    off = Notifier(where)                                   # no WATCHDOG_USEC
    off.keep_alive(100.0)
    assert off.next_watchdog is None


def test_the_watchdog_is_for_the_pid_systemd_named():
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}
    n = Notifier.from_environment(env)
    assert n.watchdog_interval is None and env == {}
    n = Notifier.from_environment({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "3000000"},
                                  unset=False)
    assert n.watchdog_interval == 1.5
    assert not Notifier().notify(READY=1)       # no socket: nothing sent
    with pytest.raises(ValueError):
        Notifier("/run/x").notify(STATUS="two\nlines")


@pytest.mark.skipif(not os.path.exists("/usr/bin/systemd-socket-activate"),
                    reason="systemd-socket-activate (Debian's systemd package) is missing")
def test_socket_activation_through_systemd_socket_activate():
    with socket.socket() as probe:          # a free port for the tool to bind
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = ["/usr/bin/systemd-socket-activate", "-l", f"127.0.0.1:{port}", sys.executable,
           "-m", "fastlisten", "serve", "echo", "--fd", "systemd", "--workers", "2"]
    first = []

    def connect_first():
        # the tool execs the program when the first connection comes
        deadline = time.monotonic() + 20
        while not first:
            try:
                first.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)    # the tool is not listening yet
        first[0].sendall(b"first")
        first[0].shutdown(socket.SHUT_WR)

    s = Supervised(cmd=cmd, before_start=connect_first)
    try:
        assert s.address == ("127.0.0.1", port)
        s.expect("worker(s) accepting")
        with first[0]:
            assert first[0].recv(100) == b"first"   # queued before we started: served
        assert {echo(s.address, b"%d" % i) for i in range(10)} == {b"%d" % i for i in range(10)}
        rc, log = s.stop()
    finally:
        s.close()
    assert rc == 0, log


# -- the library, in-process pieces --------------------------------------------------

def test_workers_checks_its_arguments():
    with pytest.raises(ValueError, match="workers must be at least 1"):
        Workers(fastlisten.TCPServer, ("127.0.0.1", 0), fastlisten.StreamRequestHandler,
                workers=0)
    with pytest.raises(TypeError, match="RequestHandlerClass"):
        Workers(fastlisten.TCPServer, ("127.0.0.1", 0))
    with pytest.raises(ValueError, match="timeout must be > 0"):
        Workers(fastlisten.TCPServer, ("127.0.0.1", 0), fastlisten.StreamRequestHandler,
                timeout=0)
    # the numbers are checked as ListenConfig's are (fastlisten.config)
    with pytest.raises(TypeError, match="workers must be an integer"):
        Workers(fastlisten.TCPServer, ("127.0.0.1", 0), fastlisten.StreamRequestHandler,
                workers=1.5)
    with pytest.raises(TypeError, match="workers must be an integer"):
        Workers(fastlisten.TCPServer, ("127.0.0.1", 0), fastlisten.StreamRequestHandler,
                workers=True)       # a bool is no count
    with pytest.raises(ValueError, match="max_requests_jitter must be at least 0"):
        Workers(fastlisten.TCPServer, ("127.0.0.1", 0), fastlisten.StreamRequestHandler,
                max_requests_jitter=-1)
    with pytest.raises(ValueError, match="graceful_timeout must be >= 0"):
        Workers(fastlisten.TCPServer, ("127.0.0.1", 0), fastlisten.StreamRequestHandler,
                graceful_timeout=float("inf"))
    w = Workers(fastlisten.TCPServer, ("127.0.0.1", 0), fastlisten.StreamRequestHandler,
                max_requests=10**12, linger=0)      # any number of connections
    assert (w.max_requests, w.linger) == (10**12, 0.0)
    with pytest.raises(ValueError, match="reuse_port needs sockets of its own"):
        Workers(fastlisten.TCPServer, None, fastlisten.StreamRequestHandler,
                listen_config=fastlisten.ListenConfig(fd=3), reuse_port=True)


@pytest.mark.forks_beside_test_threads
def test_the_supervisor_never_reads_a_half_written_worker_record():
    # A worker writes its record after every batch, and the supervisor reads
    # it meanwhile; a record read half-written once showed a heartbeat of
    # 0.0, and a healthy worker was killed as hung (its connections reset).
    record = _Record()
    stamps = (1000.25, 2000.5)          # differ in every byte that matters
    record.write(stamps[0], 1, 1, 1)
    pid = os.fork()
    if pid == 0:            # the writer: a bounded number of writes, then exit
        code = 1
        try:
            for i in range(300_000):
                record.write(stamps[i % 2], 2, 2, 2)
            code = 0
        finally:
            os._exit(code)
    reads, bad = 0, []
    try:
        while True:
            heartbeat = record.read()[0]
            reads += 1
            if heartbeat not in stamps and len(bad) < 5:
                bad.append(heartbeat)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
    finally:
        record.close()
    assert os.waitstatus_to_exitcode(status) == 0
    assert bad == [], f"{len(bad)}+ torn reads of {reads}"


def test_fastlisten_servers_offer_the_hooks_a_worker_uses():
    import socketserver

    classes = [fastlisten.TCPServer, fastlisten.ThreadingTCPServer, fastlisten.ForkingTCPServer]
    for cls in classes:
        server = cls(("127.0.0.1", 0), fastlisten.StreamRequestHandler,
                     bind_and_activate=False)
        try:
            assert isinstance(server, FastServer), cls
        finally:
            server.server_close()
    plain = socketserver.TCPServer(("127.0.0.1", 0), socketserver.StreamRequestHandler,
                                   bind_and_activate=False)
    try:
        assert not isinstance(plain, FastServer)  # served through socketserver's API only
    finally:
        plain.server_close()
    calls = []
    marked = PeriodicActions(lambda: calls.append(1))
    marked()
    assert calls == [1] and marked.fl_periodic is True   # what ThreadingMixIn looks for


def test_steering_program_picks_only_the_given_sockets():
    prog = steering_program([0, 2])
    assert prog[1] == (0x94, 0, 0, 2)            # A %= 2
    assert [insn[3] for insn in prog if insn[0] == 0x06] == [0, 2]
    with pytest.raises(ValueError):
        steering_program([])


def test_library_use_with_a_stdlib_http_server(tmp_path):
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent("""
        import http.server, logging, sys, fastlisten
        logging.basicConfig(level=logging.INFO)

        class Hello(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = f"{self.server.server_port}".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            def log_message(self, *args):
                pass

        w = fastlisten.Workers(http.server.HTTPServer, ("127.0.0.1", 0), Hello, workers=2)
        w.bind()
        print("listening on 127.0.0.1:%d" % w.address[1], flush=True)
        sys.exit(w.run())
    """))
    with supervised(cmd=[sys.executable, str(script)], cwd=tmp_path) as s:
        import http.client
        conn = http.client.HTTPConnection(*s.address, timeout=10)
        conn.request("GET", "/")
        assert conn.getresponse().read() == str(s.address[1]).encode()
        conn.close()
        rc, log = s.stop(signal.SIGINT)
    assert rc == 0, log


def _accept_all(sock):
    n = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return n
        conn.close()
        n += 1


def test_steering_follows_the_reuseport_group_array():
    """The model Workers keeps of the kernel's reuseport group (members in
    listen() order; a closed member's place taken by the last one) matches
    the kernel: the program's indices reach exactly the sockets meant."""
    from fastlisten._reuseport import _attach_cbpf

    socks = []
    try:
        for i in range(3):
            s = socket.socket()
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", socks[0].getsockname()[1] if i else 0))
            s.listen(128)
            s.setblocking(False)
        address = socks[0].getsockname()
        _attach_cbpf(socks[0].fileno(), steering_program([0, 2]))
        clients = [socket.create_connection(address, timeout=10) for _ in range(40)]
        got = [_accept_all(s) for s in socks]
        for c in clients:
            c.close()
        assert got[1] == 0 and got[0] > 0 and got[2] > 0 and sum(got) == 40, got
        socks.pop(0).close()          # group: [third, second]
        _attach_cbpf(socks[0].fileno(), steering_program([0]))
        clients = [socket.create_connection(address, timeout=10) for _ in range(20)]
        got = [_accept_all(s) for s in socks]
        for c in clients:
            c.close()
        assert got == [0, 20], got    # all to the third socket, now at position 0
    finally:
        for s in socks:
            s.close()


def test_a_second_sigterm_stops_at_once(tmp_path):
    (tmp_path / "slow.py").write_text(SLOW)
    with supervised("slow:Slow", "--bind", "127.0.0.1:0", "--workers", "1",
                    "--graceful-timeout", "60", cwd=tmp_path) as s:
        with socket.create_connection(s.address, timeout=20) as c:
            f = c.makefile("rb")
            assert f.readline() == b"started\n"
            s.send(signal.SIGTERM)
            s.expect("stopping gracefully")
            rc, log = s.stop(signal.SIGTERM, timeout=20)     # not the 60 s of grace
            f.close()
    assert rc == 0 and "stopping now" in log


def test_the_bench_reload_scenario_counts_no_loss_for_fastlisten():
    from fastlisten.benchmark import restarts

    row = restarts.reload_scenario("shared", 2, 1.5, 4)
    assert row["events"] == 2 and row["completed"] > 0
    assert row["lost"] == 0, row


def test_workers_on_a_unix_socket_remove_its_file_at_the_end(tmp_path):
    path = str(tmp_path / "echo.sock")
    s = Supervised("echo", "--bind", f"unix:{path}", "--workers", "2", address=path)
    with contextlib.closing(s):
        s.expect("worker(s) accepting")
        for generation in (1, 2):
            s.send(signal.SIGHUP)
            s.expect(f"reloaded: generation {generation} accepting")
        with socket.socket(socket.AF_UNIX) as c:
            c.settimeout(10)
            c.connect(path)
            c.sendall(b"unix")
            c.shutdown(socket.SHUT_WR)
            assert c.recv(100) == b"unix"
        rc, log = s.stop()
    assert rc == 0, log
    assert not os.path.exists(path)
    with pytest.raises(ValueError, match="TCP option"):
        Workers(fastlisten.UnixStreamServer, path, fastlisten.StreamRequestHandler,
                reuse_port=True)


def _bit(sig):
    return 1 << (sig - 1)


def _signal_dispositions(pid):
    """(caught, ignored): the signal masks /proc/<pid>/status shows."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return int(fields["SigCgt"], 16), int(fields["SigIgn"], 16)


def test_forking_handlers_inside_workers_stop_with_them(tmp_path):
    (tmp_path / "slow.py").write_text(SLOW)
    with supervised("slow:Slow", "--bind", "127.0.0.1:0", "--workers", "2", "--processes", "4",
                    "--graceful-timeout", "0.5", cwd=tmp_path) as s:
        with socket.create_connection(s.address, timeout=20) as c:
            f = c.makefile("rb")
            assert f.readline() == b"started\n"
            handlers = [p for w in s.workers() for p in sysinfo.children(w)]
            assert len(handlers) == 1
            # the worker's signal handling is not the handler process's:
            # SIGTERM (end_handlers') and SIGUSR2 end it, SIGINT is ignored
            caught, ignored = _signal_dispositions(handlers[0])
            assert not caught & (_bit(signal.SIGTERM) | _bit(signal.SIGUSR2)), hex(caught)
            assert ignored & _bit(signal.SIGINT), hex(ignored)
            s.seen_workers.update(handlers)         # checked gone in close()
            rc, log = s.stop()
            assert f.readline() == b""      # its process was ended after the grace
            f.close()
    assert rc == 0, log


def test_proxy_protocol_and_tls_work_in_every_worker(tmp_path):
    from test_cli_proxy_tls import WHO, _talk
    from tlsutil import client_context, make_cert

    cert, key = make_cert(tmp_path)
    (tmp_path / "who.py").write_text(WHO)
    with supervised("who:Who", "--bind", "127.0.0.1:0", "--workers", "2",
                    "--proxy-protocol", "v1", "--trusted-proxy", "127.0.0.0/8",
                    "--tls-cert", cert, "--tls-key", key, cwd=tmp_path) as s:
        for generation in (0, 1):
            if generation:
                s.send(signal.SIGHUP)
                s.expect("reloaded: generation 1 accepting")
            for port in (4242, 4243, 4244):
                got = _talk(s.address, [b"PROXY TCP4 203.0.113.5 127.0.0.1 %d 443\r\n" % port,
                                        b"hi\n"], ctx=client_context(cert))
                assert got == b"203.0.113.5:%d v1\n" % port
        rc, log = s.stop()
    assert rc == 0, log


def test_a_listen_config_given_to_workers_reaches_the_servers(tmp_path):
    from test_cli_proxy_tls import WHO, _talk

    (tmp_path / "who.py").write_text(WHO)
    (tmp_path / "app.py").write_text(textwrap.dedent("""
        import logging, sys, fastlisten
        from who import Who
        logging.basicConfig(level=logging.INFO)
        w = fastlisten.Workers(fastlisten.ThreadingTCPServer, ("127.0.0.1", 0), Who,
                               workers=2, reuse_port=True,
                               listen_config=fastlisten.ListenConfig(proxy_protocol="v2"))
        w.bind()
        print("listening on 127.0.0.1:%d" % w.address[1], flush=True)
        sys.exit(w.run())
    """))
    v2 = (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + socket.inet_aton("198.51.100.7")
          + socket.inet_aton("127.0.0.1") + (5555).to_bytes(2, "big") + (80).to_bytes(2, "big"))
    with supervised(cmd=[sys.executable, "app.py"], cwd=tmp_path) as s:
        for _ in range(4):
            assert _talk(s.address, [v2 + b"hi\n"]) == b"198.51.100.7:5555 v2\n"
        rc, log = s.stop()
    assert rc == 0, log


def test_sysinfo_reads_children_sockets_and_switches_of_a_process():
    before = sysinfo.open_sockets(os.getpid())
    with socket.socket():
        assert sysinfo.open_sockets(os.getpid()) == before + 1
    child = subprocess.Popen([sys.executable, "-c", "print('up', flush=True); input()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"up\n"     # it has run (and slept)
        assert child.pid in sysinfo.children(os.getpid())
        assert sysinfo.context_switches(child.pid) > 0
    finally:
        child.stdin.close()
        child.stdout.close()
        child.wait(10)
    assert child.pid not in sysinfo.children(os.getpid())
    assert sysinfo.children(2**22 + 1) == [] and sysinfo.open_sockets(2**22 + 1) == 0
