"""Shared fixtures: every test is checked for leaked descriptors and threads.

The suite runs against whichever core ``fastlisten._backend`` picked; run it
again with FASTLISTEN_NO_EXTENSIONS=1 for the pure-Python twin (.ci/run
does both).
"""

import gc
import os
import threading
import time
import warnings

import pytest

import fastlisten


def _open_fds():
    return set(os.listdir("/proc/self/fd"))


def _settle(check, limit=5.0):
    """Re-check a condition while threads that were told to stop finish
    (bounded, with a sleep only between re-checks: never a bare sleep)."""
    deadline = time.monotonic() + limit
    while True:
        gc.collect()
        if check() or time.monotonic() > deadline:
            return
        time.sleep(0.01)


@pytest.fixture(autouse=True)
def no_leaks(request):
    """Fail a test that leaves a descriptor open or a thread running."""
    if request.node.get_closest_marker("allow_leaks"):
        yield
        return
    threads_before = set(threading.enumerate())
    fds_before = _open_fds()
    yield
    _settle(lambda: set(threading.enumerate()) <= threads_before and _open_fds() <= fds_before)
    extra_threads = [t for t in threading.enumerate() if t not in threads_before]
    assert not extra_threads, f"threads left running: {extra_threads}"
    leaked = {}
    for fd in _open_fds() - fds_before:
        try:
            leaked[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass  # the listing's own descriptor, gone already
    assert not leaked, f"descriptors leaked: {leaked}"


#: What CPython (3.12 on) says when os.fork() runs while the process has
#: more than one thread; from 3.15 on filterwarnings=error makes os.fork()
#: raise it in the parent, after the child was made.
FORK_WARNING = (r"This process \(pid=\d+\) is multi-threaded, use of fork\(\) "
                r"may lead to deadlocks in the child")

_SESSION_PID = os.getpid()
_forks = None     # while a forks_beside_test_threads test runs: one entry per fork


def _os_threads():
    with open("/proc/self/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[17])   # field 20: num_threads


def _before_fork():
    if _forks is not None and os.getpid() == _SESSION_PID:
        me = threading.current_thread()
        _forks.append(([t for t in threading.enumerate() if t is not me],
                       len(threading.enumerate()), _os_threads()))


os.register_at_fork(before=_before_fork)


@pytest.fixture(autouse=True)
def forks_beside_test_threads(request):
    """For a test marked ``forks_beside_test_threads``: a test that forks
    (a forking server it serves from a thread of its own, or os.fork()
    itself) in this process, which has threads that a program would not:
    the main thread driving the clients, the test's serve_forever thread,
    and pytest's faulthandler watchdog (faulthandler_timeout).  CPython
    3.12+ warns about any fork beside other threads; here that warning is
    replaced by a precise check, at every fork: no thread that the test
    started but its own serve_forever-* threads (the helper's names; a
    thread of a module fixture's server, started before, may run too), and
    no thread outside Python's but the watchdog.  That fastlisten forks
    from no thread of its own where the stdlib has none is checked without
    test threads, in test_server_loop.py."""
    global _forks
    if not request.node.get_closest_marker("forks_beside_test_threads"):
        yield
        return
    watchdog = 1 if float(request.config.getini("faulthandler_timeout") or 0) > 0 else 0
    before = set(threading.enumerate())
    _forks = []
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", FORK_WARNING, DeprecationWarning)
            yield
        forks = _forks
    finally:
        _forks = None
    if not request.node.get_closest_marker("forks_beside_test_threads").kwargs.get("auto"):
        assert forks, "the test never forked: drop its forks_beside_test_threads mark"
    for others, python_threads, os_threads in forks:
        new = [t.name for t in others if t not in before]
        assert all(name.startswith("serve_forever-") for name in new), \
            f"forked beside threads {new}"
        assert os_threads <= python_threads + watchdog, (others, os_threads)


def pytest_collection_modifyitems(config, items):
    """A test parametrized with a forking server class or mixin forks
    beside the thread that serves it: mark it forks_beside_test_threads."""
    import socketserver
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if any(isinstance(v, type) and issubclass(v, socketserver.ForkingMixIn)
               for v in params.values()):
            item.add_marker(pytest.mark.forks_beside_test_threads(auto=True))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "allow_leaks: the test manages descriptors/threads itself")
    config.addinivalue_line(
        "markers", "forks_beside_test_threads: the test forks beside threads of its own "
        "(see the fixture of that name)")


def pytest_report_header(config):
    return f"fastlisten core: {'compiled' if fastlisten.compiled else 'pure Python'}"
