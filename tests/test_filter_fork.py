"""The accept filter across a fork (issue 19): a process forked while
connections wait in the filter (ForkingMixIn's handlers, os.fork in a
handler) holds copies of their descriptors and of the filter's epoll set.
Its copies are closed at the fork (an os.register_at_fork hook), never
taken out of the epoll set (which is the parent's too): a connection the
parent drops meanwhile is closed for its peer at once, not when the child
exits, and the parent's filter keeps watching the others.

Both cores in one run (the ``core`` fixture, as in test_accept_filter.py);
real loopback sockets; the children block until the test releases them,
with bounded waits everywhere."""

import os
import select
import socket

import pytest
from test_accept_filter import core  # noqa: F401  (autouse: every Listener on each core)
from test_socketserver_diff import LIMIT, serving, wait_for

import fastlisten
from fastlisten import ListenConfig


def _inode_of_peer(client):
    """The inode of the server side of client's TCP connection, from
    /proc/net/tcp (local: the server's address, remote: the client's)."""
    def hexaddr(addr):
        host, port = addr
        return "%08X:%04X" % (int.from_bytes(socket.inet_aton(host), "little"), port)
    local, remote = hexaddr(client.getpeername()), hexaddr(client.getsockname())
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == local and fields[2] == remote:
                return int(fields[9])
    raise AssertionError(f"no server side of {client.getsockname()} in /proc/net/tcp")


def _holds(pid, inode):
    """Process pid has a descriptor of the socket with that inode."""
    want = f"socket:[{inode}]"
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            if os.readlink(f"{base}/{name}") == want:
                return True
        except FileNotFoundError:
            pass
    return False


def _closed_by_server(c):
    """EOF (or a reset) on c within LIMIT; False if the wait runs out."""
    c.settimeout(LIMIT)
    try:
        return c.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


@pytest.fixture
def held(tmp_path):
    """held(drop, **config) -> (server, release): a ForkingTCPServer with
    the accept filter (rule 'line'), whose handler tells the test its pid
    (held.pids()) and then blocks until release() (or LIMIT)."""
    started_r, started_w = os.pipe()
    release_r, release_w = os.pipe()
    released = []

    class Held(fastlisten.StreamRequestHandler):
        def handle(self):
            line = self.rfile.readline()
            os.write(started_w, b"%d\n" % os.getpid())
            select.select([release_r], [], [], LIMIT)
            self.wfile.write(line)

    def make(**config):
        cls = type("HeldServer", (fastlisten.ForkingTCPServer,),
                   {"listen_config": ListenConfig(ready_rule="line", **config)})
        server = cls(("127.0.0.1", 0), Held)
        return server

    def started():
        """The pid of the next child whose handler runs (bounded wait)."""
        r, _, _ = select.select([started_r], [], [], LIMIT)
        assert r, "no handler started"
        return int(os.read(started_r, 32).split(b"\n")[0])

    def release():
        """Every child's wait ends: a byte in the pipe, which none reads (a
        close would not do: each child holds the write end too)."""
        if not released:
            os.write(release_w, b"x")
            released.append(True)

    make.started = started
    make.release = release
    yield make
    release()
    for fd in (started_r, started_w, release_r, release_w):
        os.close(fd)


def _connect(server, data=b""):
    c = socket.create_connection(server.server_address, timeout=LIMIT)
    if data:
        c.sendall(data)
    return c


def _waiting(server, n):
    wait_for(lambda: server.counters().get("waiting", 0) == n)


@pytest.mark.forks_beside_test_threads
@pytest.mark.parametrize("drop", ["evicted", "expired", "shutdown"])
def test_a_connection_dropped_while_a_child_runs_is_closed_at_once(held, drop):
    # a waits in the filter when b's child is forked; the parent then drops
    # a (evicted by c, expired, or closed by shutdown) while the child still
    # runs: a sees EOF then, and the child never held a's descriptor after
    # the fork.
    timeout = 3.0 if drop == "expired" else 60.0
    # room for two: b may wait a moment (its line comes after its connect)
    server = held(ready_timeout=timeout, max_waiting=2)
    clients = []
    try:
        with serving(server, 0.05):
            a = _connect(server)
            clients.append(a)
            _waiting(server, 1)
            inode = _inode_of_peer(a)
            clients.append(_connect(server, b"b\n"))
            child = held.started()
            # a was waiting at the fork (the handler runs after it)
            assert server.counters()["waiting"] == 1
            assert not _holds(child, inode)
            if drop == "evicted":
                clients.append(_connect(server))
                _waiting(server, 2)
                clients.append(_connect(server))    # one too many: a goes
            elif drop == "shutdown":
                server.shutdown()
            assert _closed_by_server(a)      # before the child is released
            assert server.counters()["dropped"].get(drop) == 1
            held.release()
    finally:
        held.release()
        for c in clients:
            c.close()


@pytest.mark.forks_beside_test_threads
def test_the_parent_still_watches_what_waits_after_a_fork(held):
    # The child lets go of its copies without touching the epoll set, which
    # it shares with the parent: a connection that waited across the fork
    # and speaks after it is still seen by the parent's filter, and served.
    server = held(ready_timeout=60.0)
    clients = []
    try:
        with serving(server, 0.05):
            a = _connect(server)
            clients.append(a)
            _waiting(server, 1)
            b = _connect(server, b"b\n")
            clients.append(b)
            held.started()
            a.sendall(b"a\n")
            held.started()
            held.release()
            a.settimeout(LIMIT)
            b.settimeout(LIMIT)
            assert a.recv(10) == b"a\n" and b.recv(10) == b"b\n"
    finally:
        held.release()
        for c in clients:
            c.close()
