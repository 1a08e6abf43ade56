"""The accept filter's cost and effect (issue 19), side by side in one run.

    python bench/accept_filter.py cost [N]      instructions per connection (callgrind)
    python bench/accept_filter.py cpu [N] [R]   CPU seconds per connection, R rounds
    python bench/accept_filter.py silent [K]    K silent clients and one ready one
    python bench/accept_filter.py herd [T...]   T leader/follower threads, dribbling clients

``cost``: a tight ``Listener.accept_many`` loop (accept, close) under
``valgrind --tool=callgrind`` with collection switched on only while N
connections arrive, once per rule (none, data, line, http), each in its
own server process; the clients send a small HTTP request head and close.
Two client patterns: ``at-once`` (the head is sent with the connect, so it
is there when the core accepts) and ``late`` (the request line first, the
rest 20 ms later, so most connections wait in the filter).  Prints
instructions per connection and the ratio to rule 'none'.  Instruction
counts do not depend on the machine's load, as times do.

Callgrind counts user-space instructions only: the filter's extra system
call per connection (one recv with MSG_PEEK, an epoll_ctl and an
epoll_wait for one that waits) costs kernel time it does not see.  ``cpu``
measures that too: the same server without valgrind reports its own CPU
time (user + system, getrusage) over N connections, per rule, in R rounds
taken in turn (none, data, line, http, http+defer, none, ...); the medians
and the median of the per-round ratios to 'none' are printed.
'http+defer' is rule 'http' on a listener with ``defer_accept=1``
(TCP_DEFER_ACCEPT): the kernel wakes the server once a connection's first
data has arrived, so the filter rarely has to hold one.

``silent``: K clients connect and say nothing, then one client sends a
line: with rule 'line' the first connection accept returns is the ready
one (the silent ones wait in the core), with max_waiting=K/5 too (the
oldest are evicted); without a filter it comes after the K silent ones.
"""

from __future__ import annotations

import glob
import json
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time

HEAD = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
HERE = os.path.dirname(os.path.abspath(__file__))


def serve(rule: str, count: int = 0) -> None:
    """The measured server: accept_many in a loop, closing each connection,
    until 'stop' on stdin; prints its port first and its counters last.
    With count, it also prints the CPU seconds it used from the first of
    its last ``count`` connections to the last."""
    import resource

    import fastlisten

    rule, _, defer = rule.partition("+")
    lst = fastlisten.listen(("127.0.0.1", 0), defer_accept=1 if defer else None)
    if rule != "none":
        lst.set_accept_filter(rule, timeout=30)
    print("port", lst.address[1], flush=True)
    def used() -> float:
        use = resource.getrusage(resource.RUSAGE_SELF)
        return use.ru_utime + use.ru_stime

    taken, start, start_at, per = 0, 0.0, 0, 0.0
    while True:
        batch = lst.accept_many(64, timeout=0.2)
        for conn, _ in batch:
            conn.close()
        taken += len(batch)
        if count and not start_at and taken >= 100:         # after a warm-up
            start, start_at = used(), taken
        elif count and start_at and not per and taken >= start_at + count:
            per = (used() - start) / (taken - start_at)
        if not batch and select.select([sys.stdin], [], [], 0)[0]:
            break
    stats = lst.stats()
    out = {k: stats[k] for k in ("accepted", "waited", "made_ready", "dropped")}
    out["cpu_per_connection"] = per
    print(json.dumps(out), flush=True)
    lst.close()


def clients(port: int, n: int, pattern: str) -> None:
    """n connections, 50 at a time, each sending HEAD and closing."""
    for start in range(0, n, 50):
        group = [socket.create_connection(("127.0.0.1", port))
                 for _ in range(min(50, n - start))]
        if pattern == "at-once":
            for c in group:
                c.sendall(HEAD)
        else:
            for c in group:
                c.sendall(HEAD[:16])
            time.sleep(0.02)
            for c in group:
                try:
                    c.sendall(HEAD[16:])
                except OSError:
                    pass        # rule 'none' took and closed it already
        for c in group:
            c.close()


def measure(rule: str, pattern: str, n: int) -> float:
    out = os.path.join(os.environ.get("CALLGRIND_DIR", "/tmp"),
                       f"callgrind.out.filter.{rule}.{pattern}")
    for old in glob.glob(out + "*"):
        os.remove(old)
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
         sys.executable, os.path.abspath(__file__), "serve", rule],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = int(proc.stdout.readline().split()[1])
        clients(port, 100, pattern)              # warm-up, outside the count
        time.sleep(1.0)
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        clients(port, n, pattern)
        time.sleep(2.0)         # the server, slow under valgrind, drains the queue
        subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        counters = json.loads(proc.stdout.readline())
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    total = 0
    for path in glob.glob(out + "*"):
        report = subprocess.run(["callgrind_annotate", path], capture_output=True, text=True)
        m = re.search(r"^\s*([\d,]+) .*PROGRAM TOTALS", report.stdout, re.M)
        if m:
            total += int(m.group(1).replace(",", ""))
    print(f"  {rule:5} {pattern:8} {counters}", file=sys.stderr)
    return total / n


def cost(n: int) -> None:
    rules = ["none", "data", "line", "http"]
    print("| client pattern | " + " | ".join(rules) + " |")
    print("|:---|" + "---:|" * len(rules))
    for pattern in ("at-once", "late"):
        per = {rule: measure(rule, pattern, n) for rule in rules}
        base = per["none"]
        print(f"| {pattern} | " + " | ".join(
            f"{per[r] / 1000:,.1f} k ({per[r] / base:.2f}x)" for r in rules) + " |",
            flush=True)


def cpu_run(rule: str, n: int) -> float:
    """One server process (no valgrind): its CPU seconds per connection."""
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "serve", rule, str(n)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline().split()[1])
        clients(port, n + 200, "at-once")
        time.sleep(0.5)
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        counters = json.loads(proc.stdout.readline())
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"  {rule:5} {counters}", file=sys.stderr)
    return counters["cpu_per_connection"]


def cpu(n: int, rounds: int) -> None:
    import statistics

    rules = ["none", "data", "line", "http", "http+defer"]
    per = {rule: [] for rule in rules}
    for _ in range(rounds):
        for rule in rules:
            per[rule].append(cpu_run(rule, n))
    print("| | " + " | ".join(rules) + " |")
    print("|:---|" + "---:|" * len(rules))
    print("| CPU per connection, median | " + " | ".join(
        f"{statistics.median(per[r]) * 1e6:.1f} us" for r in rules) + " |")
    print("| ratio to none, median of rounds | " + " | ".join(
        f"{statistics.median(a / b for a, b in zip(per[r], per['none'])):.2f}x"
        for r in rules) + " |")


def _silent_clients(port: int, k: int) -> None:
    """In a child: k silent connections held open until stdin closes."""
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(k)]
    print("connected", flush=True)
    sys.stdin.read()
    for c in held:
        c.close()


def silent(k: int) -> None:
    import fastlisten

    for label, rule, cap in (("no filter", None, None), ("rule line", "line", None),
                             (f"rule line, max_waiting={k // 5}", "line", k // 5)):
        lst = fastlisten.listen(("127.0.0.1", 0), backlog=4096)
        if rule is not None:
            lst.set_accept_filter(rule, timeout=60, max_waiting=cap or k + 10)
        child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "hold",
                                  str(lst.address[1]), str(k)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            child.stdout.readline()
            before = []
            # let the core take in the silent ones (nothing ready: returns empty)
            deadline = time.monotonic() + 30
            while rule is not None and time.monotonic() < deadline:
                lst.accept_many(64, timeout=0.05)
                st = lst.stats()
                if st["waiting"] + st["dropped"].get("evicted", 0) >= k:
                    break
            ready = socket.create_connection(lst.address)
            ready.sendall(b"hello\n")
            sent = time.monotonic()
            order = 0
            got = None
            while got is None and time.monotonic() < sent + 30:
                for conn, addr in lst.accept_many(64, timeout=1.0):
                    order += 1
                    if addr == ready.getsockname():
                        got = time.monotonic() - sent
                    before.append(conn)
            st = lst.stats()
            print(f"{label}: the ready client was connection #{order} returned, "
                  f"{got * 1000:.1f} ms after its line; waiting {st['waiting']}, "
                  f"evicted {st['dropped'].get('evicted', 0)}, handed over {st['accepted']}")
            for conn in before:
                conn.close()
            ready.close()
        finally:
            child.stdin.close()
            child.wait(timeout=30)
            lst.close()


def _dribblers(port: int, k: int, seconds: float) -> None:
    """In a child: k connections each sending one byte of a never-ending
    line every 0.1 s for ``seconds``."""
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(k)]
    print("connected", flush=True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for c in held:
            c.send(b"x")
        time.sleep(0.1)
    for c in held:
        c.close()


def herd(threads: list) -> None:
    """The CPU a listener's process spends while 200 clients dribble a byte
    every 0.1 s each (2,000 segments a second) into connections waiting in
    its filter, with T leader/follower threads waiting on it: every idle
    waiter wakes for every segment (an epoll descriptor cannot be watched
    EPOLLEXCLUSIVE), one judges it."""
    import resource

    import fastlisten

    for t in threads:
        lst = fastlisten.listen(("127.0.0.1", 0))
        lst.set_accept_filter("line", timeout=60)
        stop = lst.new_stop()
        workers = []

        def work() -> None:
            w = lst.waiter(stop)
            try:
                while not stop.fenced:
                    for conn, _ in lst.accept_many(1, None, w):
                        conn.close()
            finally:
                w.close()

        for _ in range(t):
            workers.append(threading.Thread(target=work))
            workers[-1].start()
        child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "dribble",
                                  str(lst.address[1]), "200", "3"],
                                 stdout=subprocess.PIPE, text=True)
        child.stdout.readline()
        use = resource.getrusage(resource.RUSAGE_SELF)
        before, wall = use.ru_utime + use.ru_stime, time.monotonic()
        child.wait(timeout=60)
        use = resource.getrusage(resource.RUSAGE_SELF)
        cpu, wall = use.ru_utime + use.ru_stime - before, time.monotonic() - wall
        stop.set()
        for w in workers:
            w.join(10)
        stop.close()
        st = lst.stats()
        print(f"{t:3} waiting threads: {cpu / wall * 100:5.1f} % of a CPU for "
              f"{st['waiting_peak']} connections dribbling ({st['dropped']})")
        lst.close()


def main() -> int:
    what = sys.argv[1]
    if what == "serve":
        serve(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    elif what == "hold":
        _silent_clients(int(sys.argv[2]), int(sys.argv[3]))
    elif what == "cost":
        cost(int(sys.argv[2]) if len(sys.argv) > 2 else 2000)
    elif what == "cpu":
        cpu(int(sys.argv[2]) if len(sys.argv) > 2 else 5000,
            int(sys.argv[3]) if len(sys.argv) > 3 else 5)
    elif what == "herd":
        herd([int(t) for t in sys.argv[2:]] or [1, 4, 16])
    elif what == "dribble":
        _dribblers(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    elif what == "silent":
        silent(int(sys.argv[2]) if len(sys.argv) > 2 else 500)
    else:
        raise SystemExit(__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
