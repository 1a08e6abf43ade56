"""The core's waits, timed: capacity back-off, wake-ups, signals, closing
under waiters; its descriptors and errno table -- on both cores in one run.

Each test here was written against a mutation of the core that the rest of
the suite let through (issue 14; tests/mutations/ lists them): it fails
with that line broken.  Timings are one-sided and generous: a wait lasts
*at least* its time (the kernel never wakes early), a wake-up ends a wait
in a fraction of the time it would otherwise take.  Anything that could
hang runs with a bounded timeout, in a child process with a timeout, or in
a daemon thread joined with a deadline.
"""

import errno
import functools
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from helpers import (
    EXHAUST_DESCRIPTORS,
    NO_SYSCALL_TABLE,
    POLL_SYSCALLS,
    PPOLL,
    SELECT_SYSCALLS,
    in_poll,
    syscall_of,
    wait_for,
)

from fastlisten import _corepy, _coreshared

try:
    from fastlisten import _core
except ImportError:     # pragma: no cover - the pure-Python install
    _core = None

# Both cores in the default run, the pure one alone under
# FASTLISTEN_NO_EXTENSIONS=1 (as test_core.py's ``core`` fixture).
CORES = [pytest.param(_corepy, id="pure")]
if os.environ.get("FASTLISTEN_NO_EXTENSIONS") != "1":
    CORES.append(pytest.param(_core, id="compiled", marks=pytest.mark.skipif(
        _core is None, reason="the extension is not built here")))
needs_syscall_table = pytest.mark.skipif(NO_SYSCALL_TABLE is not None,
                                         reason=str(NO_SYSCALL_TABLE))
main_thread_only = pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="Python runs signal handlers in the main thread only")
LIMIT = 10.0


def listening(core, backlog=16):
    raw = core.RawListener(socket.AF_INET)
    try:
        raw.bind(("127.0.0.1", 0))
        raw.listen(backlog)
    except BaseException:
        raw.close()
        raise
    return raw


def timed(fn, *args):
    start = time.monotonic()
    result = fn(*args)
    return result, time.monotonic() - start


def signal_main_once_it_waits(signum, also_waiting=()):
    """A daemon thread that sends ``signum`` to the main thread once it (and
    each thread id in ``also_waiting``) is blocked in poll()/ppoll(): the
    signal lands inside the core's wait, not before it."""
    main_tid, main_ident = threading.get_native_id(), threading.main_thread().ident

    def kick():
        wait_for(lambda: in_poll(main_tid) and all(in_poll(t) for t in also_waiting), LIMIT)
        signal.pthread_kill(main_ident, signum)

    t = threading.Thread(target=kick, name="kick", daemon=True)
    t.start()
    return t


# -- descriptors ---------------------------------------------------------------

@pytest.mark.parametrize("core", CORES)
def test_the_listening_descriptor_is_not_inherited_by_child_processes(core):
    """Like socket.socket's (PEP 446): close-on-exec from the start."""
    raw = listening(core)
    try:
        assert not os.get_inheritable(raw.fileno())
    finally:
        raw.close()



@pytest.mark.parametrize("core", CORES)
def test_detach_hands_the_open_descriptor_over(core):
    raw = listening(core)
    identity = os.readlink(f"/proc/self/fd/{raw.fileno()}")
    fd = raw.detach()
    with socket.socket(fileno=fd) as sock:       # fails if fd was closed
        assert raw.closed and raw.fileno() == -1
        assert os.readlink(f"/proc/self/fd/{fd}") == identity      # still the listener
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)


@pytest.mark.parametrize("core", CORES)
def test_a_negative_backlog_given_to_the_core_is_clamped_to_0(core):
    """As socket.listen does (the Python layer clamps too, before the core)."""
    raw = core.RawListener(socket.AF_INET)
    try:
        raw.bind(("127.0.0.1", 0))
        raw.listen(-5)
        assert raw.queue() == (0, 0)
    finally:
        raw.close()


# -- wake-ups ------------------------------------------------------------------

@pytest.mark.parametrize("waiters", [0, 1, 2])
@pytest.mark.parametrize("core", CORES)
def test_a_wakeup_is_used_up_by_the_waits_it_ends(core, waiters):
    """wakeup() ends the waits in progress (or the next one) and is then
    cleared: a later accept_many(timeout=0.3) waits its 0.3 s again."""
    if waiters and NO_SYSCALL_TABLE is not None:
        pytest.skip(f"cannot see the waiters inside their wait: {NO_SYSCALL_TABLE}")
    raw = listening(core)
    try:
        tids, results = [], []

        def waiter():
            tids.append(threading.get_native_id())
            results.append(raw.accept_many(8, LIMIT))

        threads = [threading.Thread(target=waiter, daemon=True) for _ in range(waiters)]
        for t in threads:
            t.start()
        wait_for(lambda: len(tids) == waiters and all(in_poll(t) for t in tids))
        raw.wakeup()
        if not waiters:
            assert raw.accept_many(8, LIMIT) == []      # the pending wake-up ends it
        for t in threads:
            t.join(LIMIT)
        assert not any(t.is_alive() for t in threads)
        assert results == [[]] * waiters
        batch, took = timed(raw.accept_many, 8, 0.3)
        assert batch == []
        assert took >= 0.25, f"the wake-up was left pending: the wait lasted {took:.3f} s"
    finally:
        raw.close()


def test_accept_with_a_timeout_sleeps_after_a_wakeup_instead_of_spinning():
    """Listener.accept(timeout) loops over accept_many: a wake-up left
    pending would turn its wait into a busy loop."""
    import fastlisten
    with fastlisten.listen(("127.0.0.1", 0)) as lst:
        lst.wakeup()
        cpu, wall = time.thread_time(), time.monotonic()
        with pytest.raises(socket.timeout):
            lst.accept(timeout=0.5)
        cpu, wall = time.thread_time() - cpu, time.monotonic() - wall
    assert wall >= 0.45
    assert cpu < 0.1, f"accept(timeout=0.5) used {cpu:.3f} s of CPU"


# -- signals -------------------------------------------------------------------

@main_thread_only
@needs_syscall_table
@pytest.mark.parametrize("core", CORES)
def test_a_signal_that_does_not_raise_leaves_the_wait_its_time(core):
    """EINTR: the handler runs, and the wait goes on with the time left (not
    0 ms, not the whole timeout again)."""
    calls = []
    old = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))
    raw = listening(core)
    try:
        kicker = signal_main_once_it_waits(signal.SIGUSR1)
        batch, took = timed(raw.accept_many, 8, 0.5)
        kicker.join(LIMIT)
    finally:
        raw.close()
        signal.signal(signal.SIGUSR1, old)
    assert calls == [signal.SIGUSR1]
    assert batch == []
    assert 0.45 <= took < 5, f"accept_many(timeout=0.5) returned after {took:.3f} s"


class Interrupted(Exception):
    pass


@main_thread_only
@needs_syscall_table
@pytest.mark.parametrize("own_wakeup_fd", [False, True], ids=["", "app-wakeup-fd"])
@pytest.mark.parametrize("core", CORES)
def test_a_signal_handler_that_raises_ends_the_wait_at_once(core, own_wakeup_fd):
    """A handler's exception comes out of accept_many as soon as the signal
    arrives, not when the wait would have timed out (signals must not stay
    blocked during the wait), also when the application has its own
    signal.set_wakeup_fd (asyncio's): the core leaves it alone."""
    def handler(signum, frame):
        raise Interrupted()

    old = signal.signal(signal.SIGUSR1, handler)
    raw = listening(core)
    app_r, app_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_fd = signal.set_wakeup_fd(app_w if own_wakeup_fd else -1)
    try:
        kicker = signal_main_once_it_waits(signal.SIGUSR1)
        start = time.monotonic()
        with pytest.raises(Interrupted):
            raw.accept_many(8, 5)
        took = time.monotonic() - start
        kicker.join(LIMIT)
        assert raw.accept_many(8, 0) == []     # usable again
        assert signal.set_wakeup_fd(-1) == (app_w if own_wakeup_fd else -1)
    finally:
        signal.set_wakeup_fd(old_fd)
        os.close(app_r)
        os.close(app_w)
        raw.close()
        signal.signal(signal.SIGUSR1, old)
    assert took < 2, f"the handler's exception came {took:.3f} s after the wait began"


@main_thread_only
@needs_syscall_table
@pytest.mark.parametrize("own_wakeup_fd", [False, True], ids=["", "app-wakeup-fd"])
@pytest.mark.parametrize("core", CORES)
def test_the_main_threads_wait_also_watches_for_signals(core, own_wakeup_fd):
    """A signal that arrives between the interpreter's last check and the
    wait must still end the wait.  This checks the mechanism that closes
    that gap, as the kernel sees the wait: both cores poll their
    signal.set_wakeup_fd pipe beside the listener and the wake-up
    descriptor (a ppoll() mask would not do: see the tests below).  When
    the application owns the wake-up fd, the pure core polls the two
    descriptors; the compiled one waits in ppoll() with a signal mask."""
    raw = listening(core)
    main_tid, seen = threading.get_native_id(), []
    app_r, app_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_fd = signal.set_wakeup_fd(app_w if own_wakeup_fd else -1)

    def watch():
        wait_for(lambda: in_poll(main_tid), LIMIT)
        seen.append(syscall_of(main_tid))
        raw.wakeup()

    watcher = threading.Thread(target=watch, daemon=True)
    try:
        watcher.start()
        assert raw.accept_many(8, 5) == []
        watcher.join(LIMIT)
    finally:
        signal.set_wakeup_fd(old_fd)
        os.close(app_r)
        os.close(app_w)
        raw.close()
    assert seen and seen[0] is not None
    number, args = seen[0]
    if not own_wakeup_fd:
        assert number in POLL_SYSCALLS and args[1] == 3, \
            f"polls {args[1]} descriptors, not listener, wake-up and signal pipe"
    elif core is _corepy:
        assert number in POLL_SYSCALLS and args[1] == 2, \
            f"polls {args[1]} descriptors, not listener and wake-up"
    else:
        assert number == PPOLL and args[3] != 0, \
            f"waits in syscall {number} with sigmask {args[3]:#x}, not ppoll with a mask"


@main_thread_only
@needs_syscall_table
@pytest.mark.parametrize("core", CORES)
def test_a_signal_another_thread_takes_ends_the_main_threads_wait(core):
    """A signal sent to the process while the main thread blocks it goes
    to another thread, whose C handler only notes it for the main thread:
    the main thread's wait must end for it (the signal wake-up pipe), run
    the handler, and go on with the time left.  Before, the compiled core's
    wait went on to its end, and the handler ran only after it."""
    ran, sent = [], []
    old = signal.signal(signal.SIGUSR1, lambda signum, frame: ran.append(time.monotonic()))
    raw = listening(core)
    main_tid = threading.get_native_id()

    def kick():
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})   # (inherited)
        wait_for(lambda: in_poll(main_tid), LIMIT)
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGUSR1)     # this thread takes it

    kicker = threading.Thread(target=kick, name="kick", daemon=True)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        kicker.start()
        batch, took = timed(raw.accept_many, 8, 2.0)
        kicker.join(LIMIT)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        raw.close()
        signal.signal(signal.SIGUSR1, old)
    assert batch == [] and sent and ran
    assert took >= 1.9, f"the wait ended after {took:.3f} s of 2 s"   # the time left
    assert ran[0] - sent[0] < 1.0, \
        f"the handler ran {ran[0] - sent[0]:.3f} s after the signal, when the wait ended"


#: write(2)'s number (x86_64, aarch64): a handler blocked writing to a full pipe.
WRITE_SYSCALL = {"x86_64": 1, "aarch64": 64}.get(platform.machine())


def _full_pipe():
    """A pipe whose buffer is full, and a text file over its (blocking) write
    end: a print() to it blocks, in write(2), until the read end is drained,
    and runs no signal handler meanwhile (all of it C code)."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, b"x" * 4096)
    except BlockingIOError:
        pass
    try:
        while True:
            os.write(w, b"x")
    except BlockingIOError:
        pass
    os.set_blocking(w, True)
    os.set_blocking(r, False)
    # print(..., flush=True) to it writes once, in the flush, after the str()
    # calls that may run handlers; no BufferedWriter (which runs them after
    # each write)
    return r, w, io.TextIOWrapper(io.FileIO(w, "w", closefd=False))


def _drain(fd):
    try:
        while os.read(fd, 65536):
            pass
    except BlockingIOError:
        pass


@main_thread_only
@needs_syscall_table
@pytest.mark.skipif(WRITE_SYSCALL is None, reason="no write(2) number for this machine")
@pytest.mark.parametrize("core", CORES)
def test_a_signal_sent_to_the_process_ends_the_main_threads_wait(core):
    """Ctrl-C and kill(1) signal the process; the kernel gives such a signal
    to any thread that does not block it.  One that comes just before the
    main thread's wait must still end it, though another thread took it
    (then Python's C handler ran there).  The compiled core used to block
    every signal in the main thread from its last run of the handlers to
    its ppoll(): a SIGINT sent to the process then went to another thread,
    and the wait went on until the next connection.

    To land SIGINT in that stretch, Python handlers whose C code blocks
    (a print() to a full pipe) hold the main thread there: SIGWINCH ends a
    wait and its handler blocks; meanwhile SIGUSR2 is tripped (in this
    thread), so its handler runs at the core's next check of the handlers,
    just before the wait, and blocks in turn; SIGINT is sent to the process
    then, both pipes are drained, and the wait must end with SIGINT's
    exception within LIMIT."""
    r1, w1, first = _full_pipe()
    r2, w2, second = _full_pipe()
    main_tid, main_ident = threading.get_native_id(), threading.main_thread().ident
    sent, rescued = [], []

    def writing_to(fd):
        call = syscall_of(main_tid)
        return call is not None and call[0] == WRITE_SYSCALL and call[1][0] == fd

    def interrupted(signum, frame):
        raise Interrupted()

    def kick():
        try:
            wait_for(lambda: in_poll(main_tid), LIMIT)
            signal.pthread_kill(main_ident, signal.SIGWINCH)    # ends the wait
            wait_for(lambda: writing_to(w1), LIMIT)
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR2)   # tripped here
            _drain(r1)
            wait_for(lambda: writing_to(w2), LIMIT)      # its handler, before the wait
            os.kill(os.getpid(), signal.SIGINT)
            sent.append(time.monotonic())
            _drain(r2)
            # bounded: with the defect the wait would go on for 3 * LIMIT
            deadline = time.monotonic() + LIMIT
            while not done and time.monotonic() < deadline:
                time.sleep(0.01)
            if not done:
                rescued.append(True)
                raw.wakeup()
        finally:
            _drain(r1)
            _drain(r2)

    olds = {sig: signal.signal(sig, handler) for sig, handler in (
        (signal.SIGWINCH, functools.partial(print, file=first, flush=True)),
        (signal.SIGUSR2, functools.partial(print, file=second, flush=True)),
        (signal.SIGINT, interrupted))}
    raw = listening(core)
    done = []
    kicker = threading.Thread(target=kick, name="kick", daemon=True)
    try:
        kicker.start()
        with pytest.raises(Interrupted):
            try:
                raw.accept_many(8, 3 * LIMIT)
            finally:
                done.append(True)
        kicker.join(2 * LIMIT)
    finally:
        raw.close()
        for sig, old in olds.items():
            signal.signal(sig, old)
        for f in (first, second):
            try:
                f.close()
            except OSError:
                pass
        for fd in (r1, w1, r2, w2):
            os.close(fd)
    assert sent and not rescued, "SIGINT sent to the process did not end the wait"


# -- closing under waiters ------------------------------------------------------

@main_thread_only
@needs_syscall_table
@pytest.mark.parametrize("core", CORES)
def test_close_leaves_the_descriptor_to_the_last_waiter_out(core):
    """close() while two threads wait: the first one out must not close the
    descriptor while the other is still inside accept_many (its number could
    be reused under the other's poll).  The main thread is kept inside its
    wait by a signal handler that calls close(), waits for the other waiter
    to leave, and looks at the descriptor."""
    raw = listening(core)
    fd = raw.fileno()
    identity = os.readlink(f"/proc/self/fd/{fd}")
    other_tid, other_result, in_handler = [], [], []

    def other():
        other_tid.append(threading.get_native_id())
        try:
            other_result.append(raw.accept_many(8, LIMIT))
        except OSError as exc:
            other_result.append(exc.errno)

    def still_open():
        try:
            return os.readlink(f"/proc/self/fd/{fd}") == identity
        except OSError:
            return False

    def handler(signum, frame):
        raw.close()
        waiter.join(LIMIT)
        in_handler.append((waiter.is_alive(), still_open()))

    old = signal.signal(signal.SIGUSR1, handler)
    waiter = threading.Thread(target=other, daemon=True)
    try:
        waiter.start()
        wait_for(lambda: other_tid and in_poll(other_tid[0]))
        kicker = signal_main_once_it_waits(signal.SIGUSR1, other_tid)
        with pytest.raises(OSError) as info:
            raw.accept_many(8, LIMIT)
        kicker.join(LIMIT)
    finally:
        signal.signal(signal.SIGUSR1, old)
        raw.close()
        waiter.join(LIMIT)
    assert info.value.errno == errno.EBADF
    assert other_result == [errno.EBADF]
    assert in_handler == [(False, True)], \
        "the first waiter out closed the descriptor while another was still waiting"
    assert raw.closed and not still_open()        # the last one out closed it


# -- capacity errors: the back-off ------------------------------------------------

# Run in a child process: it lowers RLIMIT_NOFILE until accept() fails with
# EMFILE, leaving the connection queued and the listener readable.
_EMFILE_CHILD = EXHAUST_DESCRIPTORS + textwrap.dedent("""
    import importlib, json, os, socket, sys, threading, time
    core = importlib.import_module(sys.argv[1])
    rounds, wake = int(sys.argv[2]), sys.argv[3] == "wake"
    poll_calls, select_calls = set(json.loads(sys.argv[4])), set(json.loads(sys.argv[5]))
    raw = core.RawListener(socket.AF_INET)
    raw.bind(("127.0.0.1", 0))
    raw.listen(16)
    client = socket.create_connection(raw.getsockname())
    while raw.queue()[0] != 1:
        time.sleep(0.001)
    # opened before the descriptors run out: where the main thread waits
    syscall = os.open(f"/proc/self/task/{threading.get_native_id()}/syscall", os.O_RDONLY)
    armed, woken = threading.Event(), []

    def in_backoff():
        fields = os.pread(syscall, 256, 0).split()
        if not fields or not fields[0].isdigit():
            return False
        number = int(fields[0])
        # the pause polls the wake-up descriptor alone (one fd), or select()s it
        return (number in poll_calls and int(fields[2], 16) == 1) or number in select_calls

    def waker():
        armed.wait()
        deadline = time.monotonic() + 5
        while not in_backoff():
            if time.monotonic() > deadline:
                return
            time.sleep(0.001)
        woken.append(time.monotonic())
        raw.wakeup()

    thread = threading.Thread(target=waker, daemon=True)
    thread.start()
    filler = exhaust_descriptors()
    start = time.monotonic()
    empty = [len(raw.accept_many(8)) for _ in range(rounds)]
    took = time.monotonic() - start
    ended = None
    if wake:
        armed.set()
        empty.append(len(raw.accept_many(8)))
        ended = time.monotonic()
        thread.join(5)
    for fd in filler:
        os.close(fd)
    batch, deadline = [], time.monotonic() + 5
    while not batch and time.monotonic() < deadline:     # a wake-up may be pending
        batch = raw.accept_many(8, 5)
    print(json.dumps({"empty": empty, "took": took, "recovered": len(batch),
                      "woken_after": None if not woken else ended - woken[0],
                      "errors": raw.stats()["errors"]}))
""")


def _emfile_child(core, rounds, wake):
    out = subprocess.run(
        [sys.executable, "-c", _EMFILE_CHILD, core.__name__, str(rounds),
         "wake" if wake else "no", json.dumps(sorted(POLL_SYSCALLS)),
         json.dumps(sorted(SELECT_SYSCALLS))],
        capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("core", CORES)
def test_the_capacity_backoff_doubles_each_round(core):
    """Six EMFILE rounds pause 10+20+40+80+160+320 ms (at least 0.45 s in
    all), where a back-off that never grows would pause 60 ms."""
    result = _emfile_child(core, 6, wake=False)
    assert result["empty"] == [0] * 6 and result["recovered"] == 1
    assert result["errors"] == {str(errno.EMFILE): 6}
    assert result["took"] >= 0.45, f"six back-off rounds took {result['took']:.3f} s"


@needs_syscall_table
@pytest.mark.parametrize("core", CORES)
def test_wakeup_ends_a_capacity_backoff_at_once(core):
    """After six rounds the pause is 640 ms; a wakeup() during it ends it in
    well under half of that (the pause waits on the wake-up descriptor)."""
    result = _emfile_child(core, 6, wake=True)
    assert result["empty"] == [0] * 7 and result["recovered"] == 1
    assert result["woken_after"] is not None, "never saw the back-off pause"
    assert result["woken_after"] < 0.3, \
        f"accept_many returned {result['woken_after']:.3f} s after wakeup()"


# -- the errno table ----------------------------------------------------------------

#: accept(2) on Linux: errors of a connection that failed before it was
#: accepted, which "should be treated like EAGAIN by retrying", and the
#: firewall's EPERM; these are skipped (counted), never raised.
SKIPPED = {"ECONNABORTED", "ECONNRESET", "EPROTO", "EPERM", "ETIMEDOUT", "ENETDOWN",
           "ENOPROTOOPT", "EHOSTDOWN", "ENONET", "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH"}
#: Out of descriptors or memory: back off, never spin.
BACK_OFF = {"EMFILE", "ENFILE", "ENOBUFS", "ENOMEM"}


def test_the_shared_errno_classes_are_the_documented_ones():
    assert _coreshared.IGNORABLE == {getattr(errno, n) for n in SKIPPED if hasattr(errno, n)}
    assert _coreshared.CAPACITY == {getattr(errno, n) for n in BACK_OFF}


@pytest.mark.skipif(_core is None, reason="the extension is not built here")
def test_the_compiled_core_classifies_every_errno_as_the_pure_one_does():
    """fl_accept_error_class (C) against _coreshared's sets (Python), for
    every errno there is: skip, back off, or raise (the C table's two
    raising classes, 'closed' and 'other', both raise)."""
    def python_class(err):
        if err in _coreshared.IGNORABLE:
            return "skip"
        return "back off" if err in _coreshared.CAPACITY else "raise"

    c_names = {0: "skip", 1: "back off", 2: "raise", 3: "raise"}
    every = set(range(0, 160)) | set(errno.errorcode)
    differ = {errno.errorcode.get(e, e): (c_names[_core._accept_error_class(e)], python_class(e))
              for e in sorted(every)
              if c_names[_core._accept_error_class(e)] != python_class(e)}
    assert not differ, f"(C, Python) classes differ: {differ}"
