"""ThreadingMixIn's leader/follower path: idle worker threads wait for
connections in the core themselves (``Listener.waiter`` and
``accept_many(..., waiter=)``), the kernel gives each connection to one of
them, and that thread runs the request.  The core-level tests run on both
cores (the ``core`` fixture); the server-level ones on the core the suite
runs with (the README runs it twice)."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import pytest
from helpers import POLL_SYSCALLS as _POLL_SYSCALLS
from helpers import end_child
from helpers import in_syscall as _in_syscall
from test_core import LOOPBACK, core, needs_syscall_table  # noqa: F401  (core: autouse, both cores)
from test_socketserver_diff import LIMIT, EchoLine, ask, serving, wait_for

import fastlisten
from fastlisten._wakeup import Waker

_EPOLL_SYSCALLS = {"x86_64": {232, 281}, "aarch64": {22}}.get(os.uname().machine, set())


def _waiting_in_epoll(tids):
    return bool(tids) and all(_in_syscall(t, _EPOLL_SYSCALLS) for t in tids)


def _leading(server):
    return server._fl_loop == "leader"


def _together(n):
    """A handler class whose first n requests wait for each other and for
    the test (``gate.wait()``), so that n workers run at once; and the gate."""
    gate = threading.Barrier(n + 1, timeout=LIMIT)
    calls = []

    class Handler(EchoLine):
        def handle(self):
            calls.append(1)
            if len(calls) <= n:
                gate.wait()
            super().handle()

    return Handler, gate


def _ask_together(server, gate, n):
    """n clients at once (their handlers meet at gate); their answers."""
    answers = []
    askers = [threading.Thread(target=lambda: answers.append(ask(server.server_address)))
              for _ in range(n)]
    for a in askers:
        a.start()
    gate.wait()
    for a in askers:
        a.join(LIMIT)
    return answers


# -- the core: waiters ----------------------------------------------------

def test_a_connection_goes_to_one_waiter_and_the_stop_descriptor_ends_the_rest():
    stop = Waker()
    results, tids = [], []
    with fastlisten.listen(LOOPBACK) as lst:
        def wait():
            tids.append(threading.get_native_id())
            w = lst.waiter(stop.fileno())
            try:
                results.append(lst.accept_many(1, LIMIT, w))
            finally:
                w.close()
        threads = [threading.Thread(target=wait) for _ in range(3)]
        try:
            for t in threads:
                t.start()
            c = socket.create_connection(lst.address, timeout=LIMIT)
            try:
                wait_for(lambda: len(results) == 1)
                assert len(results[0]) == 1      # one waiter took it...
                results[0][0][0].close()
                stop.wakeup()                    # ... the others accepted nothing
                for t in threads:
                    t.join(LIMIT)
                assert results[1:] == [[], []]
                assert lst.stats()["accepted"] == 1
            finally:
                c.close()
        finally:
            stop.wakeup()
            for t in threads:
                t.join(LIMIT)
            stop.close()


def test_a_set_stop_descriptor_accepts_nothing_and_leaves_the_connection_queued():
    stop = Waker()
    with fastlisten.listen(LOOPBACK) as lst, \
            socket.create_connection(lst.address, timeout=LIMIT):
        w = lst.waiter(stop.fileno())
        try:
            stop.wakeup()
            assert lst.accept_many(1, LIMIT, w) == []    # at once, whatever the timeout
            assert lst.accept_many(1, LIMIT, w) == []    # it stays set
            conn, _ = lst.accept(LIMIT)                  # still queued
            conn.close()
        finally:
            w.close()
            stop.close()


def _watched(epfd):
    """The descriptors epoll set ``epfd`` (of this process) watches."""
    with open(f"/proc/self/fdinfo/{epfd}") as f:
        return {int(line.split()[1]) for line in f if line.startswith("tfd:")}


def test_a_fenced_waiter_leaves_the_listeners_wait_queue():
    """fence() takes the listener off its waiters' epoll sets (a waiter made
    after it never had it), and a closed waiter is forgotten."""
    with fastlisten.listen(LOOPBACK) as lst:
        stop = lst.new_stop()
        w, gone = lst.waiter(stop), lst.waiter(stop)
        try:
            assert lst.fileno() in _watched(w.fileno())
            gone.close()
            stop.fence()
            assert lst.fileno() not in _watched(w.fileno())
            late = lst.waiter(stop)
            assert lst.fileno() not in _watched(late.fileno())
            late.close()
        finally:
            w.close()
            gone.close()
            stop.close()


@pytest.mark.skipif(not _EPOLL_SYSCALLS, reason="no syscall table for this machine")
def test_a_fenced_waiter_does_not_take_the_wake_up_of_one_that_still_accepts():
    """With EPOLLEXCLUSIVE the kernel wakes one waiting epoll set per
    connection, the first registered.  A group of waiters that was fenced
    (an old worker stopping after a reload, its idle threads not yet gone)
    must not take that wake-up from a group that still accepts (a new
    worker sharing the socket): the connection would stay queued, unanswered,
    until the next one arrives."""
    with fastlisten.listen(LOOPBACK) as lst:
        old, new = lst.new_stop(), lst.new_stop()
        results = {"old": [], "new": []}
        tids = []

        def wait(stop, name):
            w = lst.waiter(stop)        # made in turn: "old" first in the wait queue
            made.set()
            tids.append(threading.get_native_id())
            try:
                results[name].append(lst.accept_many(1, LIMIT, w))
            finally:
                w.close()
        threads = []
        try:
            for stop, name in ((old, "old"), (new, "new")):
                made = threading.Event()
                threads.append(threading.Thread(target=wait, args=(stop, name)))
                threads[-1].start()
                assert made.wait(LIMIT)
            wait_for(lambda: len(tids) == 2 and _waiting_in_epoll(tids))
            old.fence()                 # old's thread waits on, accepting nothing
            with socket.create_connection(lst.address, timeout=LIMIT):
                threads[1].join(LIMIT)
                assert not threads[1].is_alive()
                assert len(results["new"]) == 1 and len(results["new"][0]) == 1
                results["new"][0][0][0].close()
            assert results["old"] == []
        finally:
            old.set()
            new.set()
            for t in threads:
                t.join(LIMIT)
            old.close()
            new.close()


def test_waiter_arguments_are_checked():
    with fastlisten.listen(LOOPBACK) as a, fastlisten.listen(LOOPBACK) as b:
        w = a.waiter()
        try:
            with pytest.raises(ValueError, match="another listener"):
                b.accept_many(1, 0, w)
        finally:
            w.close()
        assert w.fileno() == -1
        with pytest.raises(ValueError, match="closed"):
            a.accept_many(1, 0, w)
        w.close()       # idempotent


def test_the_counters_miss_nothing_while_waiters_accept_at_once():
    # Waiters count what they accept into one listener's counters (the
    # compiled core's without the GIL); ThreadingMixIn's shutdown waits
    # until every connection "accepted" counts is in a worker's hand, so a
    # lost increment let a worker process exit with a connection in flight
    # (reset).  End to end, bursts drained by all waiters at once: a race
    # shows here only now and then; test_core_c.py's C test catches it
    # every time.
    rounds, burst, waiters = 5, 1000, 4
    handed, lock = [], threading.Lock()
    go = threading.Barrier(waiters + 1, timeout=LIMIT)
    with fastlisten.listen(LOOPBACK, backlog=burst) as lst:
        stop = lst.new_stop()

        def drain():
            w = lst.waiter(stop)
            accept = lst.accept_one_with(w, 0)
            try:
                for _ in range(rounds):
                    go.wait()
                    n = 0
                    while True:
                        batch = accept()
                        if not batch:
                            break
                        n += 1
                        batch[0][0].close()
                    with lock:
                        handed.append(n)
                    go.wait()
            finally:
                w.close()

        threads = [threading.Thread(target=drain) for _ in range(waiters)]
        for t in threads:
            t.start()
        try:
            for _ in range(rounds):
                clients = []
                try:
                    for _ in range(burst):
                        c = socket.socket(lst.family)
                        clients.append(c)
                        c.setblocking(False)
                        c.connect_ex(lst.address)
                    wait_for(lambda: lst.queue()[0] == burst)
                    go.wait()       # drain them all, at once
                    go.wait()       # ... done
                finally:
                    for c in clients:
                        c.close()
        finally:
            go.abort()
            for t in threads:
                t.join(LIMIT)
            stop.set()
            stop.close()
        stats = lst.stats()
    assert sum(handed) == rounds * burst
    assert stats["accepted"] == stats["batches"] == rounds * burst


@needs_syscall_table
def test_close_reaches_every_waiting_worker():
    lst = fastlisten.listen(LOOPBACK)
    errors, tids = [], []

    def wait():
        w = lst.waiter()
        tids.append(threading.get_native_id())
        try:
            lst.accept_many(1, None, w)
        except OSError as exc:
            errors.append(exc)
        finally:
            w.close()

    threads = [threading.Thread(target=wait) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(tids) == 3 and _waiting_in_epoll(tids))
    finally:
        lst.close()
        for t in threads:
            t.join(LIMIT)
    assert not any(t.is_alive() for t in threads)
    assert len(errors) == 3 and lst.closed


# -- the server -------------------------------------------------------------

class Recorder(EchoLine):
    def handle(self):
        self.server.seen.append(("handle", threading.current_thread()))
        super().handle()


def test_workers_run_the_request_and_the_serving_thread_accepts_nothing():
    class S(fastlisten.ThreadingTCPServer):
        seen = []

        def finish_request(self, request, client_address):    # runs in the worker
            self.seen.append(("finish_request", threading.current_thread()))
            super().finish_request(request, client_address)

        def shutdown_request(self, request):
            self.seen.append(("shutdown_request", threading.current_thread()))
            super().shutdown_request(request)

    server = S(("127.0.0.1", 0), Recorder)
    serving_thread = []
    orig = server.serve_forever

    def serve(poll_interval=0.5):
        serving_thread.append(threading.current_thread())
        orig(poll_interval)

    server.serve_forever = serve
    with serving(server):
        wait_for(lambda: _leading(server))
        assert ask(server.server_address) == b"ping\n"
        wait_for(lambda: len(S.seen) == 3)
    assert [name for name, _ in S.seen] == ["finish_request", "handle", "shutdown_request"]
    threads = {t for _, t in S.seen}
    assert len(threads) == 1 and serving_thread[0] not in threads


def test_a_hook_of_the_serving_thread_keeps_todays_path():
    class S(fastlisten.ThreadingTCPServer):
        seen = []

        def verify_request(self, request, client_address):
            self.seen.append(("verify_request", threading.current_thread()))
            return True

    server = S(("127.0.0.1", 0), Recorder)
    t = threading.Thread(target=server.serve_forever)
    t.start()
    try:
        assert ask(server.server_address) == b"ping\n"
        wait_for(lambda: len(S.seen) == 2)
        assert not _leading(server)
    finally:
        server.shutdown()
        t.join(LIMIT)
        server.server_close()
    (v, vt), (h, ht) = S.seen
    assert (v, h) == ("verify_request", "handle") and vt is t and ht is not t


def test_max_threads_leaves_further_connections_in_the_kernel():
    release = threading.Event()
    started = []

    class Handler(EchoLine):
        def handle(self):
            started.append(self.rfile.readline())
            release.wait(LIMIT)
            self.wfile.write(b"done\n")

    class Capped(fastlisten.ThreadingTCPServer):
        fl_max_threads = 2

    server = Capped(("127.0.0.1", 0), Handler)
    clients = []
    try:
        with serving(server):
            wait_for(lambda: _leading(server))
            for i in range(4):
                c = socket.create_connection(server.server_address, timeout=LIMIT)
                c.sendall(b"%d\n" % i)
                clients.append(c)
            wait_for(lambda: len(started) == 2)
            # both threads are busy: nobody accepts, the kernel holds the rest
            wait_for(lambda: server._fl_listener.queue()[0] == 2)
            assert len(server._fl_pool) == 2 and len(server._threads) == 2
            assert server._fl_pool.queued == 0
            release.set()
            for c in clients:
                assert c.makefile("rb").readline() == b"done\n"
            assert sorted(started) == [b"0\n", b"1\n", b"2\n", b"3\n"]
            assert server.counters()["handlers_peak"] == 2
    finally:
        release.set()
        for c in clients:
            c.close()


@needs_syscall_table
def test_shutdown_with_workers_waiting_in_the_kernel():
    Handler, gate = _together(3)
    server = fastlisten.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.serve_forever, args=(None,))
    t.start()
    try:
        wait_for(lambda: _leading(server))
        assert _ask_together(server, gate, 3) == [b"ping\n"] * 3
        # every worker is back in the core, waiting (three, and the one that waited meanwhile)
        pool = server._fl_pool
        wait_for(lambda: pool.busy == 0 and pool._waiting == len(pool) >= 2)
        wait_for(lambda: _waiting_in_epoll([x.native_id for x in list(pool._threads)]))
        server.shutdown()       # poll_interval None: only shutdown() ends the wait
        t.join(LIMIT)
        assert not t.is_alive()
        # none waits in the core once serve_forever returned; the threads exit
        assert pool._waiting == 0 and not _leading(server)
        wait_for(lambda: len(pool) == 0)
    finally:
        server.shutdown()
        t.join(LIMIT)
        server.server_close()


def test_idle_workers_retire_down_to_the_one_that_waits():
    Handler, gate = _together(2)

    class S(fastlisten.ThreadingTCPServer):
        fl_thread_idle_timeout = 0.05

    server = S(("127.0.0.1", 0), Handler)
    with serving(server):
        wait_for(lambda: _leading(server))
        assert _ask_together(server, gate, 2) == [b"ping\n"] * 2
        assert len(server._fl_pool) >= 2
        wait_for(lambda: len(server._fl_pool) == 1)
        assert ask(server.server_address) == b"ping\n"


def test_a_worker_ended_by_system_exit_is_replaced(monkeypatch):
    hooked = []
    monkeypatch.setattr(threading, "excepthook", lambda args: hooked.append(args.exc_type))

    class Handler(EchoLine):
        def handle(self):
            if self.rfile.readline() == b"exit\n":
                raise SystemExit
            self.wfile.write(b"ok\n")

    server = fastlisten.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    with serving(server):
        wait_for(lambda: _leading(server))
        assert ask(server.server_address, b"exit\n") == b""
        wait_for(lambda: hooked == [SystemExit])
        assert ask(server.server_address) == b"ok\n"


def test_a_closed_listener_hands_serving_back_to_the_stdlib_loop():
    server = fastlisten.ThreadingTCPServer(("127.0.0.1", 0), EchoLine)
    t = threading.Thread(target=server.serve_forever)
    t.start()
    try:
        wait_for(lambda: _leading(server))
        server._fl_listener.close()     # every waiting worker gets the error
        wait_for(lambda: not _leading(server))
        assert ask(server.server_address) == b"ping\n"    # the selector loop serves
    finally:
        server.shutdown()
        t.join(LIMIT)
        server.server_close()
    assert not t.is_alive()


@needs_syscall_table
def test_ctrl_c_with_every_worker_blocked(core):  # noqa: F811
    script = textwrap.dedent("""
        import os, signal, sys, fastlisten
        signal.signal(signal.SIGINT, signal.default_int_handler)

        class Handler(fastlisten.BaseRequestHandler):
            def handle(self):
                os.write(1, b"handling\\n")
                self.request.recv(1)        # the client sends nothing

        class S(fastlisten.ThreadingTCPServer):
            fl_max_threads = 2
            daemon_threads = True

        server = S(("127.0.0.1", 0), Handler)
        print(server.server_address[1], flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("interrupted", server._fl_pool._waiting, flush=True)
            server.server_close()
            sys.exit(0)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env=core.env)
    clients = []
    try:
        port = int(proc.stdout.readline())
        for _ in range(3):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=LIMIT))
        assert [proc.stdout.readline().strip() for _ in range(2)] == ["handling"] * 2
        wait_for(lambda: _in_syscall(proc.pid, _POLL_SYSCALLS, pid=proc.pid))
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=LIMIT)
    finally:
        end_child(proc, clients)
    assert proc.returncode == 0 and out.strip() == "interrupted 0"


def test_closing_the_pool_under_a_running_loop_wakes_every_waiting_worker():
    # what happens at interpreter exit while serve_forever runs in a daemon thread
    Handler, gate = _together(2)

    class S(fastlisten.ThreadingTCPServer):
        fl_thread_idle_timeout = 10 * LIMIT      # only the interrupt ends their waits in time

    server = S(("127.0.0.1", 0), Handler)
    with serving(server, poll_interval=None):    # only a wake-up ends its wait
        wait_for(lambda: _leading(server))
        assert _ask_together(server, gate, 2) == [b"ping\n"] * 2
        pool = server._fl_pool
        wait_for(lambda: pool.busy == 0 and pool._waiting == len(pool) >= 2)
        pool.close()
        wait_for(lambda: len(pool) == 0)
        wait_for(lambda: server._fl_loop == "selector")
        assert ask(server.server_address) == b""   # a closed pool runs nothing


def test_the_proxy_header_is_read_by_the_worker_that_handles_the_connection():
    seen = []

    class Handler(EchoLine):
        def handle(self):
            seen.append((threading.current_thread(), self.client_address,
                         self.server.proxy_header.version))
            super().handle()

    class S(fastlisten.ThreadingTCPServer):
        listen_config = fastlisten.ListenConfig(proxy_protocol="v1")

    server = S(("127.0.0.1", 0), Handler)
    with serving(server):
        wait_for(lambda: _leading(server))
        assert ask(server.server_address,
                   b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 80\r\nping\n") == b"ping\n"
        assert server.counters()["proxy_accepted"] == 1
    (thread, address, version), = seen
    assert thread.name.startswith("S-pool") and address == ("203.0.113.9", 40000)
    assert version == 1
