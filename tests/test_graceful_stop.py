"""A graceful stop serves what the kernel had queued (issue 21, section 2):
``fastlisten serve`` under load, in one process and with workers, is sent
SIGTERM; every client's connection is either served or refused (the port is
closed), never reset.  And the library call behind it, serve_queued()."""

import errno
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading

import pytest
from helpers import serve_in_thread, shutdown_within, wait_for

import fastlisten

FL = [sys.executable, "-m", "fastlisten"]
CLIENTS = 16
PER_CLIENT = 5000       # a bound on each client's connections


class _Load:
    """CLIENTS threads, each connecting, sending a line and reading it back
    over and over until the port refuses (or PER_CLIENT connections)."""

    def __init__(self, address):
        self.address = address
        self.lock = threading.Lock()
        self.counts = {"served": 0, "refused": 0, "reset": 0, "unanswered": 0}
        self.served_by = [0] * CLIENTS
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                        for i in range(CLIENTS)]
        for t in self.threads:
            t.start()

    def _count(self, what, i=None):
        with self.lock:
            self.counts[what] += 1
            if i is not None:
                self.served_by[i] += 1

    def _client(self, i):
        for _ in range(PER_CLIENT):
            try:
                with socket.create_connection(self.address, timeout=60) as c:
                    c.sendall(b"ping\n")
                    c.shutdown(socket.SHUT_WR)
                    reply = b""
                    while True:
                        data = c.recv(64)
                        if not data:
                            break
                        reply += data
            except ConnectionRefusedError:
                self._count("refused")
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNRESET, errno.EPIPE):
                    self._count("reset")
                    continue
                raise
            self._count("served" if reply == b"ping\n" else "unanswered", i)

    def everyone_served(self):
        with self.lock:
            return all(self.served_by)

    def join(self):
        for t in self.threads:
            t.join(timeout=120)
            assert not t.is_alive(), "a client never ended"
        return self.counts


def _start(*args):
    proc = subprocess.Popen(FL + ["serve", "echo", "--bind", "127.0.0.1:0"] + list(args),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"serve did not start: {line!r} {err}")
    host, _, port = line[len("listening on "):].strip().rpartition(":")
    return proc, (host, int(port))


@pytest.mark.parametrize("mode", [
    ["--threads", "1"],
    ["--processes", "2"],
    ["--workers", "2", "--threads", "1"],
    ["--workers", "2", "--threads", "1", "--reuse-port"],
], ids=["threads", "processes", "workers", "workers-reuse-port"])
def test_sigterm_under_load_resets_no_queued_client(mode):
    # One handler at a time per process and 16 clients each waiting for
    # its reply: the accept queue holds several connections at any time.
    proc, address = _start(*mode)
    try:
        load = _Load(address)
        wait_for(load.everyone_served, timeout=60)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        counts = load.join()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert counts["reset"] == 0 and counts["unanswered"] == 0, (counts, err)
    assert counts["refused"] == CLIENTS, counts


@pytest.mark.parametrize("mode", [
    ["--threads", "1"],
    ["--workers", "1", "--threads", "1"],
])
def test_a_client_that_speaks_once_the_stop_began_is_served(mode):
    # serve's default rule for echo ('data'): a client connected before the
    # stop but silent until it began waits in the accept filter; the stop
    # serves it once its request comes (within --grace) instead of
    # resetting it.  The log line says the stop has begun and it waits.
    proc, address = _start(*mode, "--grace", "30")
    lines = []
    accepting, seen = threading.Event(), threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "accepting" in line:
                accepting.set()
            if "waiting in the accept filter" in line:
                seen.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if "--workers" in mode:     # (a stop before the worker is up ends it otherwise)
            assert accepting.wait(30), "".join(lines)
        with socket.create_connection(address, timeout=30) as c:
            proc.send_signal(signal.SIGTERM)
            assert seen.wait(30), "".join(lines)
            c.sendall(b"late\n")
            assert c.recv(64) == b"late\n"
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        reader.join(10)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == 0, "".join(lines)


@pytest.mark.parametrize("max_threads", [None, 1])
def test_serve_queued_serves_what_the_kernel_queued(max_threads):
    # The library call: after shutdown(), the connections the kernel had
    # queued are handed to the handlers; server_close() then resets none.
    # With max_threads=1 the pool's one thread, busy with the first client
    # when the loop stops, must take the queued ones when it is done.
    class Echo(socketserver.StreamRequestHandler):
        def handle(self):
            self.wfile.write(self.rfile.readline())

    class Server(fastlisten.ThreadingTCPServer):
        pass
    Server.fl_max_threads = max_threads

    server = Server(("127.0.0.1", 0), Echo)
    clients = []
    try:
        thread = serve_in_thread(server)
        clients.append(socket.create_connection(server.server_address, timeout=10))
        wait_for(lambda: server.counters()["handlers_running"] == 1)
        for i in range(1, 5):
            clients.append(socket.create_connection(server.server_address, timeout=10))
            clients[i].sendall(b"%d\n" % i)
        if max_threads == 1:
            wait_for(lambda: server.counters()["queued"] == 4)
        shutdown_within(server, thread)
        taken = []
        queued = threading.Thread(target=lambda: taken.append(server.serve_queued()),
                                  daemon=True)
        queued.start()
        clients[0].sendall(b"0\n")
        queued.join(10)
        assert taken, "serve_queued() did not return"
        assert server.drain(10) == 0
        for i, c in enumerate(clients):
            assert c.recv(64) == b"%d\n" % i
        if max_threads == 1:
            assert taken == [4]     # (unbounded: the loop's threads took them)
    finally:
        for c in clients:
            c.close()
        server.server_close()


def test_server_close_alone_keeps_the_stdlib_behaviour():
    # Without serve_queued(), server_close() closes the socket as the
    # stdlib's does, and the kernel resets what was queued.
    server = fastlisten.TCPServer(("127.0.0.1", 0), socketserver.StreamRequestHandler)
    try:
        client = socket.create_connection(server.server_address, timeout=10)
    finally:
        server.server_close()
    with client, pytest.raises(ConnectionResetError):
        client.sendall(b"x")
        client.recv(1)


def test_serve_queued_leaves_an_adopted_socket_and_its_queue_alone():
    # A socket passed in (systemd's, fd=) outlives the server: what is
    # queued waits for the next start, and new clients are still taken.
    held = socket.create_server(("127.0.0.1", 0))
    address = held.getsockname()

    class Adopting(fastlisten.ThreadingTCPServer):
        listen_config = fastlisten.ListenConfig(fd=os.dup(held.fileno()))

    try:
        server = Adopting(address, socketserver.StreamRequestHandler)
        try:
            thread = serve_in_thread(server)
            shutdown_within(server, thread)
            with socket.create_connection(address, timeout=10):
                assert server.serve_queued() == 0
        finally:
            server.server_close()
        with socket.create_connection(address, timeout=10):
            held.settimeout(10)
            first, _ = held.accept()        # the one queued during the stop
            second, _ = held.accept()       # and a new one: no door was closed
            first.close()
            second.close()
    finally:
        held.close()


def test_the_bench_stop_scenario_counts_no_loss():
    from fastlisten.benchmark import restarts

    row = restarts.stop_scenario(2, 8)
    assert row["events"] == 2 and row["completed"] >= 16
    assert row["lost"] == 0, row
    assert row["refused_once_closed"] == 16, row
    assert "refused once the port closed: 16" in restarts.to_text(
        {"concurrency": 8, "cpus": 2, "events": {"stop/one process": row}, "balance": {}})


def test_the_grace_left_counts_from_the_start_of_the_stop():
    """serve_queued(timeout) gives the connections waiting in the accept
    filter what is left of the grace once the kept ones were handed over
    (a wait for room in a bounded pool uses it up too), never more."""
    from time import monotonic

    from fastlisten._queued import grace_left

    assert grace_left(None, monotonic()) is None and grace_left(0, monotonic()) == 0
    assert grace_left(5.0, monotonic() - 2.0) <= 3.0
    assert grace_left(5.0, monotonic() - 9.0) == 0.0
    assert 4.0 < grace_left(5.0, monotonic()) <= 5.0
