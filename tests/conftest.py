"""Shared fixtures: every test is checked for leaked descriptors and threads.

The suite runs against whichever core ``fastlisten._backend`` picked; run it
again with FASTLISTEN_NO_EXTENSIONS=1 for the pure-Python twin (.ci/run
does both).
"""

import gc
import os
import threading
import time

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


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "allow_leaks: the test manages descriptors/threads itself")


def pytest_report_header(config):
    return f"fastlisten core: {'compiled' if fastlisten.compiled else 'pure Python'}"
