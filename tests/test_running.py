"""fastlisten.serve_until_signalled used without the command line: a
program of its own in a subprocess, stopped with real SIGTERM/SIGINT."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

import fastlisten
from fastlisten import running

LIMIT = 30      # seconds: a bound on every wait, never a measurement

PROGRAM = textwrap.dedent("""
    import logging, os, signal, socket, socketserver, sys
    import fastlisten

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    kind, grace, interval = sys.argv[1], float(sys.argv[2]), sys.argv[3]

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            line = self.rfile.readline()
            if line == b"hold\\n":          # wait for the client's second line
                self.wfile.write(b"started\\n")
                self.wfile.write(b"done " + self.rfile.readline())
            elif line == b"who\\n":         # a forked handler: what it inherited
                fd = signal.set_wakeup_fd(-1)
                fields = [signal.getsignal(signal.SIGTERM) is signal.SIG_DFL,
                          signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
                          signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN, fd == -1]
                self.wfile.write((" ".join(map(str, fields)) + "\\n").encode())
            else:
                self.wfile.write(b"ok " + line)

    class Failing(fastlisten.TCPServer):
        def service_actions(self):
            raise RuntimeError("the loop failed")

    cls = {"fl-sync": fastlisten.TCPServer, "std-sync": socketserver.TCPServer,
           "threads": fastlisten.ThreadingTCPServer, "forking": fastlisten.ForkingTCPServer,
           "failing": Failing}[kind]
    server = cls(("127.0.0.1", 0), Handler)

    def previous(signum, frame):
        pass

    signal.signal(signal.SIGTERM, previous)
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(w)

    def say(text):
        print(text, flush=True)

    try:
        with server:
            ended = fastlisten.serve_until_signalled(
                server, grace=grace, on_ready=lambda: say(f"port {server.server_address[1]}"),
                on_stop=lambda: say("stopping"),
                on_stats=None if interval == "-" else lambda: say("stats"),
                stats_interval=None if interval in ("-", "0") else float(interval))
    except RuntimeError as exc:
        say(f"raised {exc}")
        ended = -1
    restored = (signal.getsignal(signal.SIGTERM) is previous
                and signal.set_wakeup_fd(-1) == w
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    say(f"ended {ended} restored {restored}")
""")


class Program:
    """The program above in a subprocess; its port from its first line.
    Reads of its output are bounded by the test's timeout."""

    def __init__(self, tmp_path, kind, grace=5.0, interval="-"):
        path = tmp_path / "program.py"
        path.write_text(PROGRAM)
        self.proc = subprocess.Popen([sys.executable, str(path), kind, str(grace), interval],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = self.proc.stdout.readline()
        if not line.startswith(b"port "):
            self.finish()
            raise AssertionError(f"the program did not start: {line!r} {self.err!r}")
        self.address = ("127.0.0.1", int(line.split()[1]))

    def expect_out(self, text):
        """Read stdout up to a line that starts with ``text``."""
        while True:
            line = self.proc.stdout.readline()
            assert line, f"the program ended before saying {text!r}"
            if line.startswith(text.encode()):
                return line.decode().strip()

    def expect_err(self, text):
        """Read stderr (the log) up to a line that holds ``text``."""
        while True:
            line = self.proc.stderr.readline()
            assert line, f"the program ended before logging {text!r}"
            if text.encode() in line:
                return line.decode().strip()

    def finish(self):
        """Wait for the exit (bounded); the rest of stdout and stderr."""
        try:
            self.out, self.err = self.proc.communicate(timeout=LIMIT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.communicate()
        return self.proc.returncode

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.finish()


@pytest.fixture
def program(tmp_path):
    started = []

    def start(*args, **kwargs):
        p = Program(tmp_path, *args, **kwargs)
        started.append(p)
        return p
    yield start
    for p in started:
        p.close()


def _ask(address, line):
    c = socket.create_connection(address, timeout=LIMIT)
    with c, c.makefile("rb") as f:
        c.sendall(line)
        return f.readline()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_gracefully_and_a_running_handler_finishes(program, sig):
    p = program("threads")
    assert _ask(p.address, b"hi\n") == b"ok hi\n"
    c = socket.create_connection(p.address, timeout=LIMIT)
    with c, c.makefile("rb") as f:
        c.sendall(b"hold\n")
        assert f.readline() == b"started\n"
        p.proc.send_signal(sig)
        p.expect_err("stopped accepting; 1 handler(s) running get up to 5 s")
        c.sendall(b"late\n")                        # after the stop: still served
        assert f.readline() == b"done late\n"
    assert p.finish() == 0, p.err
    assert p.out.splitlines()[-1] == b"ended 0 restored True"
    assert b"Traceback" not in p.err and b"ended 1" not in p.err
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(p.address, timeout=LIMIT).close()


@pytest.mark.parametrize("kind", ["fl-sync", "std-sync"])
def test_clients_queued_at_the_stop_are_served_not_reset(program, kind):
    # A one-at-a-time server whose handler waits: the next clients wait in
    # the kernel's accept queue (or the loop's batch) when the signal comes.
    p = program(kind)
    holder = socket.create_connection(p.address, timeout=LIMIT)
    f = holder.makefile("rb")
    queued = []
    try:
        holder.sendall(b"hold\n")
        assert f.readline() == b"started\n"
        for i in range(4):
            c = socket.create_connection(p.address, timeout=LIMIT)
            queued.append(c)
            c.sendall(b"q%d\n" % i)
        p.proc.send_signal(signal.SIGTERM)
        p.expect_out("stopping")
        holder.sendall(b"go\n")                 # the handler returns: the loop ends
        assert f.readline() == b"done go\n"
        for i, c in enumerate(queued):
            with c.makefile("rb") as reply:
                assert reply.readline() == b"ok q%d\n" % i     # not ECONNRESET
    finally:
        f.close()
        holder.close()
        for c in queued:
            c.close()
    assert p.finish() == 0, p.err
    assert p.out.splitlines()[-1] == b"ended 0 restored True"


def test_a_second_signal_ends_a_stuck_handler_at_once(program):
    p = program("threads", grace=120)
    c = socket.create_connection(p.address, timeout=LIMIT)
    with c, c.makefile("rb") as f:
        c.sendall(b"hold\n")
        assert f.readline() == b"started\n"     # it waits for a line that never comes
        p.proc.send_signal(signal.SIGTERM)
        p.expect_err("stopped accepting; 1 handler(s) running get up to 120 s")
        p.proc.send_signal(signal.SIGINT)       # well inside the 120 s of grace
        assert p.finish() == 0, p.err
        assert f.readline() == b""              # its connection was shut down
    assert p.out.splitlines()[-1] == b"ended 1 restored True"
    assert b"ended 1 handler(s) still running on a second signal" in p.err


def test_the_grace_ends_a_stuck_handler_process(program):
    p = program("forking", grace=0.2)
    c = socket.create_connection(p.address, timeout=LIMIT)
    with c, c.makefile("rb") as f:
        c.sendall(b"hold\n")
        assert f.readline() == b"started\n"
        p.proc.send_signal(signal.SIGTERM)
        assert p.finish() == 0, p.err
        assert f.readline() == b""              # its process was ended
    assert p.out.splitlines()[-1] == b"ended 1 restored True"
    assert b"ended 1 handler(s) still running after 0.2 s" in p.err


def test_a_forked_handler_does_not_inherit_the_signal_handling(program):
    p = program("forking")
    assert _ask(p.address, b"who\n") == b"True True True True\n"
    p.proc.send_signal(signal.SIGTERM)
    assert p.finish() == 0, p.err


def test_sigusr1_and_the_interval_ask_for_the_counters(program):
    p = program("threads", interval="0")        # on_stats, no interval: SIGUSR1 only
    p.proc.send_signal(signal.SIGUSR1)
    p.expect_out("stats")
    p.proc.send_signal(signal.SIGUSR1)
    p.expect_out("stats")
    p.proc.send_signal(signal.SIGTERM)
    assert p.finish() == 0, p.err
    q = program("threads", interval="0.05")
    q.expect_out("stats")
    q.expect_out("stats")
    q.proc.send_signal(signal.SIGTERM)
    assert q.finish() == 0, q.err


def test_a_failing_loop_is_stopped_and_its_exception_raised(program):
    p = program("failing")
    assert p.finish() == 0, p.err
    lines = p.out.splitlines()
    assert lines[-2:] == [b"raised the loop failed", b"ended -1 restored True"]


def test_bad_arguments_are_refused_before_anything_runs():
    server = object()       # never reached
    with pytest.raises(ValueError, match="grace=-1"):
        fastlisten.serve_until_signalled(server, grace=-1)
    with pytest.raises(ValueError, match="stats_interval needs on_stats"):
        fastlisten.serve_until_signalled(server, stats_interval=1.0)
    with pytest.raises(TypeError, match="stats_interval must be a number"):
        fastlisten.serve_until_signalled(server, stats_interval="1")


def test_signals_are_handled_in_the_main_thread_only():
    failed = []

    def other():
        try:
            with running.Signals():
                pass
        except RuntimeError as exc:
            failed.append(str(exc))
    t = threading.Thread(target=other)
    t.start()
    t.join(LIMIT)
    assert failed and "main thread" in failed[0]


def test_signals_count_and_wake_the_waiting_thread():
    before = signal.getsignal(signal.SIGUSR2), signal.getsignal(signal.SIGUSR1)
    with running.Signals([signal.SIGUSR2, signal.SIGUSR1]) as s:
        r, w = os.pipe()
        try:
            assert s.first is None
            os.kill(os.getpid(), signal.SIGUSR2)
            assert s.wait(LIMIT) == []          # woken by the signal, not the timeout
            os.kill(os.getpid(), signal.SIGUSR1)
            assert s.wait(LIMIT) == []
            assert s.count() == 2 and s.count(signal.SIGUSR2) == 1
            assert s.first == signal.SIGUSR2
            os.write(w, b"x")
            assert s.wait(LIMIT, [r]) == [r]
        finally:
            os.close(r)
            os.close(w)
    assert (signal.getsignal(signal.SIGUSR2), signal.getsignal(signal.SIGUSR1)) == before


def test_signals_in_order_through_a_callback_and_a_waker_of_the_callers():
    from fastlisten._wakeup import Waker

    seen = []
    waker = Waker(pipe=True)
    try:
        with running.Signals([signal.SIGUSR2, signal.SIGUSR1], seen.append, waker) as s:
            assert s.waker is waker
            for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGUSR1):
                os.kill(os.getpid(), sig)
            s.wait(LIMIT)                       # the handlers have run
            assert seen == [signal.SIGUSR1, signal.SIGUSR2, signal.SIGUSR1]
            assert signal.set_wakeup_fd(-1) == waker.write_fileno()   # the caller's pipe
            signal.set_wakeup_fd(waker.write_fileno(), warn_on_full_buffer=False)
        assert waker.fileno() >= 0
        waker.wakeup()                          # left open for its owner
        waker.drain()
    finally:
        waker.close()
