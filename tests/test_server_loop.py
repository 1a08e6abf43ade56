"""The socketserver loop, timed and counted: batches, shutdown() waking the
loop on each of its paths, and a batch dropped once shutdown is asked.

Written against mutations the rest of the suite let through (issue 14;
tests/mutations/ lists them).  Every serve_forever runs in a daemon thread
and every shutdown() is bounded (helpers.shutdown_within): a loop that is
not woken fails the test instead of hanging the run.
"""

import os
import socket
import socketserver
import threading

import pytest
from helpers import NO_SYSCALL_TABLE, in_poll, read_all, serve_in_thread, shutdown_within, wait_for

import fastlisten

LIMIT = 10.0
needs_syscall_table = pytest.mark.skipif(NO_SYSCALL_TABLE is not None,
                                         reason=str(NO_SYSCALL_TABLE))


def queued(sock):
    """Connections waiting in a listening socket's accept queue (TCP_INFO)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int.from_bytes(info[24:28], "little")      # tcpi_unacked


class Hello(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(b"hello\n")


class Verifying(fastlisten.TCPServer):
    """A server with its own verify_request: connections go through the
    stdlib's chain of hooks instead of the inline path."""

    def verify_request(self, request, client_address):
        return super().verify_request(request, client_address)


class OwnGetRequest(fastlisten.TCPServer):
    """A server with its own get_request: served by the selector loop."""

    def get_request(self):
        return super().get_request()


@pytest.mark.parametrize("cls", [fastlisten.TCPServer, Verifying])
def test_connections_queued_before_serving_are_taken_in_one_batch(cls):
    """The serving thread takes up to fl_accept_batch_size (64) connections per
    wake-up: 20 already queued come out of the core in one batch.
    (ThreadingMixIn's worker threads accept for themselves instead.)"""
    n = 20
    with cls(("127.0.0.1", 0), Hello) as server:
        clients = [socket.create_connection(server.server_address, timeout=LIMIT)
                   for _ in range(n)]
        try:
            wait_for(lambda: queued(server.socket) == n)
            t = serve_in_thread(server)
            try:
                assert [read_all(c) for c in clients] == [b"hello\n"] * n
            finally:
                shutdown_within(server, t, LIMIT)
            counters = server.counters()
        finally:
            for c in clients:
                c.close()
    assert counters["accepted"] == n
    assert counters["max_batch"] == n and counters["batches"] == 1


def _udp(address, handler):
    return fastlisten.UDPServer(address, handler)


@needs_syscall_table
@pytest.mark.parametrize("make", [fastlisten.TCPServer, Verifying, OwnGetRequest, _udp,
                                  fastlisten.ThreadingTCPServer],
                         ids=["fast-loop", "fast-loop-hooks", "selector-loop", "udp",
                              "threading"])
def test_shutdown_wakes_a_loop_blocked_in_its_wait(make):
    """With poll_interval=30 the loop sits in poll() for 30 s unless
    shutdown() wakes it: shutdown() returns in under a second."""
    server = make(("127.0.0.1", 0), Hello)
    try:
        t = serve_in_thread(server, 30)
        wait_for(lambda: t.native_id is not None and in_poll(t.native_id))
        took = shutdown_within(server, t, limit=2.0)
    finally:
        server.server_close()
    assert took < 1.0, f"shutdown() took {took:.3f} s"


@pytest.mark.parametrize("then", ["server_close", "serve_queued"])
@pytest.mark.parametrize("cls", [fastlisten.TCPServer, Verifying],
                         ids=["inline-hooks", "stdlib-hooks"])
def test_the_rest_of_a_batch_is_kept_once_shutdown_is_asked(cls, then):
    """README difference 1: connections taken in a batch but not yet handed
    to the server when shutdown() is asked are kept: server_close() closes
    them unhandled, serve_queued() hands them to the server."""
    handled, stoppers = [], []

    class AskShutdown(socketserver.BaseRequestHandler):
        def handle(self):
            handled.append(self.client_address)
            self.request.sendall(b"handled\n")
            if len(handled) == 1:
                # shutdown() from the serving thread would deadlock: ask from another
                stopper = threading.Thread(target=self.server.shutdown, daemon=True)
                stoppers.append(stopper)
                stopper.start()
                wait_for(lambda: self.server._BaseServer__shutdown_request, LIMIT)

    with cls(("127.0.0.1", 0), AskShutdown) as server:
        clients = [socket.create_connection(server.server_address, timeout=LIMIT)
                   for _ in range(3)]
        try:
            wait_for(lambda: queued(server.socket) == 3)
            t = serve_in_thread(server)
            t.join(LIMIT)
            for stopper in stoppers:
                stopper.join(LIMIT)
            assert not t.is_alive() and not any(s.is_alive() for s in stoppers)
            if then == "serve_queued":
                assert server.serve_queued() == 2
            server.server_close()
            replies = [read_all(c) for c in clients]
        finally:
            for c in clients:
                c.close()
    if then == "serve_queued":
        assert replies == [b"handled\n"] * 3
        assert len(handled) == 3
    else:
        assert replies == [b"handled\n", b"", b""]
        assert len(handled) == 1


@pytest.mark.parametrize("cls", [fastlisten.TCPServer, Verifying],
                         ids=["inline-hooks", "stdlib-hooks"])
def test_the_client_sees_eof_when_its_handler_returns_though_a_file_lingers(cls):
    """As the stdlib's shutdown_request: SHUT_WR before close, so the client
    sees end of file even while a makefile() object of the handler still
    holds the socket open."""
    lingering = []

    class KeepsAFile(socketserver.BaseRequestHandler):
        def handle(self):
            lingering.append(self.request.makefile("rb"))
            self.request.sendall(b"bye\n")

    with cls(("127.0.0.1", 0), KeepsAFile) as server:
        t = serve_in_thread(server)
        try:
            with socket.create_connection(server.server_address, timeout=5) as c:
                reply = read_all(c)       # socket.timeout if no EOF comes
        finally:
            shutdown_within(server, t, LIMIT)
            for f in lingering:
                f.close()
    assert reply == b"bye\n" and len(lingering) == 1


def _holds_a_connection_from(port):
    """Whether this process has a descriptor of a socket connected to a
    client at 127.0.0.1:port."""
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue        # not a socket (or the listing's own descriptor)
        with sock:
            try:
                if sock.getpeername() == ("127.0.0.1", port):
                    return True
            except OSError:
                pass
    return False


@pytest.mark.skipif(not hasattr(os, "fork"), reason="ForkingMixIn needs os.fork")
@pytest.mark.forks_beside_test_threads
def test_a_forked_handler_holds_no_connection_but_its_own():
    """ForkingMixIn takes one connection per wake-up: a child forked while
    the rest of a batch sat in the parent would hold those connections open
    for as long as it runs."""
    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            other = int(self.rfile.readline())      # the port of another client
            self.wfile.write(b"held\n" if _holds_a_connection_from(other) else b"free\n")

    with fastlisten.ForkingTCPServer(("127.0.0.1", 0), Handler) as server:
        first = socket.create_connection(server.server_address, timeout=5)
        second = socket.create_connection(server.server_address, timeout=5)
        with first, second:
            first.sendall(b"%d\n" % second.getsockname()[1])
            second.sendall(b"%d\n" % first.getsockname()[1])
            wait_for(lambda: queued(server.socket) == 2)
            t = serve_in_thread(server)
            try:
                replies = read_all(first), read_all(second)
            finally:
                shutdown_within(server, t, LIMIT)
    assert replies == (b"free\n", b"free\n")


_FORKING_IN_THE_MAIN_THREAD = r'''
import json, os, signal, socket, ssl, subprocess, sys, threading
import socketserver
import fastlisten

module = {"stdlib": socketserver, "fastlisten": fastlisten}[sys.argv[1]]
mode, cert, key = sys.argv[2:5]
at_fork = []


def before_fork():      # (Python threads, threads of the process) at each fork
    with open("/proc/self/stat", "rb") as f:
        at_fork.append((threading.active_count(),
                        int(f.read().rsplit(b")", 1)[1].split()[17])))


os.register_at_fork(before=before_fork)


class Upper(module.StreamRequestHandler):
    def handle(self):
        self.wfile.write(self.rfile.readline().upper())


class Stop(BaseException):     # not an Exception, which handle_error would swallow
    pass


stopping = []


def stop(signum, frame):        # raising here could land where it is swallowed
    stopping.append(signum)     # (in logging's at-fork hook, say)


class Server(module.ForkingTCPServer):
    if mode == "proxy":
        listen_config = fastlisten.ListenConfig(proxy_protocol="v1")
    elif mode == "tls":
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        listen_config = fastlisten.ListenConfig(ssl_context=context)

    def service_actions(self):          # every poll_interval, in the loop
        super().service_actions()
        if stopping:
            raise Stop


server = Server(("127.0.0.1", 0), Upper)
client = subprocess.Popen([sys.executable, "-c", CLIENT, str(server.server_address[1]), mode,
                           cert, str(os.getpid()), "SIGUSR1"], stdout=subprocess.PIPE)
signal.signal(signal.SIGUSR1, stop)
try:
    server.serve_forever(0.05)       # here, in the main thread, as a program does
except Stop:
    pass
finally:
    server.server_close()
print(json.dumps({"replies": client.communicate(timeout=30)[0].decode().split(),
                  "at_fork": at_fork}))
'''

_CLIENT = r'''
import os, signal, socket, ssl, sys
port, mode, cert, server, stop = sys.argv[1:6]
port, server = int(port), int(server)
for i in range(3):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        if mode == "proxy":
            c.sendall(b"PROXY TCP4 192.0.2.1 192.0.2.2 5000 80\r\n")
        if mode == "tls":
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.load_verify_locations(cert)
            c = ctx.wrap_socket(c, server_hostname="localhost")
        c.sendall(b"ping%d\n" % i)
        print(c.makefile("rb").readline().decode().strip(), flush=True)
        c.close()
os.kill(server, getattr(signal, stop))
'''


@pytest.mark.skipif(not hasattr(os, "fork"), reason="ForkingMixIn needs os.fork")
@pytest.mark.parametrize("module, mode", [
    ("stdlib", "plain"), ("fastlisten", "plain"), ("fastlisten", "proxy"), ("fastlisten", "tls")])
def test_a_forking_server_forks_from_its_only_thread(module, mode, tmp_path):
    """Where the stdlib's ForkingTCPServer forks from a process with no other
    thread (serve_forever in a program's main thread), so does fastlisten's,
    with PROXY headers and TLS too: every fork sees one thread, and CPython
    (3.12 on) has no multi-threaded fork to warn about."""
    import json
    import subprocess
    import sys

    cert = key = ""
    if mode == "tls":
        from tlsutil import make_cert
        cert, key = make_cert(tmp_path)
    script = _FORKING_IN_THE_MAIN_THREAD.replace("CLIENT,", repr(_CLIENT) + ",")
    proc = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", script,
                           module, mode, cert, key], capture_output=True, text=True, timeout=40)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "multi-threaded" not in proc.stderr, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["replies"] == ["PING0", "PING1", "PING2"]
    assert result["at_fork"] == [[1, 1]] * 3


_SUPERVISOR = r'''
import json, os, subprocess, sys, threading
import fastlisten

supervisor, at_fork = os.getpid(), []


def before_fork():      # in the supervisor: (Python threads, threads of the process)
    if os.getpid() == supervisor:
        with open("/proc/self/stat", "rb") as f:
            at_fork.append((threading.active_count(),
                            int(f.read().rsplit(b")", 1)[1].split()[17])))


os.register_at_fork(before=before_fork)


class Upper(fastlisten.StreamRequestHandler):
    def handle(self):
        self.wfile.write(self.rfile.readline().upper())


workers = fastlisten.Workers(fastlisten.ThreadingTCPServer, ("127.0.0.1", 0), Upper, workers=2)
workers.bind()
client = subprocess.Popen([sys.executable, "-c", CLIENT, str(workers.address[1]), "plain", "",
                           str(os.getpid()), "SIGTERM"], stdout=subprocess.PIPE)
assert workers.run() == 0
print(json.dumps({"replies": client.communicate(timeout=30)[0].decode().split(),
                  "at_fork": at_fork}))
'''


@pytest.mark.skipif(not hasattr(os, "fork"), reason="Workers needs os.fork")
def test_the_supervisor_forks_its_workers_from_its_only_thread():
    """Workers' supervisor, run from a program's main thread, forks each
    worker from a process with no other thread (CPython 3.12+ has no
    multi-threaded fork to warn about), even with threaded servers."""
    import json
    import subprocess
    import sys

    script = _SUPERVISOR.replace("CLIENT,", repr(_CLIENT) + ",")
    proc = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", script],
                          capture_output=True, text=True, timeout=40)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "multi-threaded" not in proc.stderr, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["replies"] == ["PING0", "PING1", "PING2"]
    assert result["at_fork"] == [[1, 1]] * 2
