"""``fastlisten bench --balancer``: fastlisten behind a load balancer.

Two measurements, side by side in one run (absolute figures on a shared
machine are noise; the ratios are the result):

- **CPU per connection with PROXY protocol v2 parsing on versus off**: the
  same ``fastlisten serve`` (threads, one echoed line per connection), once plain and once with
  ``--proxy-protocol v2``, each driven with the same number of echo
  connections (the second with a v2 header in front of each request); the
  server process's CPU time (utime + stime, /proc/PID/stat) divided by the
  connections it served.  The runs alternate, ``repeats`` times each; the
  medians are reported.
- **The parser alone**: microseconds per v2 header, parsed from bytes and
  read from a socket, for each core.
- **Connections per second through HAProxy** (TCP mode, ``send-proxy-v2``)
  to one and to two fastlisten instances, and straight to one instance
  without HAProxy as the reference.

Everything stays on loopback and ends by itself.  HAProxy comes from the
system (Debian's ``haproxy`` package); without it the second part is left
out, saying why.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import socket
import socketserver
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import timeit
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from fastlisten.benchmark.loadgen import run_load
from fastlisten.sysinfo import process_cpu_seconds

__all__ = ["HAProxy", "find_haproxy", "free_port", "v2_header", "run_balancer_bench", "to_text"]


def find_haproxy() -> Optional[str]:
    """The haproxy executable (PATH, then /usr/sbin), or None."""
    found = shutil.which("haproxy")
    if found:
        return found
    for path in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy"):
        if os.access(path, os.X_OK):
            return path
    return None


def v2_header(source: Tuple[str, int] = ("192.0.2.1", 40000),
              destination: Tuple[str, int] = ("127.0.0.1", 80)) -> bytes:
    """A PROXY protocol v2 header for a TCP over IPv4 connection, as
    HAProxy's ``send-proxy-v2`` writes it (without TLVs)."""
    block = (socket.inet_aton(source[0]) + socket.inet_aton(destination[0])
             + struct.pack("!HH", source[1], destination[1]))
    return b"\r\n\r\n\x00\r\nQUIT\n\x21\x11" + struct.pack("!H", len(block)) + block


class HAProxy:
    """A haproxy process (``haproxy -db``) in TCP mode on loopback, with its
    runtime API on a Unix socket in ``directory``.

    ``backends`` maps a frontend port to the (name, port) servers behind
    it (frontend ``fe0`` and backend ``be0`` for the first, ...);
    ``server_options`` is appended to every server line (e.g.
    ``send-proxy-v2 check inter 100ms``), ``bind_options`` to every bind
    line (e.g. ``ssl crt site.pem``: HAProxy terminates TLS).  Use as a context manager, or
    call close().
    """

    def __init__(self, executable: str, directory: str,
                 backends: Dict[int, Sequence[Tuple[str, int]]], server_options: str,
                 bind_options: str = "") -> None:
        #: the first frontend's port
        self.port = next(iter(backends))
        self.stats = os.path.join(directory, "haproxy.sock")
        self.config = os.path.join(directory, "haproxy.cfg")
        sections = []
        for i, (port, servers) in enumerate(backends.items()):
            lines = "\n".join(f"    server {name} 127.0.0.1:{sport} {server_options}"
                              for name, sport in servers)
            sections.append(f"""
frontend fe{i}
    bind 127.0.0.1:{port} {bind_options}
    unique-id-format %ci:%cp
    default_backend be{i}

backend be{i}
    balance roundrobin
{lines}
""")
        with open(self.config, "w") as f:
            f.write(f"""\
global
    stats socket {self.stats} mode 600 level admin
    maxconn 4000

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
""" + "".join(sections))
        self._log = open(os.path.join(directory, "haproxy.log"), "wb")
        self.proc = subprocess.Popen([executable, "-db", "-f", self.config],
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def __enter__(self) -> "HAProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def command(self, text: str, timeout: float = 10.0) -> str:
        """One runtime API command (``show stat``, ``set server be0/s1 state
        drain`` ...); its whole answer."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(self.stats)
            s.sendall(text.encode() + b"\n")
            out: List[bytes] = []
            while True:
                data = s.recv(65536)
                if not data:
                    return b"".join(out).decode()
                out.append(data)

    def status(self) -> Dict[Tuple[str, str], str]:
        """{(backend, server): status ('UP', 'DOWN', 'DRAIN', ...)}."""
        text = self.command("show stat").lstrip("# ")
        return {(row["pxname"], row["svname"]): row["status"]
                for row in csv.DictReader(io.StringIO(text))
                if row["svname"] not in ("BACKEND", "FRONTEND")}

    def all_up(self) -> bool:
        """True once haproxy runs and every server is UP."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"haproxy exited ({self.proc.returncode}); see "
                               f"{os.path.dirname(self.config)}/haproxy.log")
        if not os.path.exists(self.stats):
            return False
        try:
            status = self.status()
        except OSError:
            return False
        return bool(status) and all(v == "UP" for v in status.values())

    def wait_up(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.all_up():
            if time.monotonic() > deadline:
                raise RuntimeError(f"haproxy's servers did not come up in {timeout} s")
            time.sleep(0.02)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def free_port() -> int:
    """A loopback TCP port free now (for a process that cannot bind port 0
    and report it, such as haproxy)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EchoLine(socketserver.StreamRequestHandler):
    """The benchmark's echo exchange: one line back, then close."""

    def handle(self) -> None:
        self.wfile.write(self.rfile.readline())


class _Served:
    """A ``fastlisten serve`` subprocess running EchoLine; its port from
    its first line."""

    def __init__(self, *flags: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastlisten", "serve", f"{__name__}:EchoLine",
             "--bind", "127.0.0.1:0",
             "--threads", "8", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line.startswith("listening on "):
            self.close()
            raise RuntimeError(f"fastlisten serve did not start: {line!r}")
        self.port = int(line.rsplit(":", 1)[1])

    def cpu(self) -> float:
        return process_cpu_seconds(self.proc.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _settled_cpu(served: _Served, limit: float = 2.0) -> float:
    """The server's CPU time once it has stopped using any (the last
    handlers finish after their clients saw the reply): read until two
    readings 50 ms apart agree, for at most ``limit`` seconds."""
    deadline = time.monotonic() + limit
    last = served.cpu()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = served.cpu()
        if now == last:
            break
        last = now
    return last


def _cpu_per_connection(served: _Served, prefix: bytes, total: int, concurrency: int,
                        timeout: float) -> Tuple[float, float]:
    """(CPU µs per served connection, connections/s) for one load."""
    before = served.cpu()
    result = run_load(("127.0.0.1", served.port), "echo", concurrency=concurrency,
                      total=total, duration=600.0, timeout=timeout, prefix=prefix)
    used = _settled_cpu(served) - before
    done = max(result.completed, 1)
    return used / done * 1e6, result.rate


def parse_cost(number: int = 20000) -> Dict[str, Dict[str, float]]:
    """µs per v2 header for each core available: ``parse`` (proxy_parse of
    a HAProxy-like header) and ``read`` (proxy_read of it from a socketpair,
    the sender's write included); best of three rounds."""
    from fastlisten import _corepy

    cores: List[Any] = [_corepy]
    try:
        from fastlisten import _core
        cores.insert(0, _core)
    except ImportError:
        pass
    header = v2_header()
    out: Dict[str, Dict[str, float]] = {}
    a, b = socket.socketpair()
    try:
        for core in cores:
            def read() -> None:
                b.sendall(header)
                core.proxy_read(a, 2, 3.0)
            costs = {}
            for name, fn in (("parse", lambda: core.proxy_parse(header)), ("read", read)):
                costs[name] = min(timeit.repeat(fn, number=number, repeat=3)) / number * 1e6
            out["compiled" if core.__name__.endswith("_core") else "python"] = costs
    finally:
        a.close()
        b.close()
    return out


def run_balancer_bench(total: int = 20000, repeats: int = 3, concurrency: int = 16,
                       timeout: float = 5.0,
                       progress: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Measure; returns a JSON-able report (see the module's docstring)."""
    say = progress or (lambda text: None)
    out: Dict[str, Any] = {"total": total, "repeats": repeats, "concurrency": concurrency}
    say("parsing cost per header")
    out["parse_us"] = parse_cost(max(total, 1000))
    header = v2_header()
    plain, proxied = _Served(), _Served("--proxy-protocol", "v2")
    try:
        cpu: Dict[str, List[float]] = {"off": [], "on": []}
        for r in range(repeats):
            for name, served, prefix in (("off", plain, b""), ("on", proxied, header)):
                say(f"CPU per connection, PROXY v2 {name}, run {r + 1}/{repeats}")
                cpu[name].append(_cpu_per_connection(served, prefix, total, concurrency,
                                                     timeout)[0])
        off, on = statistics.median(cpu["off"]), statistics.median(cpu["on"])
        out["cpu_us_per_connection"] = {"off": off, "on": on, "ratio": on / off if off else None,
                                        "runs": cpu}
    finally:
        plain.close()
        proxied.close()

    haproxy = find_haproxy()
    if haproxy is None:
        out["haproxy"] = {"skipped": "haproxy is not installed (apt-get install haproxy)"}
        return out
    instances = [_Served("--proxy-protocol", "v2"), _Served("--proxy-protocol", "v2")]
    try:
        one, two = free_port(), free_port()
        with tempfile.TemporaryDirectory(prefix="fastlisten-haproxy-") as tmp, HAProxy(
                haproxy, tmp,
                {one: [("s1", instances[0].port)],
                 two: [("s1", instances[0].port), ("s2", instances[1].port)]},
                "send-proxy-v2 check inter 1s") as proxy:
            proxy.wait_up()
            rates: Dict[str, List[float]] = {"direct": [], "haproxy_1": [], "haproxy_2": []}
            targets = (("direct", instances[0].port, header), ("haproxy_1", one, b""),
                       ("haproxy_2", two, b""))
            for r in range(repeats):
                for name, port, prefix in targets:
                    say(f"connections/s {name}, run {r + 1}/{repeats}")
                    result = run_load(("127.0.0.1", port), "echo", concurrency=concurrency,
                                      total=total, duration=600.0, timeout=timeout,
                                      prefix=prefix)
                    rates[name].append(result.rate)
            medians = {name: statistics.median(v) for name, v in rates.items()}
            out["haproxy"] = {
                "version": subprocess.run([haproxy, "-v"], capture_output=True, text=True,
                                          timeout=10).stdout.splitlines()[0],
                "connections_per_s": medians, "runs": rates,
                "two_vs_one": (medians["haproxy_2"] / medians["haproxy_1"]
                               if medians["haproxy_1"] else None),
            }
    finally:
        for served in instances:
            served.close()
    return out


def to_text(report: Dict[str, Any]) -> str:
    """The report as a short table."""
    lines = [f"fastlisten behind a load balancer ({report['total']} echo connections per run, "
             f"{report['concurrency']} at a time, median of {report['repeats']})", ""]
    for core, costs in report.get("parse_us", {}).items():
        lines.append(f"PROXY v2 header, {core} core: parse {costs['parse']:.2f} µs, read from "
                     f"a socket {costs['read']:.2f} µs (write included)")
    lines.append("")
    cpu = report["cpu_us_per_connection"]
    lines.append("server CPU per connection   PROXY v2 off   PROXY v2 on   on/off")
    lines.append(f"                            {cpu['off']:9.1f} µs  {cpu['on']:9.1f} µs  "
                 f"{cpu['ratio']:6.2f}x" if cpu["ratio"] else "")
    lines.append("")
    hap = report["haproxy"]
    if "skipped" in hap:
        lines.append(f"through HAProxy: skipped ({hap['skipped']})")
    else:
        rates = hap["connections_per_s"]
        lines.append(f"connections/s ({hap['version']}, send-proxy-v2)")
        lines.append(f"  straight to one instance (v2 header sent by the client) "
                     f"{rates['direct']:10.0f}")
        lines.append(f"  through HAProxy to one instance                         "
                     f"{rates['haproxy_1']:10.0f}")
        lines.append(f"  through HAProxy to two instances                        "
                     f"{rates['haproxy_2']:10.0f}   ({hap['two_vs_one']:.2f}x one)")
    return "\n".join(lines)
