"""The core: lifecycle, batches, the GIL, signals, wake-ups, errors.

Each test runs against both cores in the same run, the compiled one and its
pure-Python twin (the ``core`` fixture, as uvloop runs its tests on both
loops): the two must behave the same.  Under FASTLISTEN_NO_EXTENSIONS=1 only
the twin runs.  Tests in child processes give the child the same core.
"""

import errno
import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from helpers import EXHAUST_DESCRIPTORS, NO_SYSCALL_TABLE, in_poll, queued, wait_for

import fastlisten
from fastlisten import Listener, _corepy

LOOPBACK = ("127.0.0.1", 0)


def somaxconn():
    with open("/proc/sys/net/core/somaxconn") as f:
        return int(f.read())


def connect_n(address, n):
    return [socket.create_connection(address, timeout=5) for _ in range(n)]


def close_all(pairs_or_socks):
    for item in pairs_or_socks:
        (item[0] if isinstance(item, tuple) else item).close()


class Core:
    """One core under test: its name, its RawListener and the environment
    that makes a child process use it too."""

    def __init__(self, name, raw):
        self.name, self.raw = name, raw
        self.env = dict(os.environ)
        if name == "pure":
            self.env["FASTLISTEN_NO_EXTENSIONS"] = "1"


def _core_params():
    if os.environ.get("FASTLISTEN_NO_EXTENSIONS") == "1":
        return ["pure"]
    return ["compiled", "pure"]


@pytest.fixture(autouse=True, params=_core_params())
def core(request, monkeypatch):
    """Every Listener made by a test runs on this core."""
    if request.param == "compiled":
        from fastlisten import _core as module  # built: test_compiled_core_in_use... says so
    else:
        module = _corepy
    monkeypatch.setattr(fastlisten.listener, "RawListener", module.RawListener)
    return Core(request.param, module.RawListener)


# -- the package ----------------------------------------------------------

@pytest.mark.skipif(os.environ.get("FASTLISTEN_NO_EXTENSIONS") == "1"
                    or not sys.platform.startswith("linux"),
                    reason="the pure-Python core is asked for or expected here")
def test_compiled_core_in_use_after_install():
    assert fastlisten.compiled
    from fastlisten import _core
    assert fastlisten._backend.RawListener is _core.RawListener


@pytest.mark.skipif(os.environ.get("FASTLISTEN_NO_EXTENSIONS") != "1",
                    reason="only when the pure-Python core is asked for")
def test_pure_python_core_when_asked():
    assert not fastlisten.compiled
    from fastlisten import _corepy
    assert fastlisten._backend.RawListener is _corepy.RawListener


# -- the lifecycle ----------------------------------------------------------

def test_step_by_step_lifecycle_and_port_zero():
    lst = Listener(socket.AF_INET)
    try:
        assert lst.backlog is None
        lst.bind(LOOPBACK)
        host, port = lst.address
        assert host == "127.0.0.1" and 0 < port < 65536
        lst.listen(16)
        assert lst.backlog == 16
        with socket.create_connection(lst.address, timeout=5) as client:
            conn, addr = lst.accept(timeout=5)
            with conn:
                assert isinstance(conn, socket.socket)
                assert addr == client.getsockname()
                assert conn.getpeername() == client.getsockname()
                assert (conn.family, conn.type, conn.proto) == (socket.AF_INET, socket.SOCK_STREAM, 0)
                assert conn.gettimeout() is None          # blocking, like socket.accept()
                assert not conn.get_inheritable()         # SOCK_CLOEXEC
                client.sendall(b"ping")
                assert conn.recv(4) == b"ping"
    finally:
        lst.close()
    assert lst.closed and lst.fileno() == -1
    lst.close()                                           # idempotent


def test_default_timeout_applies_to_accepted_sockets():
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(3.5)
    try:
        with fastlisten.listen(LOOPBACK) as lst, socket.create_connection(lst.address):
            conn, _ = lst.accept(timeout=5)
            with conn:
                assert conn.gettimeout() == 3.5
    finally:
        socket.setdefaulttimeout(old)


def test_ipv6_and_unix_listeners(tmp_path):
    with fastlisten.listen(("::1", 0)) as lst6, socket.create_connection(lst6.address[:2]) as c:
        assert lst6.family == socket.AF_INET6
        conn, addr = lst6.accept(timeout=5)
        with conn:
            assert addr == c.getsockname() and len(addr) == 4
    path = str(tmp_path / "s")
    with fastlisten.listen(path) as lstu:
        assert lstu.address == path
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(path)
            conn, addr = lstu.accept(timeout=5)
            with conn:
                assert addr == "" and conn.family == socket.AF_UNIX
    abstract = b"\0fastlisten-test-%d" % os.getpid()
    with fastlisten.listen(abstract) as lsta:
        assert lsta.address == abstract


def test_hostname_is_resolved():
    with fastlisten.listen(("localhost", 0), family=socket.AF_INET) as lst:
        assert lst.address[0] == "127.0.0.1"


def test_closing_the_listener_leaves_accepted_sockets_working():
    lst = fastlisten.listen(LOOPBACK)
    client = socket.create_connection(lst.address, timeout=5)
    conn, _ = lst.accept(timeout=5)
    lst.close()
    with client, conn:
        conn.sendall(b"still here")
        assert client.recv(64) == b"still here"
        client.sendall(b"and back")
        assert conn.recv(64) == b"and back"


# -- the backlog --------------------------------------------------------------

def test_default_backlog_is_the_kernels_somaxconn():
    assert fastlisten.default_backlog() == somaxconn()
    with fastlisten.listen(LOOPBACK) as lst:
        assert lst.queue() == (0, somaxconn())   # TCP_INFO: what ss -lnt shows
        assert lst.backlog == somaxconn()


def test_negative_backlog_clamps_to_zero_like_socket_listen():
    with fastlisten.listen(LOOPBACK, backlog=-5) as lst:
        assert lst.queue()[1] == 0
        assert lst.backlog == 0


def test_backlog_above_somaxconn_is_truncated_by_the_kernel():
    from fastlisten.errors import BacklogTruncatedWarning  # issue 4: it warns now
    with pytest.warns(BacklogTruncatedWarning):
        lst = fastlisten.listen(LOOPBACK, backlog=somaxconn() * 4)
    with lst:
        assert lst.backlog == somaxconn()


# -- batches ----------------------------------------------------------------

def test_a_batch_of_pending_connections_is_drained_in_one_call():
    with fastlisten.listen(LOOPBACK) as lst:
        clients = connect_n(lst.address, 20)
        try:
            wait_for(lambda: queued(lst) == 20)
            batch = lst.accept_many(64, timeout=5)
            try:
                assert len(batch) == 20
                assert sorted(a for _, a in batch) == sorted(c.getsockname() for c in clients)
                assert queued(lst) == 0
                stats = lst.stats()
                assert stats["accepted"] == 20 and stats["batches"] == 1
                assert stats["max_batch"] == 20
            finally:
                close_all(batch)
        finally:
            close_all(clients)


def test_accept_many_takes_no_more_than_max():
    with fastlisten.listen(LOOPBACK) as lst:
        clients = connect_n(lst.address, 10)
        try:
            wait_for(lambda: queued(lst) == 10)
            first = lst.accept_many(4, timeout=5)
            rest = lst.accept_many(64, timeout=5)
            assert (len(first), len(rest)) == (4, 6)
            close_all(first + rest)
        finally:
            close_all(clients)


def test_timeout_returns_an_empty_batch():
    with fastlisten.listen(LOOPBACK) as lst:
        assert lst.accept_many(8, timeout=0) == []
        assert lst.accept_many(8, timeout=0.01) == []
        with pytest.raises(socket.timeout):
            lst.accept(timeout=0.01)


def test_wakeup_from_another_thread_ends_a_blocked_wait():
    with fastlisten.listen(LOOPBACK) as lst:
        tid = []
        result = []
        t = threading.Thread(target=lambda: (tid.append(threading.get_native_id()),
                                             result.append(lst.accept_many(8, timeout=30))))
        t.start()
        wait_for(lambda: tid and in_poll(tid[0]))
        lst.wakeup()
        t.join(10)
        assert not t.is_alive() and result == [[]]


def test_wakeup_before_the_wait_makes_it_return_at_once():
    with fastlisten.listen(LOOPBACK) as lst:
        lst.wakeup()
        lst.wakeup()   # several pending wake-ups are one
        assert lst.accept_many(8, timeout=30) == []


def test_wakeup_wins_over_pending_connections():
    # shutdown() relies on this: once woken, nothing more is accepted.
    with fastlisten.listen(LOOPBACK) as lst, socket.create_connection(lst.address):
        wait_for(lambda: queued(lst) == 1)
        lst.wakeup()
        assert lst.accept_many(8, timeout=5) == []
        close_all(lst.accept_many(8, timeout=5))


# -- the GIL ------------------------------------------------------------------

# what a thread does in the kernel: helpers.syscall_of and friends
needs_syscall_table = pytest.mark.skipif(NO_SYSCALL_TABLE is not None,
                                         reason=str(NO_SYSCALL_TABLE))


@needs_syscall_table
@pytest.mark.parametrize("timeout", [3e6, 1e300, 10**7, 10**400, float("inf")])
def test_huge_timeouts_wait_through_a_signal_until_a_connection(timeout):
    """Timeouts beyond what poll() takes (3e6 s is past its int of ms) are
    clamped, never cast out of range (undefined behaviour, which the
    sanitizer build turns into a crash), also when a signal interrupts the
    wait and the time left is worked out again; inf waits for ever."""
    main_tid, main_ident = threading.get_native_id(), threading.get_ident()
    handled, clients = [], []
    previous = signal.signal(signal.SIGUSR1, lambda *_: handled.append(1))
    try:
        with fastlisten.listen(LOOPBACK) as lst:
            def poke():
                try:
                    wait_for(lambda: in_poll(main_tid))
                    signal.pthread_kill(main_ident, signal.SIGUSR1)
                    wait_for(lambda: handled and in_poll(main_tid))
                    clients.append(socket.create_connection(lst.address, timeout=5))
                finally:
                    if not clients:
                        lst.wakeup()        # never leave the main thread waiting

            t = threading.Thread(target=poke)
            t.start()
            try:
                batch = lst.accept_many(64, timeout)
            finally:
                t.join(10)
            close_all(batch)
            assert len(batch) == 1 and handled == [1]
    finally:
        signal.signal(signal.SIGUSR1, previous)
        close_all(clients)


def test_a_timeout_longer_than_one_poll_waits_in_steps_until_its_deadline(core, monkeypatch):
    if core.name == "compiled":
        pytest.skip("the compiled core's step is a C constant")
    from fastlisten import _coreshared
    monkeypatch.setattr(_coreshared, "MAX_WAIT_MS", 20)   # one poll() waits at most 20 ms
    monkeypatch.setattr(_corepy, "MAX_WAIT_MS", 20)
    with fastlisten.listen(LOOPBACK) as lst:
        start = time.monotonic()
        assert lst.accept_many(8, 0.2) == []
        assert time.monotonic() - start >= 0.2     # not cut short after one step


@pytest.mark.parametrize("bad, error", [(float("nan"), ValueError), (-1, ValueError),
                                        (-float("inf"), ValueError), ("1", TypeError),
                                        (True, TypeError)])
def test_a_bad_timeout_is_refused_naming_it(bad, error):
    with fastlisten.listen(LOOPBACK) as lst:
        with pytest.raises(error, match="timeout"):
            lst.accept_many(8, bad)


@needs_syscall_table
def test_gil_is_released_while_waiting():
    """Another Python thread runs while the accept loop sits in poll().

    If the wait held the GIL, this (main) thread could not run while the
    waiter is inside poll(), so it could never observe it there: it would
    only get to run after the 20 s wait ended.
    """
    with fastlisten.listen(LOOPBACK) as lst:
        tid, done = [], threading.Event()

        def waiter():
            tid.append(threading.get_native_id())
            lst.accept_many(8, timeout=20)
            done.set()

        t = threading.Thread(target=waiter)
        t.start()
        seen_blocked = False
        while not done.is_set() and not seen_blocked:
            seen_blocked = bool(tid) and in_poll(tid[0])
        lst.wakeup()
        t.join(30)
        assert seen_blocked


def test_gil_is_released_while_draining_a_batch():
    """Another Python thread keeps making progress while accept_many drains
    a batch of pending connections.

    The switch interval is raised so that the interpreter never takes the
    GIL away by force: the spinner can then only run while this thread lets
    go of the GIL of its own accord, which it does only inside accept_many.
    """
    n = min(2000, somaxconn())
    with fastlisten.listen(LOOPBACK) as lst:
        clients = connect_n(lst.address, n)
        try:
            wait_for(lambda: queued(lst) == n)
            count, stop, started = [0], threading.Event(), threading.Event()

            def spinner():
                started.set()
                while not stop.is_set():
                    count[0] += 1
                    if count[0] % 64 == 0:
                        time.sleep(0)     # hand the GIL back when asked

            old = sys.getswitchinterval()
            sys.setswitchinterval(30)
            t = threading.Thread(target=spinner)
            try:
                t.start()
                started.wait(10)
                before = count[0]
                batch = lst.accept_many(n, timeout=5)
                after = count[0]
            finally:
                stop.set()
                sys.setswitchinterval(old)
                t.join(30)
            close_all(batch)
        finally:
            close_all(clients)
    assert len(batch) == n          # one call drained the whole queue
    assert after > before           # and the spinner ran meanwhile


# -- signals ------------------------------------------------------------------

class Interrupted(Exception):
    pass


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signals are delivered to the main thread")
def test_a_signal_handler_that_raises_interrupts_a_blocked_wait():
    def handler(signum, frame):
        raise Interrupted()

    old = signal.signal(signal.SIGALRM, handler)
    try:
        with fastlisten.listen(LOOPBACK) as lst:
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            with pytest.raises(Interrupted):
                lst.accept_many(8, timeout=30)
            assert not lst.closed     # usable again after the interruption
            assert lst.accept_many(8, timeout=0) == []
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@needs_syscall_table
def test_ctrl_c_stops_a_blocked_accept_in_a_real_process(core):
    script = textwrap.dedent("""
        import signal, sys, fastlisten
        # as in a terminal, whatever the test runner's parent did to SIGINT
        signal.signal(signal.SIGINT, signal.default_int_handler)
        lst = fastlisten.listen(("127.0.0.1", 0))
        print("ready", flush=True)
        try:
            lst.accept()
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(0)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env=core.env)
    try:
        assert proc.stdout.readline().strip() == "ready"
        wait_for(lambda: in_poll(proc.pid, pid=proc.pid))
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and out.strip() == "interrupted"


def test_eintr_is_retried_with_the_time_left():
    calls = []
    old = signal.signal(signal.SIGALRM, lambda signum, frame: calls.append(signum))
    try:
        with fastlisten.listen(LOOPBACK) as lst:
            signal.setitimer(signal.ITIMER_REAL, 0.01, 0.01)   # repeatedly
            try:
                result = lst.accept_many(8, timeout=0.2)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        assert result == []
        assert calls                # handlers ran, and the wait went on
    finally:
        signal.signal(signal.SIGALRM, old)


# -- closing ------------------------------------------------------------------

def test_a_closed_listener_used_again_raises_ebadf():
    lst = fastlisten.listen(LOOPBACK)
    lst.close()
    for use in (lambda: lst.accept_many(1, 0), lambda: lst.accept(0),
                lambda: lst.bind(LOOPBACK), lambda: lst.listen(), lambda: lst.queue(),
                lambda: lst.address):
        with pytest.raises(OSError) as info:
            use()
        assert info.value.errno == errno.EBADF


# -- bad input ------------------------------------------------------------------

@pytest.mark.parametrize("port", [65536, -1, 10**20])
def test_out_of_range_port_is_an_overflow_error_naming_it(port):
    with pytest.raises(OverflowError, match=str(port)):
        fastlisten.listen(("127.0.0.1", port))


@pytest.mark.parametrize("address, exc", [
    (("127.0.0.1", "80"), TypeError),
    (("127.0.0.1", 1.5), TypeError),
    (("127.0.0.1",), TypeError),
    ((None, 0), TypeError),
    (42, TypeError),
])
def test_malformed_addresses_raise_clear_errors(address, exc):
    with pytest.raises(exc, match="address|port|host"):
        fastlisten.listen(address)


def test_unknown_address_family():
    with pytest.raises(OSError) as info:
        Listener(12345)
    assert info.value.errno == errno.EAFNOSUPPORT and "12345" in str(info.value)
    with pytest.raises(TypeError):
        Listener(2.0)
    with pytest.raises(ValueError, match="ipv4, ipv6, unix"):
        Listener("inet4")


@pytest.mark.parametrize("backlog", ["5", 2.5, None.__class__])
def test_non_numeric_backlog_is_a_type_error_naming_it(backlog):
    lst = Listener()
    try:
        lst.bind(LOOPBACK)
        with pytest.raises(TypeError, match="backlog"):
            lst.listen(backlog)
    finally:
        lst.close()


@pytest.mark.parametrize("max_", [0, -1, 10**6])
def test_bad_batch_size(max_):
    with fastlisten.listen(LOOPBACK) as lst:
        with pytest.raises((ValueError, OverflowError)):
            lst.accept_many(max_, 0)


@pytest.mark.parametrize("timeout, exc", [(-1, ValueError), (float("nan"), ValueError),
                                          ("1", TypeError)])
def test_bad_timeout(timeout, exc):
    with fastlisten.listen(LOOPBACK) as lst:
        with pytest.raises(exc, match="timeout"):
            lst.accept_many(1, timeout)


def test_failed_bind_leaks_nothing_and_keeps_errno():
    from fastlisten.errors import EphemeralPortWarning  # issue 4: a kernel-picked port warns
    with fastlisten.listen(LOOPBACK) as first:
        with pytest.raises(OSError) as info, pytest.warns(EphemeralPortWarning):
            fastlisten.listen(first.address, reuse_address=False)
        assert info.value.errno == errno.EADDRINUSE
        assert type(info.value) is OSError        # the stdlib has no subclass for it


# -- capacity errors --------------------------------------------------------------

def test_out_of_descriptors_backs_off_instead_of_spinning_and_recovers(core):
    """EMFILE leaves the connection queued; accept_many pauses instead of
    spinning on a listener that stays readable, logs once, and accepts the
    connection once descriptors are free again.  Run in a child process, as
    it lowers RLIMIT_NOFILE."""
    script = EXHAUST_DESCRIPTORS + textwrap.dedent("""
        import json, logging, os, socket, time
        import fastlisten
        records = []
        class H(logging.Handler):
            def emit(self, r): records.append(r.getMessage())
        logging.getLogger("fastlisten").addHandler(H())
        lst = fastlisten.listen(("127.0.0.1", 0))
        client = socket.create_connection(lst.address)
        while lst.queue()[0] != 1:
            time.sleep(0.001)
        filler = exhaust_descriptors()
        wall, cpu = time.monotonic(), time.thread_time()
        empty = [lst.accept_many(8) for _ in range(5)]
        wall, cpu = time.monotonic() - wall, time.thread_time() - cpu
        for fd in filler:
            os.close(fd)
        batch = lst.accept_many(8, timeout=5)
        print(json.dumps({"empty": [len(b) for b in empty], "recovered": len(batch),
                          "errors": lst.stats()["errors"], "logs": records,
                          "cpu_share": cpu / wall, "queued": lst.queue()[0]}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=30, env=core.env)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["empty"] == [0] * 5            # returned, did not block for ever
    assert result["recovered"] == 1 and result["queued"] == 0
    assert result["errors"] == {str(errno.EMFILE): 5}   # one accept4 per call: no spin
    assert result["cpu_share"] < 0.5             # it slept rather than spun
    assert len(result["logs"]) == 1 and "Too many open files" in result["logs"][0]


def test_two_threads_accepting_from_one_listener_share_the_queue_cleanly():
    n = 200
    with fastlisten.listen(LOOPBACK) as lst:
        got, lock, stop = [], threading.Lock(), threading.Event()

        def worker():
            while not stop.is_set():
                batch = lst.accept_many(8, timeout=5)
                with lock:
                    got.extend(batch)
                    if len(got) >= n:
                        stop.set()
                        lst.wakeup()
                        lst.wakeup()

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        clients = connect_n(lst.address, n)
        for t in threads:
            t.join(30)
        try:
            addrs = [a for _, a in got]
            assert len(addrs) == n == len(set(addrs))
            assert set(addrs) == {c.getsockname() for c in clients}
        finally:
            close_all(got)
            close_all(clients)


def test_signals_poked_at_a_busy_server_always_interrupt_its_wait(core):
    """Every signal poked at a busy server interrupts its wait.

    The child serves one connection at a time and is poked with SIGUSR1
    right after each, while a busy thread makes its main thread wait for the
    GIL on its way back into accept_many: each poke must come out of
    accept_many as the handler's exception, whether it lands in the wait or
    while the thread queues for the GIL.  (The narrower gap between the
    interpreter's last signal check and poll() is not hit from here:
    test_core_waits.py checks the mechanism that closes it.)"""
    script = textwrap.dedent("""
        import signal, sys, threading, fastlisten
        def spin():             # keeps the GIL changing hands, as a busy server does
            while True:
                pass
        threading.Thread(target=spin, daemon=True).start()
        class Poke(Exception):
            pass
        def poke(signum, frame):
            raise Poke()
        signal.signal(signal.SIGUSR1, poke)
        lst = fastlisten.listen(("127.0.0.1", 0))
        print(lst.address[1], flush=True)
        for line in sys.stdin:
            try:
                while True:
                    for conn, _ in lst.accept_many(8):
                        conn.close()
            except Poke:
                print("poked", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, bufsize=1, env=core.env)
    try:
        port = int(proc.stdout.readline())
        lost = 0
        for _ in range(150):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            with socket.create_connection(("127.0.0.1", port)) as c:
                c.recv(1)                 # the child accepted and closed it
            proc.send_signal(signal.SIGUSR1)
            ready, _, _ = select.select([proc.stdout], [], [], 5)
            if not ready:
                lost += 1
                break
            assert proc.stdout.readline().strip() == "poked"
        assert lost == 0
    finally:
        proc.kill()
        proc.communicate()


@needs_syscall_table
@pytest.mark.parametrize("waiters", [1, 2])
@pytest.mark.parametrize("end", ["wakeup", "close"])
def test_wakeup_and_close_from_another_thread_reach_every_waiter(end, waiters):
    """Threads wait on one listener; one wakeup() (or close()) from another
    thread must end every wait, and close() must close the descriptor once
    the last waiter is out of the kernel."""
    lst = fastlisten.listen(LOOPBACK)
    fd = lst.fileno()
    results, tids = [], []

    def waiter():
        tids.append(threading.get_native_id())
        try:
            results.append(lst.accept_many(8, timeout=30))
        except OSError as exc:
            results.append(exc.errno)

    threads = [threading.Thread(target=waiter, daemon=True) for _ in range(waiters)]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: len(tids) == waiters and all(in_poll(t) for t in tids))
        getattr(lst, end)()
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads)
        if end == "wakeup":
            assert results == [[]] * waiters
            assert lst.accept_many(8, timeout=0) == []     # the wake-up was cleared
        else:
            assert results == [errno.EBADF] * waiters
            assert lst.closed
            with pytest.raises(OSError):
                os.fstat(fd)
    finally:
        lst.close()


@needs_syscall_table
@pytest.mark.parametrize("timeout", [None, 30.0])
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_one_wakeup_ends_each_waiting_loop_once_then_all_connections_are_accepted(
        threads, timeout):
    """Threads loop on accept_many on one listener, as a threaded server
    does.  One wakeup() while they all wait must make each of them return
    exactly one empty batch; after that the wake-up is spent, so every
    connection that arrives is accepted.  (The wake-up used to be cleared
    only by a waiter that found no other call in flight: with looping
    threads that never happened, and they spun returning empty batches
    while connections piled up.)"""
    n = 300
    lst = fastlisten.listen(LOOPBACK, backlog=n)
    got, empties, tids, lock = [], [], [], threading.Lock()

    def loop():
        tids.append(threading.get_native_id())
        try:
            while True:
                batch = lst.accept_many(64, timeout)
                with lock:
                    if batch:
                        got.extend(batch)
                    else:
                        empties.append(threading.get_native_id())
        except OSError as exc:          # close() ends the loops
            assert exc.errno == errno.EBADF

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    clients = []
    try:
        for t in workers:
            t.start()
        wait_for(lambda: len(tids) == threads and all(in_poll(t) for t in tids))
        lst.wakeup()
        wait_for(lambda: len(empties) >= threads
                 and all(in_poll(t) for t in tids))
        with lock:
            assert sorted(empties) == sorted(tids)       # each woke once, no more
        # (From here on a thread may also come back empty-handed when
        # another took the connections its poll() saw.)
        clients = connect_n(lst.address, n)
        wait_for(lambda: len(got) == n)
        assert {a for _, a in got} == {c.getsockname() for c in clients}
    finally:
        lst.close()
        for t in workers:
            t.join(10)
        assert not any(t.is_alive() for t in workers)
        close_all(got)
        close_all(clients)


@pytest.mark.parametrize("call, exc", [
    (lambda r: r.listen(1.5), TypeError),                 # never truncated
    (lambda r: r.listen(-2**40), OverflowError),          # as socket.listen
    (lambda r: r.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1.5), TypeError),
    (lambda r: r.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 2**40), OverflowError),
    (lambda r: r.accept_many(1.5, 0), TypeError),
    (lambda r: r.accept_many(2**70, 0), OverflowError),
    (lambda r: r.accept_many(0, 0), ValueError),
    (lambda r: r.bind(("127.0.0.1", 0, 0, 0)), TypeError),  # an AF_INET address is a pair
], ids=["listen-float", "listen-huge", "sockopt-float", "sockopt-huge", "max-float",
        "max-huge", "max-zero", "inet-4-tuple"])
def test_both_raw_listeners_refuse_bad_numbers_with_one_exception(core, call, exc):
    raw = core.raw(socket.AF_INET)
    try:
        with pytest.raises(exc):
            call(raw)
    finally:
        raw.close()


@pytest.mark.parametrize("source", ["127.0.0.1", "127.0.0.9", "127.10.100.255", "127.200.1.0",
                                    "127.99.255.10"])
def test_client_ipv4_addresses_are_formatted_as_the_stdlib_does(source):
    with fastlisten.listen(LOOPBACK) as lst, socket.socket() as c:
        c.settimeout(10)
        c.bind((source, 0))
        c.connect(lst.address)
        conn, addr = lst.accept(10)
        with conn:
            assert addr == c.getsockname() == conn.getpeername()
            assert type(addr[0]) is str
