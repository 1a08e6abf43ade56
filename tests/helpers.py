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


def end_child(proc, socks=()):
    """In a test's finally: close its client sockets, then make sure the
    child process is gone (killed if it still runs)."""
    for s in socks:
        s.close()
    if proc.poll() is None:
        proc.kill()
        proc.communicate()
