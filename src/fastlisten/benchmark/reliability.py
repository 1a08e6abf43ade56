"""``fastlisten reliability``: fastlisten's threading server and the standard
library's, side by side, under the loads that break servers.

Each server runs in a child process of its own (so that its descriptors,
threads, memory and CPU time can be read from ``/proc/<pid>``); the clients
run here, on loopback, bounded in count and time.  Scenarios:

- **abort storm**: connections reset (``SO_LINGER`` 0) as soon as they are
  made; then the time until a normal request is answered (the server has
  worked through the storm), and the server's descriptors/threads after;
- **soak**: many short requests: RSS, descriptors and threads before/after;

("after" is once idle threads have retired, up to 8 s: fastlisten's pool
keeps an idle thread for ``fl_thread_idle_timeout``, 5 s, and each idle
leader/follower worker holds one epoll descriptor until then; --quick does
not wait.)
- **EMFILE storm**: the server at ``RLIMIT_NOFILE=64``, held connections
  use up its descriptors: its CPU share while it is out of them, and the
  time until it answers again once they are released;
- **handler faults**: every other handler raises: the others' success rate
  and the descriptors after;
- **SIGINT stop**: time from SIGINT to ``serve_forever()`` giving up
  (``KeyboardInterrupt`` caught), under load ("never" for a server that
  had not stopped after 10 s: it is killed);
- **slowloris**: silent clients and clients that send a byte a second
  hold on while normal clients make requests (each with a short timeout):
  their success rate and p99 (beside their p99 before the slow clients
  came), and the threads and descriptors the slow clients hold, against an
  unbounded server, one with ``max_threads=8``, one that adds
  ``defer_accept`` (silent clients stay in the kernel), and two that add
  fastlisten's accept filter (``ready_rule`` 'line' or 'http': a
  connection reaches a thread once its request has arrived).

Figures are ratios and counts from one run on this machine; they are not
asserted anywhere.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = ["SERVERS", "SCENARIOS", "Sizes", "run", "markdown"]

#: The servers compared: a label and the class the child serves with.
SERVERS = {
    "fastlisten": "fastlisten.server.ThreadingTCPServer",
    "stdlib": "socketserver.ThreadingTCPServer",
}

_CHILD = textwrap.dedent("""
    import importlib, json, os, resource, socketserver, sys
    module, _, name = sys.argv[1].rpartition(".")
    base = getattr(importlib.import_module(module), name)
    nofile = int(sys.argv[2])
    options = json.loads(sys.argv[3])
    if nofile:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            line = self.rfile.readline()
            if line == b"fault\\n":
                raise RuntimeError("a handler fault")
            if line.startswith(b"GET "):     # an HTTP head: read it all, echo its first line
                while self.rfile.readline() not in (b"\\r\\n", b"\\n", b""):
                    pass
            self.wfile.write(line)

    class Server(base):
        daemon_threads = True
        block_on_close = False
        request_queue_size = 4096       # the stdlib's 5 would measure its backlog
        allow_reuse_address = True

        def handle_error(self, request, client_address):
            pass                         # counted by the clients, not printed

    if "max_threads" in options:
        Server.fl_max_threads = options["max_threads"]
    listen = {k: v for k, v in options.items() if k in ("defer_accept", "ready_rule")}
    if listen:
        import fastlisten
        Server.listen_config = fastlisten.ListenConfig(**listen)

    with Server(("127.0.0.1", 0), Handler) as server:
        print(server.server_address[1], flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("stopped", flush=True)
""")


#: Each size: (with --quick, full run).
_SIZES: Dict[str, Tuple[Any, Any]] = {
    "aborts": (500, 20000),             # connections reset in the abort storm
    "soak": (500, 100000),              # requests in the soak
    "soak_threads": (4, 16),            # client threads making them
    "emfile_held": (80, 200),           # connections held in the EMFILE storm
    "emfile_window": (0.3, 2.0),        # s of CPU measured while out of descriptors
    "faults": (100, 2000),              # requests in handler-faults (half fail)
    "sigint_cycles": (2, 20),
    "slow_silent": (40, 500),           # slowloris: clients that send nothing
    "slow_dribble": (20, 500),          # ... and a byte a second
    "slow_normal": (8, 40),             # normal requests meanwhile
    "slow_normal_timeout": (1.0, 2.0),  # s each may take
    "retire_wait": (0.0, 8.0),          # s "after" figures wait for idle threads to retire
}


class Sizes:
    """How big each scenario is (``quick``: small enough for a test); the
    attributes are the keys of _SIZES, and ``timeout`` (s) for anything
    that should not take long at all."""

    def __init__(self, quick: bool = False) -> None:
        for name, (small, full) in _SIZES.items():
            setattr(self, name, small if quick else full)
        self.timeout = 30.0

    def __getattr__(self, name: str) -> Any:
        """(Only reached for a name that is not a size: for type checkers,
        which cannot see the setattr above.)"""
        raise AttributeError(name)


#: The kernel functions a thread blocked reading a stream socket sleeps in
#: (``/proc/<pid>/task/<tid>/wchan``; TCP and Unix sockets, old and new kernels).
_RECV_WAITS = ("wait_woken", "sk_wait_data", "unix_stream_read_generic")


class _Child:
    """A server in a child process."""

    def __init__(self, server: str, nofile: int = 0,
                 options: Optional[Dict[str, Any]] = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, SERVERS[server], str(nofile),
             json.dumps(options or {})],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.strip().isdigit():
            self.close()
            raise RuntimeError(f"the {server} server did not start")
        self.address = ("127.0.0.1", int(line))
        # One request answered: serve_forever runs (its wake-up descriptor
        # is open) and the handler's first-use costs are paid, so that
        # "before" figures are taken from a serving server.
        try:
            _ask(self.address)
        except OSError:
            self.close()
            raise

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))

    def threads_reading(self) -> Optional[int]:
        """Threads asleep in a socket read (a handler waiting for its
        client): the kernel function each sleeps in (``wchan``) is a
        stream socket's receive wait.  None where /proc does not say (every
        thread's wchan reads 0: the serving thread at least sleeps in a
        poll, so a kernel that shows wchan at all names something)."""
        try:
            tids = os.listdir(f"/proc/{self.proc.pid}/task")
        except OSError:
            return None
        waits = []
        for tid in tids:
            try:
                with open(f"/proc/{self.proc.pid}/task/{tid}/wchan") as f:
                    waits.append(f.read().strip())
            except OSError:
                pass                        # the thread is gone
        if all(w in ("", "0") for w in waits):
            return None
        return sum(w in _RECV_WAITS for w in waits)

    def rss_kb(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def cpu_s(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def settled(self, probe: Callable[[], int], limit: float = 10.0) -> int:
        """probe() once it stopped changing (threads finishing), bounded."""
        deadline = time.monotonic() + limit
        last = probe()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = probe()
            if now == last:
                return now
            last = now
        return last

    def threads_after(self, before: int, limit: float) -> int:
        """Threads once idle ones are back to ``before`` (fastlisten's pool
        retires an idle thread after fl_thread_idle_timeout, 5 s), bounded."""
        deadline = time.monotonic() + limit
        while self.threads() > before and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.settled(self.threads)

    def stop(self, limit: float = 10.0) -> Optional[float]:
        """SIGINT; seconds until serve_forever() gave up (KeyboardInterrupt
        caught: the interpreter's own exit is not counted), or None if it
        had not within ``limit`` seconds (the server is killed then).
        (CPython 3.9's own ThreadingTCPServer once never did: its serving
        thread waited in Thread.start() for a thread that was gone.)"""
        start = time.perf_counter()
        self.proc.send_signal(signal.SIGINT)
        try:
            out = self.proc.stdout
            ready = out is not None and select.select([out], [], [], limit)[0]
            line = out.readline() if ready else None    # type: ignore[union-attr]
            elapsed = time.perf_counter() - start
            if line is not None:
                self.proc.wait(30)
        finally:
            self.close()
        if line is None:
            return None
        if line != "stopped\n":
            raise RuntimeError("the server did not stop on SIGINT")
        return elapsed

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


def _ask(address: Tuple[str, int], line: bytes = b"ping\n", timeout: float = 30.0) -> bytes:
    with socket.create_connection(address, timeout=timeout) as c:
        c.sendall(line)
        return c.makefile("rb").readline()


def _time_to_answer(address: Tuple[str, int], limit: float) -> Optional[float]:
    """Seconds until a request is answered (retrying refused or failed
    attempts), None if not within ``limit``."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit:
        try:
            if _ask(address, timeout=limit) == b"ping\n":
                return time.perf_counter() - start
        except OSError:
            time.sleep(0.01)
    return None


def _in_threads(n: int, threads: int, work: Callable[[], bool]) -> int:
    """Run work() n times over ``threads`` client threads; how many returned True."""
    ok = [0] * threads

    def loop(i: int) -> None:
        for _ in range(n // threads + (1 if i < n % threads else 0)):
            try:
                ok[i] += bool(work())
            except OSError:
                pass

    ts = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(ok)


def abort_storm(server: str, sizes: Sizes) -> Dict[str, Any]:
    child = _Child(server)
    try:
        fds0, threads0 = child.settled(child.fds), child.settled(child.threads)
        linger = b"\x01\0\0\0\0\0\0\0"
        for _ in range(sizes.aborts):
            with socket.create_connection(child.address, timeout=sizes.timeout) as c:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        drain = _time_to_answer(child.address, sizes.timeout)
        threads_added = child.threads_after(threads0, sizes.retire_wait) - threads0
        return {"drain_ms": None if drain is None else drain * 1000,
                "fds_added": child.settled(child.fds) - fds0,
                "threads_added": threads_added}
    finally:
        child.close()


def soak(server: str, sizes: Sizes) -> Dict[str, Any]:
    child = _Child(server)
    try:
        fds0, threads0 = child.settled(child.fds), child.settled(child.threads)
        rss0 = child.rss_kb()
        ok = _in_threads(sizes.soak, sizes.soak_threads,
                         lambda: _ask(child.address) == b"ping\n")
        threads_added = child.threads_after(threads0, sizes.retire_wait) - threads0
        return {"served": ok / sizes.soak,
                "rss_added_kb": child.rss_kb() - rss0,
                "fds_added": child.settled(child.fds) - fds0,
                "threads_added": threads_added}
    finally:
        child.close()


def emfile_storm(server: str, sizes: Sizes) -> Dict[str, Any]:
    child = _Child(server, nofile=64)
    held: List[socket.socket] = []
    try:
        for _ in range(sizes.emfile_held):
            c = socket.create_connection(child.address, timeout=sizes.timeout)
            c.sendall(b"x")                 # no newline: the handler waits
            held.append(c)
        deadline = time.monotonic() + sizes.timeout
        while child.fds() < 60 and time.monotonic() < deadline:
            time.sleep(0.05)                 # it took what it could
        cpu0, t0 = child.cpu_s(), time.perf_counter()
        time.sleep(sizes.emfile_window)      # the measuring window itself
        cpu = (child.cpu_s() - cpu0) / (time.perf_counter() - t0)
        for c in held:
            c.close()
        held = []
        recover = _time_to_answer(child.address, sizes.timeout)
        return {"cpu_share": cpu, "recover_ms": None if recover is None else recover * 1000}
    finally:
        for c in held:
            c.close()
        child.close()


def handler_faults(server: str, sizes: Sizes) -> Dict[str, Any]:
    child = _Child(server)
    try:
        fds0, threads0 = child.settled(child.fds), child.settled(child.threads)
        counter = iter(range(sizes.faults))
        lock = threading.Lock()
        good = [0, 0]                          # normal requests: answered, made

        def one() -> bool:
            with lock:
                i = next(counter)
            fault = i % 2 == 0
            try:
                reply = _ask(child.address, b"fault\n" if fault else b"ping\n")
            except OSError:
                reply = b""
            if not fault:
                with lock:
                    good[1] += 1
                    good[0] += reply == b"ping\n"
            return True

        _in_threads(sizes.faults, 4, one)
        threads_added = child.threads_after(threads0, sizes.retire_wait) - threads0
        return {"normal_served": good[0] / max(good[1], 1),
                "fds_added": child.settled(child.fds) - fds0,
                "threads_added": threads_added}
    finally:
        child.close()


def sigint_stop(server: str, sizes: Sizes) -> Dict[str, Any]:
    times = []
    for _ in range(sizes.sigint_cycles):
        child = _Child(server)
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                try:
                    _ask(child.address, timeout=2)
                except OSError:
                    return

        loaders = [threading.Thread(target=load) for _ in range(4)]
        try:
            for t in loaders:
                t.start()
            _ask(child.address)
            times.append(child.stop(sizes.timeout / 3))
        finally:
            stop.set()
            for t in loaders:
                t.join()
            child.close()
    stopped = [t for t in times if t is not None]
    # a server that did not stop within the limit: max "never"
    return {"stop_ms_median": statistics.median(stopped) * 1000 if stopped else None,
            "stop_ms_max": max(stopped) * 1000 if len(stopped) == len(times) else None}


#: Slow-client defences measured, and the options of the server they need
#: (the stdlib has neither max_threads, defer_accept nor an accept filter:
#: unbounded only).  The accept filter's rows ("+line", "+http") hand a
#: connection to a thread only once its request line, or its whole HTTP
#: request head, has arrived; their normal clients speak what the rule waits
#: for (a line; an HTTP/1.0 request head), the slow ones never finish it.
SLOW_DEFENCES: Dict[str, Dict[str, Any]] = {
    "unbounded": {},
    "max_threads=8": {"max_threads": 8},
    "max_threads=8+defer_accept": {"max_threads": 8, "defer_accept": 30},
    "max_threads=8+line": {"max_threads": 8, "ready_rule": "line"},
    "max_threads=8+http": {"max_threads": 8, "ready_rule": "http"},
}

#: What a normal client sends (and reads back: the server echoes the first
#: line), by the defence's ready_rule.
_NORMAL_REQUEST = {None: b"ping\n", "line": b"ping\n",
                   "http": b"GET /ping HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"}

#: The figures slowloris gives per defence (the filter's rows only where the
#: server has the defence: fastlisten's).
SLOW_FIGURES = ("normal_served", "p99_ms", "p99_idle_ms", "threads_held", "fds_held")


def _slow_clients(address: Tuple[str, int], sizes: Sizes, stop: threading.Event
                  ) -> Tuple[List[socket.socket], threading.Thread]:
    """Silent clients (connect, send nothing) and dribbling ones (a byte a
    second, never a whole line), until stop is set."""
    silent = [socket.create_connection(address, timeout=sizes.timeout)
              for _ in range(sizes.slow_silent)]
    dribble = [socket.create_connection(address, timeout=sizes.timeout)
               for _ in range(sizes.slow_dribble)]

    def drip() -> None:
        while not stop.is_set():
            for c in dribble:
                try:
                    c.send(b"x")
                except OSError:
                    pass
            stop.wait(1.0)

    t = threading.Thread(target=drip)
    t.start()
    return silent + dribble, t


def _p99(latencies: List[float]) -> Optional[float]:
    """The 99th percentile in ms, None without a value."""
    if not latencies:
        return None
    latencies = sorted(latencies)
    return latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000


def _normal_clients(address: Tuple[str, int], sizes: Sizes, request: bytes
                    ) -> Tuple[float, Optional[float]]:
    """sizes.slow_normal requests over 4 client threads, each within
    slow_normal_timeout: (share answered, p99 ms of those answered)."""
    latencies: List[float] = []
    lock = threading.Lock()
    expect = request.split(b"\n", 1)[0] + b"\n"

    def normal() -> bool:
        start = time.perf_counter()
        ok = _ask(address, request, timeout=sizes.slow_normal_timeout) == expect
        if ok:
            with lock:
                latencies.append(time.perf_counter() - start)
        return ok

    served = _in_threads(sizes.slow_normal, 4, normal)
    return served / sizes.slow_normal, _p99(latencies)


def slowloris(server: str, sizes: Sizes) -> Dict[str, Any]:
    """Normal clients' success rate and p99 while slow clients hold on,
    with each defence the server offers; beside them the p99 of the same
    normal clients before the slow ones came (``p99_idle_ms``), and the
    threads and descriptors the server holds once the slow clients are
    connected (``threads_held``: threads asleep reading a client, see
    _Child.threads_reading; ``fds_held``: descriptors beyond what it held
    before; both read from /proc before the normal clients start, once they
    stopped changing)."""
    out: Dict[str, Any] = {}
    for defence, options in SLOW_DEFENCES.items():
        if options and server != "fastlisten":
            continue
        request = _NORMAL_REQUEST[options.get("ready_rule")]
        child = _Child(server, options=options)
        stop = threading.Event()
        slow: List[socket.socket] = []
        dripper = None
        try:
            _, p99_idle = _normal_clients(child.address, sizes, request)
            fds0 = child.settled(child.fds)
            slow, dripper = _slow_clients(child.address, sizes, stop)
            child.settled(child.threads)
            threads_held = child.threads_reading()
            if threads_held is not None:            # ... once all got to their read
                threads_held = child.settled(lambda: child.threads_reading() or 0)
            fds_held = child.settled(child.fds) - fds0
            served, p99 = _normal_clients(child.address, sizes, request)
        finally:
            stop.set()
            if dripper is not None:
                dripper.join()
            for c in slow:
                c.close()
            child.close()
        out[f"{defence}: normal_served"] = served
        out[f"{defence}: p99_ms"] = p99
        out[f"{defence}: p99_idle_ms"] = p99_idle
        out[f"{defence}: threads_held"] = threads_held
        out[f"{defence}: fds_held"] = fds_held
    return out


#: Scenario name -> function(server, sizes) -> figures.
SCENARIOS: Dict[str, Callable[[str, Sizes], Dict[str, Any]]] = {
    "abort-storm": abort_storm,
    "soak": soak,
    "emfile-storm": emfile_storm,
    "handler-faults": handler_faults,
    "sigint-stop": sigint_stop,
    "slowloris": slowloris,
}


def run(scenarios: Optional[List[str]] = None, quick: bool = False,
        progress: Optional[Callable[[str], None]] = None) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """{scenario: {server: figures}}, each scenario run on every server in
    turn (the same sizes for both)."""
    sizes = Sizes(quick)
    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for name in scenarios or list(SCENARIOS):
        out[name] = {}
        for server in SERVERS:
            if progress is not None:
                progress(f"{name}: {server}")
            out[name][server] = SCENARIOS[name](server, sizes)
    return out


def _fmt(key: str, value: Any) -> str:
    if value is None:
        if key.endswith("_held"):
            return "n/a"                # /proc did not say
        return "no reply" if "p99" in key else "never"
    if key.endswith(("share", "served")):
        return f"{value * 100:.1f} %"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return f"{value:+,}" if key.endswith(("added", "added_kb", "fds_held")) else f"{value:,}"


def markdown(results: Dict[str, Dict[str, Dict[str, Any]]]) -> str:
    """The results as one Markdown table: a row per scenario and figure."""
    servers = list(SERVERS)
    lines = ["| scenario | figure | " + " | ".join(servers) + " |",
             "|---|---|" + "---:|" * len(servers)]
    for name, by_server in results.items():
        keys = list(next(iter(by_server.values())))
        for key in keys:
            cells = [_fmt(key, by_server[s][key]) if key in by_server[s] else "n/a"
                     for s in servers]
            lines.append(f"| {name} | {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
