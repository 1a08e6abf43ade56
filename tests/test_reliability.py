"""Reliability: what a server holds open, under a low descriptor limit and
slow clients, and what survives faults and races.

Bounded in count and time, on loopback, with no timing asserts; each test
that could hang waits on a real event with a deadline.
"""

import os
import socket
import socketserver
import subprocess
import sys
import textwrap
import threading

import pytest

import fastlisten
import fastlisten.server as fs
from helpers import wait_for

LOOPBACK = ("127.0.0.1", 0)


def _read_line(sock):
    return sock.makefile("rb").readline()


def _queued(server):
    """Connections waiting in a server's accept queue (TCP_INFO)."""
    with fastlisten.Listener(server.socket.family, fileno=server.socket.fileno(),
                             owned=False) as view:
        return view.queue()[0]


# -- descriptors a server holds -------------------------------------------------

_LOW_LIMIT_SERVER = textwrap.dedent("""
    import os, resource, socketserver, sys, threading
    import fastlisten.server as fs
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    total = int(sys.argv[1])
    failures, handled, done = [], [], threading.Event()

    class OpensAFile(socketserver.BaseRequestHandler):
        def handle(self):
            try:
                with open(os.devnull, "rb"):
                    pass
                reply = b"ok\\n"
            except OSError as exc:
                failures.append(exc.errno)
                reply = b"failed\\n"
            self.request.sendall(reply)
            handled.append(1)
            if len(handled) == total:
                done.set()

    with fs.TCPServer(("127.0.0.1", 0), OpensAFile) as server:
        print(server.server_address[1], flush=True)
        sys.stdin.readline()            # the clients are queued: serve them
        t = threading.Thread(target=server.serve_forever)
        t.start()
        done.wait(60)
        server.shutdown()
        t.join()
    print(len(failures), len(handled), flush=True)
""")


def test_a_synchronous_server_leaves_its_handler_descriptors_at_a_low_limit():
    """With RLIMIT_NOFILE=64 and 100 connections queued, a handler that
    opens a file must be able to: the server's batch (whose connections are
    held open while the handler runs) is cut to a share of the headroom.
    (A batch of 64 took every free descriptor and the handlers' open()
    failed with EMFILE.)"""
    clients_n = 100
    proc = subprocess.Popen([sys.executable, "-c", _LOW_LIMIT_SERVER, str(clients_n)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    clients = []
    try:
        port = int(proc.stdout.readline())
        clients = [socket.create_connection(("127.0.0.1", port), timeout=30)
                   for _ in range(clients_n)]
        proc.stdin.write("go\n")
        proc.stdin.flush()
        replies = [_read_line(c) for c in clients]
        out, _ = proc.communicate(timeout=60)
    finally:
        for c in clients:
            c.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert replies == [b"ok\n"] * clients_n
    assert out.split() == ["0", str(clients_n)]      # no failure; every request handled


class _WaitsForAByte(socketserver.BaseRequestHandler):
    def handle(self):
        if self.request.recv(1):
            self.request.sendall(b"x")


def test_max_queued_bounds_the_connections_a_threading_server_holds():
    """With max_threads=2 and max_queued=2, silent clients: the server takes
    4 connections (2 handled, 2 queued) and leaves the rest in the kernel's
    accept queue, instead of holding a whole batch open while it waits."""

    class Server(fs.ThreadingTCPServer):
        max_threads = 2
        max_queued = 2

    clients_n = 12
    server = Server(LOOPBACK, _WaitsForAByte)
    t = threading.Thread(target=server.serve_forever)
    clients = []
    try:
        t.start()
        clients = [socket.create_connection(server.server_address, timeout=30)
                   for _ in range(clients_n)]
        wait_for(lambda: server.counters().get("accepted") == 4
                 and _queued(server) == clients_n - 4)
        for c in clients:              # every client is served in the end
            c.sendall(b"x")
        assert [c.recv(1) for c in clients] == [b"x"] * clients_n
        assert server.counters()["accepted"] == clients_n
    finally:
        for c in clients:
            c.close()                   # a handler still waiting sees EOF
        server.shutdown()
        server.server_close()
        t.join(10)
    assert not t.is_alive()


def test_shutdown_ends_a_wait_for_room_in_the_queue():
    class Server(fs.ThreadingTCPServer):
        max_threads = 1
        max_queued = 1
        daemon_threads = True
        block_on_close = False

    server = Server(LOOPBACK, _WaitsForAByte)
    t = threading.Thread(target=server.serve_forever)
    clients = []
    try:
        t.start()
        clients = [socket.create_connection(server.server_address, timeout=30)
                   for _ in range(4)]
        wait_for(lambda: server.counters().get("accepted") == 2)
        done = threading.Thread(target=server.shutdown)
        done.start()
        done.join(10)
        assert not done.is_alive()          # the loop stopped waiting for room
    finally:
        for c in clients:
            c.close()                        # the handlers see EOF and end
        server.server_close()
        t.join(10)
    assert not t.is_alive()


# -- SIGINT under load --------------------------------------------------------

_INTERRUPTED_SERVER = textwrap.dedent("""
    import errno, socketserver, sys, threading
    import fastlisten.server as fs
    from fastlisten import _workers
    where = sys.argv[1]
    errors = []

    class Echo(socketserver.BaseRequestHandler):
        def handle(self):
            try:
                data = self.request.recv(1)
                self.request.sendall(data + b"k")
            except OSError as exc:
                errors.append(exc.errno)

    # Ctrl-C lands just after the request was handed to a worker thread:
    # as the pool's submit() returns, or while Thread.start() waits for the
    # new thread (the thread exists and runs the handler).
    if where == "after-submit":
        real_submit = _workers.WorkerPool.submit
        def submit(self, *args, **kwargs):
            real_submit(self, *args, **kwargs)
            raise KeyboardInterrupt
        _workers.WorkerPool.submit = submit
    else:
        real_start = threading.Thread.start
        def start(self):
            real_start(self)
            raise KeyboardInterrupt
        threading.Thread.start = start

    server = fs.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    print(server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    sys.stdin.readline()        # the client has sent its byte
    server.server_close()       # waits for the handler (block_on_close)
    print(len(errors), flush=True)
""")


@pytest.mark.parametrize("where", ["after-submit", "in-thread-start"])
def test_sigint_does_not_close_a_request_a_worker_thread_already_has(where):
    """A KeyboardInterrupt in the serving thread just after a request went to
    a worker thread must leave that request to the worker: the main thread
    closing it made the handler fail with EBADF (the stdlib does that)."""
    proc = subprocess.Popen([sys.executable, "-c", _INTERRUPTED_SERVER, where],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            assert proc.stdout.readline() == "interrupted\n"
            client.sendall(b"o")
            reply = client.recv(2)
        out, _ = proc.communicate("go\n", timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert (reply, out) == (b"ok", "0\n")
