"""``fastlisten bench --restarts``: what restarts cost under a steady load.

The native load generator keeps ``concurrency`` connections going (the
``daytime`` exchange: connect, read a 40-byte line, EOF) against
``fastlisten serve --workers`` while the supervisor is told to:

- reload (SIGHUP) ``cycles`` times;
- recycle workers through ``--max-requests`` (about ``cycles`` times);
- scale up and down (SIGTTIN/SIGTTOU);
- lose a worker to SIGKILL ``cycles`` times (only connections that worker
  had accepted may be lost: they are counted from its open sockets just
  before the kill);

in both ways of sharing the port, beside a naive restart (one process,
stopped with SIGTERM, then started again on the same port) and graceful
stops of one process (its queued clients served, not reset; those that
come once the port is closed are refused, and not counted as lost).  Lost
connections are the load generator's errors (refused, reset, short reply)
and timeouts.  Then balance (connections per worker, max/min, with 2 and 4
workers) and scale (connections/s, CPU per connection and context switches
per connection with 1, 2 and 4 workers: the thundering-herd cost of one
shared socket shows in the last).
"""

from __future__ import annotations

import errno
import os
import queue
import re
import signal
import socketserver
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from fastlisten import sysinfo
from fastlisten.benchmark.loadgen import LoadResult, run_load
from fastlisten.benchmark.protocol import REPLY

__all__ = ["Reply", "run_restarts", "to_text"]

MODES = ("shared", "reuse-port")
HANDLER = "fastlisten.benchmark.restarts:Reply"


class Reply(socketserver.BaseRequestHandler):
    """The daytime scenario's server side: write the line, close."""

    def handle(self) -> None:
        self.request.sendall(REPLY)


class _Served:
    """``fastlisten serve`` in a child process, its stderr read by a thread."""

    def __init__(self, args: List[str]) -> None:
        # (Reply speaks first: serve's default rule for a handler of one's
        # own, 'data', would wait for the client)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastlisten", "serve", HANDLER, "--ready-rule", "none", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("listening on "):
            self.close()
            raise RuntimeError(f"fastlisten serve did not start: {line!r}")
        self.port = int(line.rsplit(":", 1)[1])

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def expect(self, pattern: str, timeout: float = 30.0) -> "re.Match[str]":
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise RuntimeError(f"no {pattern!r} from fastlisten serve in {timeout} s") \
                    from None
            if line is None:
                raise RuntimeError(f"fastlisten serve ended before {pattern!r}")
            m = rx.search(line)
            if m:
                return m

    def workers(self) -> List[int]:
        return sysinfo.children(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def _cpu_and_switches(pid: int) -> Tuple[float, int]:
    """(CPU seconds, context switches) of process pid so far."""
    try:
        return sysinfo.process_cpu_seconds(pid), sysinfo.context_switches(pid)
    except ProcessLookupError:
        return 0.0, 0


class _Load:
    """run_load in a thread, for ``duration`` seconds."""

    def __init__(self, port: int, duration: float, concurrency: int) -> None:
        self.result: List[Any] = []
        self._thread = threading.Thread(target=self._run, args=(port, duration, concurrency),
                                         daemon=True)
        self._thread.start()

    def _run(self, port: int, duration: float, concurrency: int) -> None:
        try:
            self.result.append(run_load(("127.0.0.1", port), "daytime",
                                        concurrency=concurrency, total=10_000_000,
                                        duration=duration, timeout=5.0))
        except BaseException as exc:     # noqa: BLE001 - reported by join()
            self.result.append(exc)

    def join(self) -> LoadResult:
        self._thread.join()
        out = self.result[0]
        if isinstance(out, BaseException):
            raise out
        return out


def _row(load: LoadResult, events: int, **extra: Any) -> Dict[str, Any]:
    return {"events": events, "completed": load.completed, "lost": load.errors + load.timeouts,
            "errors": load.errors, "timeouts": load.timeouts, "first_errno": load.first_errno,
            "rate": load.rate, **extra}


def _paced(events: int, duration: float, event: Callable[[int], Any]) -> int:
    """Run event(i) ``events`` times spread over ``duration`` seconds."""
    start = time.monotonic()
    for i in range(events):
        wait = start + (i + 0.5) * duration / events - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        event(i)
    return events


def _supervised(mode: str, workers: int, *extra: str) -> _Served:
    args = ["--bind", "127.0.0.1:0", "--workers", str(workers), "--graceful-timeout", "5",
            *extra]
    if mode == "reuse-port":
        args.append("--reuse-port")
    served = _Served(args)
    served.expect(r"worker\(s\) accepting")
    return served


def reload_scenario(mode: str, cycles: int, duration: float, concurrency: int) -> Dict[str, Any]:
    """``cycles`` SIGHUP reloads under load."""
    served = _supervised(mode, 2)
    try:
        load = _Load(served.port, duration, concurrency)

        def reload(i: int) -> None:
            served.proc.send_signal(signal.SIGHUP)
            served.expect(rf"reloaded: generation {i + 1} accepting")
        n = _paced(cycles, duration * 0.8, reload)
        return _row(load.join(), n)
    finally:
        served.stop()


def recycle_scenario(mode: str, cycles: int, duration: float, concurrency: int,
                     expected_rate: float) -> Dict[str, Any]:
    """Workers recycled by --max-requests about ``cycles`` times under load."""
    # aim above ``cycles``: the rate under recycling is below expected_rate
    per_worker = max(int(expected_rate * duration / (1.5 * cycles + 2)), 50)
    served = _supervised(mode, 2, "--max-requests", str(per_worker),
                         "--max-requests-jitter", str(per_worker // 10))
    try:
        load = _Load(served.port, duration, concurrency)
        result = load.join()
        recycled = 0
        while True:
            try:
                line = served.lines.get_nowait()
            except queue.Empty:
                break
            if line and "reached max_requests" in line:
                recycled += 1
        return _row(result, recycled, max_requests=per_worker)
    finally:
        served.stop()


def scale_scenario(mode: str, cycles: int, duration: float, concurrency: int) -> Dict[str, Any]:
    """SIGTTIN then SIGTTOU, ``cycles`` times each, under load (2 to 3 workers)."""
    served = _supervised(mode, 2)
    try:
        load = _Load(served.port, duration, concurrency)

        def step(i: int) -> None:
            served.proc.send_signal(signal.SIGTTIN if i % 2 == 0 else signal.SIGTTOU)
            served.expect("one worker more" if i % 2 == 0 else "one worker fewer")
        n = _paced(2 * cycles, duration * 0.8, step)
        return _row(load.join(), n)
    finally:
        served.stop()


def kill_scenario(mode: str, cycles: int, duration: float, concurrency: int) -> Dict[str, Any]:
    """A worker killed with SIGKILL ``cycles`` times under load; the
    connections it held (its sockets less its listening one) are counted
    just before each kill."""
    served = _supervised(mode, 2)
    held = 0
    try:
        load = _Load(served.port, duration, concurrency)

        def kill(i: int) -> None:
            nonlocal held
            pids = served.workers()
            if not pids:
                return
            victim = pids[i % len(pids)]
            held += max(sysinfo.open_sockets(victim) - 1, 0)
            os.kill(victim, signal.SIGKILL)
            served.expect(rf"worker {victim} ended")
        n = _paced(cycles, duration * 0.8, kill)
        return _row(load.join(), n, held_by_killed=held)
    finally:
        served.stop()


def naive_scenario(cycles: int, duration: float, concurrency: int) -> Dict[str, Any]:
    """One process, stopped (SIGTERM) and started again on its port, ``cycles`` times."""
    served = _Served(["--bind", "127.0.0.1:0", "--grace", "5"])
    port = served.port
    try:
        load = _Load(port, duration, concurrency)

        def restart(i: int) -> None:
            nonlocal served
            served.stop()
            served = _Served(["--bind", f"127.0.0.1:{port}", "--grace", "5"])
        n = _paced(cycles, duration * 0.8, restart)
        return _row(load.join(), n)
    finally:
        served.stop()


class _Clients:
    """``concurrency`` client threads, each running the daytime exchange
    over and over until the port refuses; the outcomes counted by kind
    (the native load generator counts all failures as one)."""

    def __init__(self, port: int, concurrency: int, limit: int = 100_000) -> None:
        self.port, self.limit = port, limit
        self.lock = threading.Lock()
        self.counts = {"served": 0, "refused": 0, "reset": 0, "short": 0}
        self.each = [0] * concurrency
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                        for i in range(concurrency)]
        for t in self.threads:
            t.start()

    def _client(self, i: int) -> None:
        import socket
        for _ in range(self.limit):
            what = "served"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=30) as c:
                    reply = b""
                    while True:
                        data = c.recv(4096)
                        if not data:
                            break
                        reply += data
                    if reply != REPLY:
                        what = "short"
            except ConnectionRefusedError:
                what = "refused"
            except OSError as exc:
                if exc.errno not in (errno.ECONNRESET, errno.EPIPE):
                    raise
                what = "reset"
            with self.lock:
                self.counts[what] += 1
                self.each[i] += what == "served"
            if what == "refused":
                return

    def everyone_served(self) -> bool:
        with self.lock:
            return all(self.each)

    def join(self) -> Dict[str, int]:
        for t in self.threads:
            t.join(60)
        return dict(self.counts)


def stop_scenario(cycles: int, concurrency: int) -> Dict[str, Any]:
    """One process (``fastlisten serve``) stopped with SIGTERM under load,
    ``cycles`` times: its queued clients must be served, not reset; the
    clients that come once the port is closed are refused."""
    totals = {"served": 0, "refused": 0, "reset": 0, "short": 0}
    for _ in range(cycles):
        served = _Served(["--bind", "127.0.0.1:0", "--grace", "5"])
        try:
            clients = _Clients(served.port, concurrency)
            deadline = time.monotonic() + 30
            while not clients.everyone_served() and time.monotonic() < deadline:
                time.sleep(0.01)
            served.stop()
            for what, n in clients.join().items():
                totals[what] += n
        finally:
            served.close()
    lost = totals["reset"] + totals["short"]
    return {"events": cycles, "completed": totals["served"], "lost": lost, "errors": lost,
            "timeouts": 0, "first_errno": errno.ECONNRESET if totals["reset"] else 0,
            "rate": 0.0, "refused_once_closed": totals["refused"]}


def balance_and_scale(mode: str, workers: int, duration: float,
                      concurrency: int) -> Dict[str, Any]:
    """Connections per worker (max/min) and connections/s, CPU and context
    switches per connection with ``workers`` workers."""
    served = _supervised(mode, workers)
    try:
        pids = served.workers()
        before = {pid: _cpu_and_switches(pid) for pid in pids}
        load = _Load(served.port, duration, concurrency).join()
        after = {pid: _cpu_and_switches(pid) for pid in pids}
        served.proc.send_signal(signal.SIGUSR1)
        m = served.expect(r"per-worker accepted \{([^}]*)\}")
        counts = [int(x.split(":")[1]) for x in m.group(1).split()]
        cpu = sum(after[p][0] - before[p][0] for p in pids)
        switches = sum(after[p][1] - before[p][1] for p in pids)
        done = max(load.completed, 1)
        spread: Optional[float] = None
        fewest = min(counts) if counts else 0
        if fewest:
            spread = max(counts) / fewest
        return {"workers": workers, "per_worker": counts, "max_min": spread,
                "rate": load.rate, "lost": load.errors + load.timeouts,
                "cpu_us_per_conn": cpu / done * 1e6, "switches_per_conn": switches / done}
    finally:
        served.stop()


def run_restarts(cycles: int = 20, duration: float = 8.0, concurrency: int = 16,
                 progress: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Every scenario; returns a JSON-able dict (see the module's doc)."""
    say = progress or (lambda what: None)
    out: Dict[str, Any] = {"cycles": cycles, "duration": duration,
                           "concurrency": concurrency, "cpus": os.cpu_count(),
                           "events": {}, "balance": {}}
    for mode in MODES:
        for workers in (1, 2, 4):
            say(f"balance and scale: {mode}, {workers} worker(s)")
            out["balance"][f"{mode}/{workers}"] = balance_and_scale(mode, workers,
                                                                    duration / 2, concurrency)
    rate = max(r["rate"] for r in out["balance"].values())
    for mode in MODES:
        say(f"{cycles} reloads: {mode}")
        out["events"][f"reload/{mode}"] = reload_scenario(mode, cycles, duration, concurrency)
        say(f"max-requests recycling: {mode}")
        out["events"][f"recycle/{mode}"] = recycle_scenario(mode, cycles, duration,
                                                            concurrency, rate)
        say(f"scale up/down: {mode}")
        out["events"][f"scale/{mode}"] = scale_scenario(mode, cycles // 2, duration,
                                                        concurrency)
        say(f"SIGKILL a worker: {mode}")
        out["events"][f"kill/{mode}"] = kill_scenario(mode, cycles, duration, concurrency)
    say(f"{cycles} naive restarts (stop, then start)")
    out["events"]["reload/naive restart"] = naive_scenario(cycles, duration, concurrency)
    say(f"{cycles} graceful stops of one process")
    out["events"]["stop/one process"] = stop_scenario(cycles, concurrency)
    return out


def to_text(report: Dict[str, Any]) -> str:
    """The tables, as Markdown-compatible text."""
    lines = [f"Restarts under a steady load ({report['concurrency']} concurrent daytime "
             f"connections, native load generator; {report['cpus']} CPUs)", "",
             "| what | events | completed | lost (errors + timeouts) | note |",
             "|---|---:|---:|---:|---|"]
    for key, row in report["events"].items():
        what, _, mode = key.partition("/")
        notes = []
        if "held_by_killed" in row:
            notes.append(f"held by the killed workers: {row['held_by_killed']}")
        if "max_requests" in row:
            notes.append(f"--max-requests {row['max_requests']}")
        if "refused_once_closed" in row:
            notes.append(f"refused once the port closed: {row['refused_once_closed']}")
        if row["first_errno"]:
            code = errno.errorcode.get(row["first_errno"], row["first_errno"])
            notes.append(f"first error {code}")
        lines.append(f"| {what}, {mode} | {row['events']} | {row['completed']} | "
                     f"{row['lost']} | {'; '.join(notes)} |")
    lines += ["", "| mode | workers | conn/s | connections per worker | max/min | "
                  "CPU µs/conn | context switches/conn |",
              "|---|---:|---:|---|---:|---:|---:|"]
    for key, row in report["balance"].items():
        mode = key.partition("/")[0]
        mm = "-" if row["max_min"] is None else f"{row['max_min']:.2f}"
        lines.append(f"| {mode} | {row['workers']} | {row['rate']:.0f} | "
                     f"{' '.join(map(str, row['per_worker']))} | {mm} | "
                     f"{row['cpu_us_per_conn']:.0f} | {row['switches_per_conn']:.2f} |")
    return "\n".join(lines)
