"""The load generator: many short loopback connections, bounded by count and time.

``run_load`` drives N concurrent connections with non-blocking connects on
epoll.  It uses the C loop in ``fastlisten.benchmark._native`` (no GIL, no
Python object per connection) when the compiled core is in use, and the
selectors-based twin in ``fastlisten.benchmark._pyloadgen`` otherwise
(``FASTLISTEN_NO_EXTENSIONS=1``): same arguments, same result, slower.

It only ever connects to loopback addresses (127.0.0.0/8, ::1).
"""

from __future__ import annotations

import ipaddress
import statistics
from array import array
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from fastlisten import _backend
from fastlisten.benchmark.protocol import SCENARIOS, reply_for, request_for

__all__ = ["LoadResult", "run_load", "native_module", "native_available", "check_loopback"]


def native_module() -> Any:
    """The C load generator and reference server (the extension module
    ``fastlisten.benchmark._native``), or None where it is not used: not
    built, or the compiled core switched off (``FASTLISTEN_NO_EXTENSIONS=1``)."""
    if not _backend.compiled:
        return None
    try:
        from fastlisten.benchmark import _native
    except ImportError:
        return None
    return _native


def native_available() -> bool:
    """True when the C load generator (and reference server) can be used."""
    return native_module() is not None


def check_loopback(host: str) -> None:
    """Raise ValueError unless host is a numeric loopback address."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"the load generator needs a numeric loopback address, not {host!r}") from None
    mapped = getattr(ip, "ipv4_mapped", None)
    if not (ip.is_loopback or (mapped is not None and mapped.is_loopback)):
        raise ValueError(f"the load generator only sends traffic to loopback "
                         f"(127.0.0.0/8, ::1), not {host}")


@dataclass
class LoadResult:
    """What one load run measured (client side)."""

    scenario: str
    started: int
    completed: int
    errors: int
    timeouts: int
    aborted: int
    bytes_in: int
    first_errno: int
    elapsed: float
    window_completed: int
    window: float
    latencies_us: array = field(repr=False)
    native: bool = True

    @property
    def rate(self) -> float:
        """Completed connections per second: over the whole run for a burst;
        otherwise while new connections were being started (the steady
        rate, without the tail of stragglers retrying a dropped SYN)."""
        if self.scenario == "burst":
            return self.completed / self.elapsed if self.elapsed > 0 else 0.0
        return self.window_completed / self.window if self.window > 0 else 0.0

    def latency(self) -> Dict[str, Optional[float]]:
        """p50, p99 and max of connect-to-reply latency, in milliseconds."""
        lat = sorted(self.latencies_us)
        if not lat:
            return {"p50_ms": None, "p99_ms": None, "max_ms": None}

        def pct(p: float) -> float:
            return lat[min(len(lat) - 1, int(p * len(lat)))] / 1000.0

        return {"p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": lat[-1] / 1000.0}

    def summary(self) -> Dict[str, Any]:
        """A JSON-able dict (latencies summarised)."""
        out = {k: getattr(self, k) for k in (
            "scenario", "started", "completed", "errors", "timeouts", "aborted",
            "bytes_in", "first_errno", "elapsed", "window_completed", "window", "native")}
        out["rate"] = self.rate
        out.update(self.latency())
        out["mean_ms"] = statistics.fmean(self.latencies_us) / 1000.0 if self.latencies_us else None
        return out


def run_load(address: Tuple[str, int], scenario: str = "daytime", *,
             concurrency: int = 32, total: int = 10000, duration: float = 10.0,
             timeout: float = 5.0, src_spread: int = 0,
             native: Optional[bool] = None, prefix: bytes = b"") -> LoadResult:
    """Open ``total`` connections to ``address`` (``concurrency`` at a time;
    all at once for ``burst``), each doing the scenario's exchange, and
    return what happened.

    Stops starting connections after ``duration`` seconds; a connection
    taking longer than ``timeout`` is counted as a timeout.  ``src_spread``
    > 1 binds IPv4 clients to 127.0.0.1 .. 127.0.0.N in turn, for more
    source ports.  ``native=None`` picks the C loop when it is available.
    ``prefix`` is sent before the scenario's request (a PROXY protocol
    header, say); the server's reply stays the scenario's.
    """
    host, port = address[0], address[1]
    check_loopback(host)
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}: one of {', '.join(SCENARIOS)}")
    if concurrency < 1 or total < 0 or duration < 0 or timeout <= 0:
        raise ValueError("concurrency must be >= 1, total and duration >= 0, timeout > 0")
    use_native = native_available() if native is None else native
    if use_native and not native_available():
        raise RuntimeError("the native load generator needs the compiled core")
    request = bytes(prefix) + request_for(scenario)
    expect = len(reply_for(scenario))
    if use_native:
        raw = native_module().loadgen_run((host, port), scenario, concurrency, total,
                                          duration, timeout, src_spread, request, expect)
    else:
        from fastlisten.benchmark import _pyloadgen
        raw = _pyloadgen.loadgen_run((host, port), scenario, concurrency, total,
                                            duration, timeout, src_spread, request, expect)
    return LoadResult(
        scenario=scenario, started=raw["started"], completed=raw["completed"],
        errors=raw["errors"], timeouts=raw["timeouts"], aborted=raw["aborted"],
        bytes_in=raw["bytes_in"], first_errno=raw["first_errno"],
        elapsed=raw["elapsed"], window_completed=raw["window_completed"],
        window=raw["window"], latencies_us=raw["latencies_us"], native=use_native)
