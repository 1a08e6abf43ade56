"""shutdown() under ThreadingMixIn's leader/follower loop returns without
waiting for the idle workers to leave the core: a Stop fences them off the
listening descriptor instead (``Listener.new_stop``; its fence() returns
once no waiter can touch the descriptor, waiting only for one in the
middle of accept4), and they leave on their own afterwards.

The core-level tests run on both cores (the ``core`` fixture); the
server-level ones too (every Listener of a test is built on that core).
Interleavings are made deterministic with the workers' own hooks
(``_LeaderSource.open``/``empty``) and by watching threads in the kernel,
never by sleeping."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import pytest
from helpers import NO_SYSCALL_TABLE, end_child, in_syscall, serve_in_thread, shutdown_within
from test_core import LOOPBACK, core, needs_syscall_table  # noqa: F401  (core: autouse, both cores)
from test_leader_follower import _EPOLL_SYSCALLS, _ask_together, _leading, _together
from test_server_loop import queued
from test_socketserver_diff import LIMIT, EchoLine, ask, wait_for

import fastlisten
import fastlisten.server as server_mod

_ARCH = os.uname().machine
#: accept/accept4, and futex (where a fence() waits), by architecture.
_ACCEPT_SYSCALLS = {"x86_64": {43, 288}, "aarch64": {202, 242}}.get(_ARCH, set())
_FUTEX_SYSCALLS = {"x86_64": {202}, "aarch64": {98}}.get(_ARCH, set())


def _tid_list():
    tids = []
    return tids, lambda: tids.append(threading.get_native_id())


# -- the core: Stop -----------------------------------------------------------

def test_a_gated_waiter_takes_what_is_queued_before_it_waits():
    """A worker back from a request takes the next queued connection with
    one accept4, without an epoll wait: shown by taking the listener out of
    the waiter's epoll set, so that only a take before the wait can find
    it; and a fenced stop takes nothing, queued or not."""
    import select
    with fastlisten.listen(LOOPBACK) as lst:
        stop = lst.new_stop()
        w = lst.waiter(stop)
        ep = select.epoll.fromfd(os.dup(w.fileno()))
        try:
            ep.unregister(lst.fileno())     # the waiter's own epoll set, shared
            with socket.create_connection(lst.address, timeout=LIMIT) as c1, \
                    socket.create_connection(lst.address, timeout=LIMIT) as c2:
                wait_for(lambda: lst.queue()[0] == 2)
                batch = lst.accept_many(1, LIMIT, w)
                assert len(batch) == 1 and batch[0][1] == c1.getsockname()
                batch[0][0].close()
                stop.fence()
                assert lst.accept_many(1, 0.2, w) == []
                assert lst.queue()[0] == 1 and c2.fileno() >= 0
        finally:
            ep.close()
            stop.set()
            w.close()
            stop.close()


@needs_syscall_table
def test_a_fenced_stop_takes_its_waiters_off_the_listener():
    # fence() wakes nobody, and takes the listener off its waiters' epoll
    # sets: a connection does not wake a fenced waiter (with EPOLLEXCLUSIVE
    # that wake-up would be lost to the waiters that still accept); it stays
    # queued, and the waiter accepts nothing until set() ends its wait.
    with fastlisten.listen(LOOPBACK) as lst:
        stop = lst.new_stop()
        w = lst.waiter(stop)
        tids, me = _tid_list()
        got = []

        def wait():
            me()
            got.append(lst.accept_many(1, LIMIT, w))

        t = threading.Thread(target=wait)
        t.start()
        try:
            wait_for(lambda: tids and in_syscall(tids[0], _EPOLL_SYSCALLS))
            stop.fence()
            assert stop.fenced
            with socket.create_connection(lst.address, timeout=LIMIT):
                wait_for(lambda: lst.queue()[0] == 1)       # in the kernel's queue
                assert t.is_alive() and in_syscall(tids[0], _EPOLL_SYSCALLS)
                stop.set()
                t.join(LIMIT)
                assert not t.is_alive() and got == [[]]
                assert lst.stats()["accepted"] == 0
                assert lst.accept_many(1, 0, w) == []   # and so, at once, from now on
                conn, _ = lst.accept(LIMIT)         # (a waiter of no stop takes it)
                conn.close()
        finally:
            stop.set()
            t.join(LIMIT)
            w.close()
            stop.close()


@pytest.mark.skipif(not _ACCEPT_SYSCALLS, reason=f"no syscall table for {_ARCH}")
@needs_syscall_table
def test_fence_returns_only_once_a_waiter_in_the_middle_of_accepting_is_out():
    # The listening descriptor is made blocking, so that the waiter, woken by
    # one connection, takes it and then blocks in its second accept4: it is
    # inside the gate until a second connection arrives.  fence() must not
    # return before that (it is what makes restoring the blocking mode, or
    # closing the descriptor, safe).
    with fastlisten.listen(LOOPBACK) as lst:
        stop = lst.new_stop()
        w = lst.waiter(stop)
        worker_tids, worker_me = _tid_list()
        fencer_tids, fencer_me = _tid_list()
        got, second_sent, fence_saw = [], threading.Event(), []
        clients = []

        def accept():
            worker_me()
            got.append(lst.accept_many(2, LIMIT, w))

        def fence():
            fencer_me()
            stop.fence()
            fence_saw.append(second_sent.is_set())

        os.set_blocking(lst.fileno(), True)
        worker = threading.Thread(target=accept)
        fencer = threading.Thread(target=fence)
        worker.start()
        try:
            clients.append(socket.create_connection(lst.address, timeout=LIMIT))
            wait_for(lambda: worker_tids and in_syscall(worker_tids[0], _ACCEPT_SYSCALLS))
            fencer.start()
            wait_for(lambda: fencer_tids and in_syscall(fencer_tids[0], _FUTEX_SYSCALLS))
            assert fencer.is_alive() and not fence_saw
            second_sent.set()
            clients.append(socket.create_connection(lst.address, timeout=LIMIT))
            worker.join(LIMIT)
            fencer.join(LIMIT)
            assert fence_saw == [True]      # fence() returned after the waiter got out
            assert len(got) == 1 and len(got[0]) == 2
            for conn, _ in got[0]:
                conn.close()
            assert lst.accept_many(1, 0, w) == []
        finally:
            second_sent.set()
            if worker.is_alive():
                clients.append(socket.create_connection(lst.address, timeout=LIMIT))
                worker.join(LIMIT)
            if fencer.ident is not None:
                fencer.join(LIMIT)
            for c in clients:
                c.close()
            w.close()
            stop.close()


def test_set_wakes_every_waiter_and_its_descriptor_closes_with_the_last_one():
    with fastlisten.listen(LOOPBACK) as lst:
        stop = lst.new_stop()
        waiters = [lst.waiter(stop) for _ in range(3)]
        results = []
        threads = [threading.Thread(target=lambda w=w: results.append(
            lst.accept_many(1, LIMIT, w))) for w in waiters]
        for t in threads:
            t.start()
        stop.set()
        stop.set()          # idempotent
        for t in threads:
            t.join(LIMIT)
        assert results == [[], [], []]
        fd = stop.fileno()
        stop.close()
        assert stop.fileno() == fd and os.fstat(fd)     # two waiters still use it
        waiters[0].close()
        waiters[1].close()
        assert stop.fileno() == fd
        waiters[2].close()
        assert stop.fileno() == -1
        # a waiter made late (a worker that had not opened yet) only stops
        late = lst.waiter(stop)
        try:
            assert lst.accept_many(1, LIMIT, late) == []
        finally:
            late.close()
        stop.close()        # idempotent


def test_a_stop_closed_before_it_was_set_takes_no_waiter():
    with fastlisten.listen(LOOPBACK) as lst:
        stop = lst.new_stop()
        stop.close()
        with pytest.raises(ValueError, match="closed"):
            lst.waiter(stop)


# -- the server ---------------------------------------------------------------

def _hold_first(monkeypatch, where):
    """Hold the first worker that reaches ``where`` of _LeaderSource:
    "accept" (about to call into the core, after its waiter was made) or
    "empty" (on its way out, the core having returned nothing).  Returns
    (held, release, threads): events, and the held thread (then its
    source)."""
    held, release, threads = threading.Event(), threading.Event(), []

    def hold(source):
        if not held.is_set():
            threads[:] = [threading.current_thread(), source]
            held.set()
            assert release.wait(LIMIT), "the test did not release the worker"

    if where == "accept":
        orig_open = server_mod._LeaderSource.open

        def open_(self, timeout):
            accept, close = orig_open(self, timeout)

            def held_accept():
                hold(self)
                return accept()
            return held_accept, close
        monkeypatch.setattr(server_mod._LeaderSource, "open", open_)
    else:
        orig_empty = server_mod._LeaderSource.empty

        def empty(self):
            hold(self)
            orig_empty(self)
        monkeypatch.setattr(server_mod._LeaderSource, "empty", empty)
    return held, release, threads


@needs_syscall_table
def test_serve_forever_returns_while_a_worker_is_still_on_its_way_out(monkeypatch):
    held, release, worker = _hold_first(monkeypatch, "empty")
    server = fastlisten.ThreadingTCPServer(("127.0.0.1", 0), EchoLine)
    t = serve_in_thread(server, None)
    try:
        pool = server._fl_get_pool()
        wait_for(lambda: _leading(server) and pool._waiting == len(pool) == 1)
        wait_for(lambda: all(in_syscall(x.native_id, _EPOLL_SYSCALLS) for x in pool._threads))
        # (before: serve_forever waited for the worker, which the test holds)
        shutdown_within(server, t)
        assert held.wait(LIMIT)             # woken, and held on its way out
        assert len(pool) == 1 and pool._waiting == 0 and not _leading(server)
        assert os.get_blocking(server.socket.fileno())     # the mode is back already
        assert server.socket.gettimeout() is None
        stop = worker[1].stop
        assert stop.fenced and stop.fileno() >= 0       # its waiter still holds it
    finally:
        release.set()
        server.server_close()       # block_on_close: waits for the worker
    assert len(pool) == 0
    assert stop.fileno() == -1      # closed with the last waiter


def test_shutdown_then_serve_again_while_a_worker_of_the_first_run_is_leaving(monkeypatch):
    held, release, old = _hold_first(monkeypatch, "empty")
    handled_by = []

    class Handler(EchoLine):
        def handle(self):
            handled_by.append(threading.current_thread())
            super().handle()

    server = fastlisten.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    pool = server._fl_get_pool()
    t = serve_in_thread(server, None)
    try:
        wait_for(lambda: _leading(server) and pool._waiting == len(pool) == 1)
        shutdown_within(server, t)
        assert held.wait(LIMIT)
        # the second run starts while the first run's worker is still there
        t = serve_in_thread(server, None)
        wait_for(lambda: _leading(server) and pool._waiting == 1 and len(pool) == 2)
        assert ask(server.server_address) == b"ping\n"
        release.set()
        wait_for(lambda: not old[0].is_alive())
        # it left without serving, and without taking the second run's count along
        assert old[0] not in handled_by and len(handled_by) == 1
        wait_for(lambda: pool.busy == 0 and pool._waiting == len(pool) >= 1)
        assert ask(server.server_address) == b"ping\n"
    finally:
        release.set()
        shutdown_within(server, t)
        server.server_close()
    assert len(pool) == 0


@needs_syscall_table
def test_shutdown_waits_for_a_connection_accepted_just_before_it(monkeypatch):
    # A worker that accepted a connection before the fence has it in hand
    # (running(), drain()) before serve_forever returns: held between its
    # accept and its bookkeeping, shutdown() waits for it.
    held, release, worker = threading.Event(), threading.Event(), []
    orig_open = server_mod._LeaderSource.open

    def open_(self, timeout):
        accept, close = orig_open(self, timeout)

        def accept_then_hold():
            batch = accept()
            if batch and not held.is_set():
                worker.append(self)
                held.set()
                assert release.wait(LIMIT), "the test did not release the worker"
            return batch
        return accept_then_hold, close
    monkeypatch.setattr(server_mod._LeaderSource, "open", open_)

    server = fastlisten.ThreadingTCPServer(("127.0.0.1", 0), EchoLine)
    t = serve_in_thread(server, None)
    done = threading.Event()
    stopper = threading.Thread(target=lambda: (server.shutdown(), done.set()))
    try:
        with socket.create_connection(server.server_address, timeout=LIMIT) as c:
            assert held.wait(LIMIT)
            stopper.start()
            stop = worker[0].stop
            wait_for(lambda: stop.fenced and in_syscall(t.native_id, _FUTEX_SYSCALLS))
            assert not done.is_set() and t.is_alive()
            release.set()
            assert done.wait(LIMIT)
            t.join(LIMIT)
            c.sendall(b"ping\n")
            assert c.makefile("rb").readline() == b"ping\n"
        assert server.drain(LIMIT) == 0
    finally:
        release.set()
        if stopper.ident is not None:
            stopper.join(LIMIT)
        shutdown_within(server, t)
        server.server_close()


def test_a_worker_let_into_the_core_after_shutdown_accepts_nothing(monkeypatch):
    # A worker about to call into the core when shutdown() comes, let in only
    # once serve_forever has returned (the descriptor is blocking again) and
    # a client waits: it must return at once, accept nothing, block on
    # nothing.
    held, release, threads = _hold_first(monkeypatch, "accept")
    server = fastlisten.ThreadingTCPServer(("127.0.0.1", 0), EchoLine)
    pool = server._fl_get_pool()
    t = serve_in_thread(server, None)
    try:
        assert held.wait(LIMIT)
        shutdown_within(server, t)      # (before: it waited for the held worker)
        assert os.get_blocking(server.socket.fileno())
        with socket.create_connection(server.server_address, timeout=LIMIT):
            wait_for(lambda: server._fl_listener.queue()[0] == 1)
            release.set()
            threads[0].join(LIMIT)
            assert not threads[0].is_alive()
            assert server._fl_listener.queue()[0] == 1     # still queued
            assert server._fl_listener.counters()["accepted"] == 0
    finally:
        release.set()
        server.server_close()
    assert len(pool) == 0


def test_a_worker_let_into_the_core_after_server_close_touches_no_reused_descriptor(
        monkeypatch):
    held, release, threads = _hold_first(monkeypatch, "accept")

    class S(fastlisten.ThreadingTCPServer):
        block_on_close = False      # the test lets the held worker go itself

    server = S(("127.0.0.1", 0), EchoLine)
    pool = server._fl_get_pool()
    t = serve_in_thread(server, None)
    other = socket.create_server(("127.0.0.1", 0))
    reused = -1
    try:
        assert held.wait(LIMIT)
        fd = server.socket.fileno()
        shutdown_within(server, t)
        server.server_close()
        # the descriptor number now names another listening socket, with a
        # client waiting in its queue
        reused = os.dup2(other.fileno(), fd)
        with socket.create_connection(other.getsockname(), timeout=LIMIT):
            wait_for(lambda: queued(other) == 1)
            release.set()
            threads[0].join(LIMIT)
            assert not threads[0].is_alive()
            other.setblocking(False)
            conn, _ = other.accept()        # the client is still there
            conn.close()
    finally:
        release.set()
        pool.join(LIMIT)
        if reused >= 0:
            os.close(reused)
        other.close()
    assert len(pool) == 0


def test_server_close_under_a_running_loop_fences_the_workers_first(monkeypatch):
    # server_close() without shutdown(): the descriptor is closed while the
    # workers still serve; they must be kept off it first.
    held, release, worker = _hold_first(monkeypatch, "accept")
    fenced_at_close = []

    class Closing:
        """Below ThreadingMixIn: runs as the socket is about to be closed."""

        def server_close(self):
            fenced_at_close.append(worker[1].stop.fenced)
            super().server_close()

    class S(fastlisten.ThreadingMixIn, Closing, fastlisten.TCPServer):
        block_on_close = False      # the test lets the held worker go itself

    server = S(("127.0.0.1", 0), EchoLine)
    pool = server._fl_get_pool()
    t = serve_in_thread(server, None)
    try:
        assert held.wait(LIMIT)
        assert _leading(server)
        server.server_close()
        assert fenced_at_close == [True]
        release.set()
        worker[0].join(LIMIT)
        assert not worker[0].is_alive()
    finally:
        release.set()
        shutdown_within(server, t)
        pool.join(LIMIT)
    assert len(pool) == 0


def _four_waiting_in_the_core():
    """A server whose four idle workers wait in the core (and would for
    10 * LIMIT s), its pool and its serving thread."""
    Handler, gate = _together(4)

    class S(fastlisten.ThreadingTCPServer):
        fl_thread_idle_timeout = 10 * LIMIT      # only the stop ends their waits in time

    server = S(("127.0.0.1", 0), Handler)
    pool = server._fl_get_pool()
    t = serve_in_thread(server, None)
    try:
        wait_for(lambda: _leading(server))
        assert _ask_together(server, gate, 4) == [b"ping\n"] * 4
        wait_for(lambda: pool.busy == 0 and pool._waiting == len(pool) >= 4)
        if NO_SYSCALL_TABLE is None:
            wait_for(lambda: all(in_syscall(x.native_id, _EPOLL_SYSCALLS)
                                 for x in list(pool._threads)))
    except BaseException:
        shutdown_within(server, t)
        server.server_close()
        raise
    return server, pool, t


def test_server_close_right_after_shutdown_with_workers_in_the_core():
    server, pool, t = _four_waiting_in_the_core()
    try:
        shutdown_within(server, t)
    finally:
        server.server_close()       # joins: every waiting worker was reached
    assert len(pool) == 0


def test_shutdown_alone_sends_every_waiting_worker_away():
    server, pool, t = _four_waiting_in_the_core()
    try:
        shutdown_within(server, t)
        wait_for(lambda: len(pool) == 0)     # long before their idle timeout
        assert os.get_blocking(server.socket.fileno())
    finally:
        server.server_close()


@needs_syscall_table
def test_join_waits_for_a_thread_that_is_being_started():
    # A follower spawned just as the pool stopped leading is made under the
    # pool's lock and started after it: server_close()'s join() may meet it
    # in between (it once raised "cannot join thread before it is started").
    from fastlisten._threadpool import WorkerPool

    pool = WorkerPool(name="test-pool")
    ran, errors, joiner_tids = threading.Event(), [], []

    def join():
        joiner_tids.append(threading.get_native_id())
        try:
            pool.join(LIMIT)
        except BaseException as exc:
            errors.append(exc)

    with pool._cond:
        t = pool._new_thread((ran.set, ()))
    joiner = threading.Thread(target=join)
    joiner.start()
    try:
        wait_for(lambda: joiner_tids and in_syscall(joiner_tids[0], _FUTEX_SYSCALLS))
        assert not errors and joiner.is_alive()
    finally:
        pool._start(t)
        joiner.join(LIMIT)
    assert not errors and not joiner.is_alive() and ran.is_set()
    assert len(pool) == 0


# -- Ctrl-C and interpreter exit (child processes) ---------------------------

_CHILD_PRELUDE = textwrap.dedent("""
    import os, socket, sys, threading, time, fastlisten

    class Handler(fastlisten.StreamRequestHandler):
        meet = threading.Barrier(3, timeout=10)

        def handle(self):
            self.meet.wait()            # three workers at once
            self.wfile.write(self.rfile.readline())

    class S(fastlisten.ThreadingTCPServer):
        fl_thread_idle_timeout = 3600      # only the stop ends their waits

    server = S(("127.0.0.1", 0), Handler)
    pool = server._fl_get_pool()

    def all_waiting(n):
        deadline = time.monotonic() + 10
        while not (pool.busy == 0 and pool._waiting == len(pool) >= n):
            if time.monotonic() > deadline:
                raise SystemExit("the workers never all waited")
            time.sleep(0.002)
""")


def _three_at_once(port):
    clients = [socket.create_connection(("127.0.0.1", port), timeout=LIMIT)
               for _ in range(3)]
    try:
        for c in clients:
            c.sendall(b"hi\n")
        return [c.makefile("rb").readline() for c in clients]
    finally:
        for c in clients:
            c.close()


@needs_syscall_table
def test_ctrl_c_with_every_worker_waiting_in_the_core(core):  # noqa: F811
    script = _CHILD_PRELUDE + textwrap.dedent("""
        import signal
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(server.server_address[1], flush=True)

        def report():
            all_waiting(3)
            print(" ".join(str(t.native_id) for t in list(pool._threads)), flush=True)

        threading.Thread(target=report, daemon=True).start()
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("interrupted", os.get_blocking(server.fileno()), flush=True)
            server.server_close()       # block_on_close: joins every worker
            print("joined", len(pool), flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            text=True, env=core.env)
    try:
        port = int(proc.stdout.readline())
        assert _three_at_once(port) == [b"hi\n"] * 3
        workers = proc.stdout.readline().split()
        assert len(workers) >= 3
        wait_for(lambda: all(in_syscall(w, _EPOLL_SYSCALLS, pid=proc.pid) for w in workers))
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=LIMIT)
    finally:
        end_child(proc)
    assert proc.returncode == 0
    assert out.split("\n")[:2] == ["interrupted True", "joined 0"]


def test_interpreter_exit_reaches_every_worker_waiting_in_the_core(core):  # noqa: F811
    # serve_forever in a daemon thread, never shut down: at exit the pool's
    # close() must wake every (non-daemon) waiting worker, or the
    # interpreter waits for them for thread_idle_timeout.
    script = _CHILD_PRELUDE + textwrap.dedent("""
        threading.Thread(target=server.serve_forever, daemon=True).start()
        print(server.server_address[1], flush=True)
        sys.stdin.readline()            # the clients are done
        all_waiting(3)
        print(len(pool), flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=core.env)
    try:
        port = int(proc.stdout.readline())
        assert _three_at_once(port) == [b"hi\n"] * 3
        out, _ = proc.communicate("go\n", timeout=LIMIT)
    finally:
        end_child(proc)
    assert proc.returncode == 0 and int(out) >= 3


@needs_syscall_table
@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="Python runs signal handlers in the main thread only")
def test_a_signal_another_thread_takes_ends_the_serving_threads_wait():
    """Under leader/follower, serve_forever waits in poll() while the
    workers accept.  A signal that another thread takes (one that arrives
    just before that poll() begins is alike: the interpreter only notes it)
    must end the wait, so that its handler runs at once, not after
    poll_interval: here 60 s, so a wait that goes on is ended by
    shutdown() after LIMIT instead (and noted: the handler then runs too)."""
    from helpers import in_poll

    class Poke(Exception):
        pass

    def poke(signum, frame):
        raise Poke()

    server = fastlisten.ThreadingTCPServer(LOOPBACK, EchoLine)
    main_tid = threading.get_native_id()
    done = threading.Event()
    ended_by_shutdown = []

    def kick():
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})    # (inherited)
        wait_for(lambda: in_poll(main_tid) or done.is_set())
        os.kill(os.getpid(), signal.SIGUSR1)        # only this thread takes it
        if not done.wait(LIMIT):
            ended_by_shutdown.append(True)      # the wait went on: end it
            server.shutdown()

    old = signal.signal(signal.SIGUSR1, poke)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    kicker = threading.Thread(target=kick, name="kick", daemon=True)
    try:
        kicker.start()
        with pytest.raises(Poke):
            server.serve_forever(poll_interval=60)
    finally:
        done.set()
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        kicker.join(LIMIT)
        signal.signal(signal.SIGUSR1, old)
        server.server_close()
    assert not ended_by_shutdown, "the signal did not end serve_forever's wait"


def test_a_waiter_and_its_stop_collected_in_a_cycle_close_every_descriptor(core):  # noqa: F811
    """A waiter whose stop goes away with it in a reference cycle still
    closes its epoll descriptor: the collector must not take the stop's
    state away first (the compiled Stop is not tracked by it at all)."""
    import gc

    def open_fds():
        return len(os.listdir("/proc/self/fd"))

    lst = fastlisten.listen(LOOPBACK)
    try:
        before = open_fds()
        for _ in range(20):
            stop = lst.new_stop()
            holder = [lst.waiter(stop), stop]
            holder.append(holder)       # a cycle: only the collector frees it
            del stop, holder
        gc.collect()
        assert open_fds() == before
    finally:
        lst.close()
    if core.name == "compiled":
        from fastlisten import _core
        assert not gc.is_tracked(_core.Stop())
