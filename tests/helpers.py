"""Small helpers for tests: bounded waits on a condition, never bare sleeps."""

import textwrap
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


def serve_in_thread(server, poll_interval=0.5):
    """Start ``server.serve_forever`` in a daemon thread and return it.

    Daemon: if a broken shutdown() never ends the loop, the test fails (see
    shutdown_within) and the interpreter can still exit at the end of the run.
    """
    import threading

    t = threading.Thread(target=server.serve_forever, args=(poll_interval,),
                         name=f"serve_forever-{type(server).__name__}", daemon=True)
    t.start()
    return t


def shutdown_within(server, thread=None, limit=10.0):
    """Call ``server.shutdown()`` and fail the test unless it returns (and
    ``thread``, the serving thread, ends) within ``limit`` seconds.

    shutdown() runs in a daemon thread, so that a loop it fails to wake is a
    test failure, never a hung run.  On failure the loop is nudged with a
    connection (or a datagram), so that it usually still ends and the test
    leaves nothing running behind it.
    """
    import socket
    import threading

    done = threading.Event()
    stopper = threading.Thread(target=lambda: (server.shutdown(), done.set()),
                               name="shutdown_within", daemon=True)
    start = time.monotonic()
    stopper.start()
    returned = done.wait(limit)
    took = time.monotonic() - start
    if not returned:
        try:
            with socket.socket(server.address_family, server.socket_type) as s:
                s.settimeout(1.0)
                s.connect(server.server_address)
                if server.socket_type == socket.SOCK_DGRAM:
                    s.send(b"\n")
        except OSError:
            pass
        done.wait(min(limit, 5.0))
    ended = done.is_set()      # else a short join: the test fails anyway
    stopper.join(limit if ended else 0.1)
    if thread is not None:
        thread.join(limit if ended else 1.0)
    assert returned, f"shutdown() did not return within {limit} s"
    assert thread is None or not thread.is_alive(), "serve_forever did not return"
    return took


# -- what a thread is doing in the kernel (/proc/<pid>/task/<tid>/syscall) ----

import os as _os
import platform as _platform

#: poll-family and select-family syscall numbers (x86_64, aarch64).
_ARCH = _platform.machine()
POLL_SYSCALLS = {"x86_64": {7, 271}, "aarch64": {73}}.get(_ARCH, set())
PPOLL = {"x86_64": 271, "aarch64": 73}.get(_ARCH)
SELECT_SYSCALLS = {"x86_64": {23, 270}, "aarch64": {72}}.get(_ARCH, set())
#: Why syscall-watching tests cannot run here, or None when they can.
NO_SYSCALL_TABLE = (None if POLL_SYSCALLS and _os.access("/proc/self/task", _os.R_OK)
                    else f"no syscall table for {_ARCH} or no /proc/self/task")


def syscall_of(tid, pid="self"):
    """(number, [args]) of the syscall thread ``tid`` is blocked in, or None
    (running, gone, or unreadable)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall") as f:
            fields = f.read().split()
    except OSError:
        return None
    if not fields or not fields[0].isdigit():
        return None
    return int(fields[0]), [int(a, 16) for a in fields[1:7]]


def in_syscall(tid, numbers, pid="self"):
    """Whether thread ``tid`` (of process ``pid``) is blocked in one of the
    syscalls ``numbers``."""
    call = syscall_of(tid, pid)
    return call is not None and call[0] in numbers


def in_poll(tid, pid="self"):
    """Whether thread ``tid`` is blocked in poll()/ppoll()."""
    return in_syscall(tid, POLL_SYSCALLS, pid)


def read_all(sock):
    """Everything the peer sends until it closes (or the socket's timeout)."""
    chunks = []
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


#: Code for a child process (run it with ``-c``): exhaust_descriptors()
#: lowers RLIMIT_NOFILE to just above the descriptors open now and fills
#: the rest, so that the next accept() fails with EMFILE; it returns the
#: fillers, to close for recovery.
EXHAUST_DESCRIPTORS = textwrap.dedent("""
    def exhaust_descriptors():
        import os, resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (top + 2, hard))
        filler = []
        try:
            while True:
                filler.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        return filler
""")


def kernel_somaxconn():
    """net.core.somaxconn read from /proc here, not through the library:
    what a default backlog must be."""
    with open("/proc/sys/net/core/somaxconn") as f:
        return int(f.read())
