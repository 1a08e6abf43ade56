"""Small helpers for tests: bounded waits on a condition, never bare sleeps."""

import time


def wait_for(predicate, timeout=10.0, interval=0.002):
    """Return once predicate() is true; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


def queued(listener):
    """Connections waiting in the listener's accept queue (TCP_INFO)."""
    return listener.queue()[0]
