"""The comparison: every server under test, every scenario, side by side in one run.

For each scenario and repeat, each server is started in its own process
(pinned to one CPU), loaded by the load generator in this process (pinned to
another), and asked for its CPU time before and after.  The kernel's
listen-queue counters are read around each load.  Repeats are summarised
by their median and spread, and every figure is also given as a ratio to
the standard-library server of the same kind from the same run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Optional, Sequence, Tuple

from fastlisten.benchmark.loadgen import run_load
from fastlisten.benchmark.protocol import SCENARIOS
from fastlisten.benchmark.results import Report
from fastlisten.benchmark.servers import SERVERS, ServerSpec, by_name, unavailable_reason
from fastlisten.benchmark.system import busy_seconds, listen_counters, machine, pick_cpus

_log = logging.getLogger("fastlisten.benchmark")

__all__ = ["Options", "BenchError", "run_benchmark"]

#: Progress callback: (done, total, what) -> None.
Progress = Callable[[int, int, str], None]


class BenchError(RuntimeError):
    """A server under test misbehaved (did not start, answer or stop)."""


@dataclass
class Options:
    """What to run.  ``Options.quick()`` is the under-a-minute variant.

    The one home of the benchmark's defaults (the field values, and QUICK
    for ``--quick``) and limits (LIMITS); ``fastlisten bench`` builds its
    flags and help from them."""

    scenarios: Sequence[str] = SCENARIOS
    servers: Optional[Sequence[str]] = None   # None: all that are available
    repeats: int = 3
    total: int = 1_000_000      # connections per run at most (daytime, echo, http-close)
    duration: float = 3.0       # and new ones are started for this many seconds
    concurrency: int = 32
    burst: int = 1024           # connections opened at once in "burst"
    timeout: float = 5.0        # one connection's limit
    shutdown_cycles: int = 200
    src_spread: int = 16
    pin: bool = True
    native_loadgen: Optional[bool] = None

    #: What ``quick()`` changes.
    QUICK: ClassVar[Dict[str, Any]] = dict(
        repeats=1, total=50_000, duration=0.5, timeout=1.2, shutdown_cycles=5)
    #: The smallest and largest value each number may take.
    LIMITS: ClassVar[Dict[str, Tuple[float, float]]] = {
        "repeats": (1, 100), "total": (1, 10_000_000), "duration": (0.01, 600),
        "concurrency": (1, 65535), "burst": (1, 65535), "shutdown_cycles": (0, 100_000),
        "timeout": (0.01, 600)}

    def __post_init__(self) -> None:
        for key in self.LIMITS:
            self.check(key, getattr(self, key), key)

    @classmethod
    def check(cls, key: str, value: float, name: str) -> None:
        """ValueError, calling the value ``name``, unless it is within LIMITS[key]."""
        lo, hi = cls.LIMITS[key]
        if not lo <= value <= hi:
            raise ValueError(f"{name} must be {lo:,} to {hi:,}, not {value:,}")

    @classmethod
    def quick(cls, **kw: Any) -> "Options":
        """Small counts, one repeat: under a minute, for CI and a first look."""
        return cls(**{**cls.QUICK, **kw})


class _Child:
    """A server-under-test process and its line protocol (see serve.py)."""

    def __init__(self, spec: ServerSpec, scenario: str, cpu: Optional[int]) -> None:
        env = dict(os.environ)
        if cpu is not None:
            env["FASTLISTEN_BENCH_CPU"] = str(cpu)
        self.name = spec.name
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastlisten.benchmark.serve", spec.name, scenario],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, env=env)
        self.sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)
        self.buf = b""

    def send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd.encode() + b"\n")
        self.proc.stdin.flush()

    def expect(self, word: str, timeout: float) -> List[str]:
        """The fields after word on the next line the child prints."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sel.select(left):
                raise BenchError(f"{self.name}: no {word} within {timeout:g} s{self._stderr()}")
            data = os.read(self.proc.stdout.fileno(), 4096)
            if not data:
                raise BenchError(f"{self.name}: exited before {word} "
                                 f"(status {self.proc.wait()}){self._stderr()}")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        fields = line.decode().split()
        if not fields or fields[0] != word:
            raise BenchError(f"{self.name}: expected {word}, got {line!r}{self._stderr()}")
        return fields[1:]

    def _stderr(self) -> str:
        self.err.seek(0)
        text = self.err.read().decode(errors="replace").strip()
        return f"; its stderr:\n{text[-2000:]}" if text else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.sel.close()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        self.err.close()


@contextlib.contextmanager
def _pinned(cpu: Optional[int]) -> Iterator[None]:
    """Pin this thread (the load generator) to cpu for the block."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _marked(child: _Child) -> Tuple[float, float, Optional[int], int]:
    u, s, d, cs = child.expect("MARK", 30)
    return float(u), float(s), None if d == "-" else int(d), int(cs)


def run_once(spec: ServerSpec, scenario: str, opts: Options,
             cpus: Sequence[Optional[int]]) -> Dict[str, Any]:
    """One load against one fresh server process; the raw figures."""
    client_cpu, server_cpu = cpus
    child = _Child(spec, scenario, server_cpu)
    try:
        port = int(child.expect("READY", 60)[0])
        child.send("mark")
        u0, s0, d0, cs0 = _marked(child)
        before = listen_counters()
        burst = scenario == "burst"
        busy0, wall0, mine0 = busy_seconds(), time.monotonic(), time.thread_time()
        with _pinned(client_cpu):
            load = run_load(("127.0.0.1", port), scenario,
                            concurrency=opts.burst if burst else opts.concurrency,
                            total=opts.burst if burst else opts.total,
                            duration=opts.duration, timeout=opts.timeout,
                            src_spread=opts.src_spread, native=opts.native_loadgen)
        busy1, wall1, mine1 = busy_seconds(), time.monotonic(), time.thread_time()
        after = listen_counters()
        child.send("mark")
        u1, s1, d1, cs1 = _marked(child)
        child.send("stop")
        sd = child.expect("DONE", 60)[2]
        if child.proc.wait(timeout=60) != 0:
            raise BenchError(f"{spec.name}: exited with {child.proc.returncode}{child._stderr()}")
    except subprocess.TimeoutExpired:
        raise BenchError(f"{spec.name}: did not exit after stop") from None
    finally:
        child.close()
    n = load.completed
    user, system = u1 - u0, s1 - s0
    # CPU used by anything but the server and the load generator while the
    # load ran (other processes on a shared machine; also loopback softirq
    # work the kernel charges to no task), in CPUs: a noise indicator.
    others = None
    if busy0 is not None and busy1 is not None and wall1 > wall0:
        others = max(0.0, (busy1 - busy0) - (user + system) - (mine1 - mine0)) / (wall1 - wall0)
    out = load.summary()
    out.update(
        cpu_user_us=user / n * 1e6 if n else None,
        cpu_sys_us=system / n * 1e6 if n else None,
        cpu_us=(user + system) / n * 1e6 if n else None,
        # the server's context switches per connection (its own "mark"
        # lines count one or two: nothing to subtract at these counts)
        switches=(cs1 - cs0) / n if n else None,
        listener_drops=None if d0 is None or d1 is None else d1 - d0,
        listen_overflows=after["ListenOverflows"] - before["ListenOverflows"],
        listen_drops=after["ListenDrops"] - before["ListenDrops"],
        shutdown_ms=None if sd == "-" else float(sd) * 1000.0,
        other_cpus=others,
    )
    return out


#: Figures summarised over repeats by their median (and spread).
MEDIAN_KEYS = ("rate", "cpu_us", "cpu_user_us", "cpu_sys_us", "switches", "p50_ms", "p99_ms",
               "listener_drops", "listen_overflows", "listen_drops", "other_cpus")
#: Figures summed over repeats.
SUM_KEYS = ("started", "completed", "errors", "timeouts", "aborted")
#: Figures that get a ratio to the same-kind stdlib server.
RATIO_KEYS = ("rate", "cpu_us", "cpu_user_us", "cpu_sys_us", "switches", "p50_ms", "p99_ms")


def summarise(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Median and spread ((max - min) / median) of each figure over the
    repeats; no spread (None) from fewer than two values."""
    out: Dict[str, Any] = {"repeats": len(runs)}
    for key in MEDIAN_KEYS:
        vals = [r[key] for r in runs if r.get(key) is not None]
        med = statistics.median(vals) if vals else None
        out[key] = med
        out[key + "_spread"] = (max(vals) - min(vals)) / med if len(vals) > 1 and med else None
    for key in SUM_KEYS:
        out[key] = sum(r[key] for r in runs)
    maxes = [r["max_ms"] for r in runs if r.get("max_ms") is not None]
    out["max_ms"] = max(maxes) if maxes else None
    out["first_errno"] = next((r["first_errno"] for r in runs if r["first_errno"]), 0)
    return out


def add_ratios(table: Dict[str, Dict[str, Any]]) -> None:
    """Add key_x = value / value of the same-kind stdlib server, in place."""
    for name, row in table.items():
        base = table.get(by_name(name).baseline)
        for key in RATIO_KEYS:
            a = row.get(key)
            b = base.get(key) if base else None
            row[key + "_x"] = (a / b) if a is not None and b else None


def _pct(sorted_vals: List[float], p: float) -> float:
    return sorted_vals[min(len(sorted_vals) - 1, int(p * len(sorted_vals)))]


#: The stdlib's shutdown() waits out poll_interval (0.5 s) each time: fewer cycles.
STDLIB_SHUTDOWN_CYCLES = 20


def measure_shutdown(specs: List[ServerSpec], cycles: int,
                     progress: Optional[Progress] = None) -> Dict[str, Dict[str, Any]]:
    """shutdown() to serve_forever returning, for idle servers, one process
    per server, cycles times (the stdlib's: at most STDLIB_SHUTDOWN_CYCLES).  The stdlib's (each cycle waits out poll_interval, idle) run
    side by side; the others one at a time, so that they do not compete
    for the server CPU while being timed."""
    # Not pinned: nothing loads the machine here, and a pinned process
    # waits for its one CPU whenever another process (on a shared machine)
    # holds it, which shows up as shutdown latency that is not the server's.
    env = dict(os.environ)
    env.pop("FASTLISTEN_BENCH_CPU", None)

    def start(spec: ServerSpec) -> "subprocess.Popen[bytes]":
        n = min(cycles, STDLIB_SHUTDOWN_CYCLES) if spec.group == "stdlib" else cycles
        return subprocess.Popen(
            [sys.executable, "-m", "fastlisten.benchmark.serve", "--shutdown",
             spec.name, str(n)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)

    out: Dict[str, Dict[str, Any]] = {}
    done = 0

    def collect(spec: ServerSpec, proc: "subprocess.Popen[bytes]") -> None:
        nonlocal done
        try:
            stdout, stderr = proc.communicate(timeout=60 + cycles * 1.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            out[spec.name] = {"error": "timed out"}
            return
        done += 1
        if progress:
            progress(done, len(specs), f"shutdown() latency: {spec.label}")
        if proc.returncode != 0:
            out[spec.name] = {"error": stderr.decode(errors="replace").strip()[-2000:]}
            return
        pairs = json.loads(stdout)
        vals = sorted(lat * 1000.0 for lat, _ in pairs)
        on_cpu = sorted(max(0.0, lat - wait) * 1000.0 for lat, wait in pairs)
        out[spec.name] = {"cycles": len(vals), "p50_ms": _pct(vals, 0.5),
                          "p99_ms": _pct(vals, 0.99), "max_ms": vals[-1],
                          # the same, less the time spent waiting for a CPU
                          # that other processes held (schedstat run delay)
                          "p99_on_cpu_ms": _pct(on_cpu, 0.99)}

    slow = [(spec, start(spec)) for spec in specs if spec.group == "stdlib"]
    try:
        for spec in specs:
            if spec.group != "stdlib":
                collect(spec, start(spec))
    finally:
        for spec, proc in slow:
            collect(spec, proc)
    out = {s.name: out[s.name] for s in specs if s.name in out}   # declared order
    for name, row in out.items():
        base = out.get(by_name(name).baseline, {})
        b, a = base.get("p99_ms"), row.get("p99_ms")
        row["p99_x"] = a / b if a is not None and b else None
    return out


def _ensure_descriptors(n: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE to n (up to the hard limit):
    a burst holds that many client sockets at once."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n if hard == resource.RLIM_INFINITY else min(n, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        _log.debug("RLIMIT_NOFILE raised from %d to %d", soft, want)


def run_benchmark(opts: Options, progress: Optional[Progress] = None) -> Report:
    """Run the comparison described by opts and return the report."""
    t_start = time.monotonic()
    wanted = [by_name(n) for n in opts.servers] if opts.servers else list(SERVERS)
    specs: List[ServerSpec] = []
    skipped: Dict[str, str] = {}
    for spec in wanted:
        reason = unavailable_reason(spec)
        if reason:
            skipped[spec.name] = reason
        else:
            specs.append(spec)
    _ensure_descriptors(max(opts.burst, opts.concurrency) + 256)
    cpus = pick_cpus() if opts.pin else (None, None)
    results: Dict[str, Dict[str, Dict[str, Any]]] = {}
    failures: List[str] = []
    shutdown_specs = [s for s in specs if s.socketserver_api]
    total_steps = len(opts.scenarios) * opts.repeats * len(specs)
    step = 0
    for scenario in opts.scenarios:
        runs: Dict[str, List[Dict[str, Any]]] = {s.name: [] for s in specs}
        for rep in range(opts.repeats):
            # rotate the order so that no server always runs first (or last)
            order = specs[rep % len(specs):] + specs[:rep % len(specs)] if specs else []
            for spec in order:
                step += 1
                if progress:
                    progress(step, total_steps, f"{scenario} {rep + 1}/{opts.repeats} {spec.label}")
                try:
                    runs[spec.name].append(run_once(spec, scenario, opts, cpus))
                except (BenchError, OSError, ValueError) as exc:
                    failures.append(f"{scenario}/{spec.name}: {exc}")
                    _log.error("%s/%s failed: %s", scenario, spec.name, exc)
        table = {name: dict(summarise(r), runs=r) for name, r in runs.items() if r}
        add_ratios(table)
        results[scenario] = table
    shutdown = measure_shutdown(shutdown_specs, opts.shutdown_cycles, progress) \
        if shutdown_specs and opts.shutdown_cycles > 0 else {}
    for name, row in shutdown.items():
        if "error" in row:
            failures.append(f"shutdown/{name}: {row['error']}")
    report = Report(
        machine=machine(), options=asdict(opts) | {"pinned_cpus": list(cpus)},
        servers={s.name: {"label": s.label, "group": s.group, "kind": s.kind,
                          "baseline": s.baseline} for s in specs},
        skipped=skipped, results=results, shutdown=shutdown, failures=failures,
        started_at=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(time.time() - (time.monotonic() - t_start))))
    report.seconds = time.monotonic() - t_start
    return report
